"""Fine-tuning a Karlo-shaped decoder with the decoder task: the raw CLIP conditioning it takes
(projected, not unit-norm, embeddings and the pooled text embedding), a converted diffusers
decoder fine-tuned through the task's loss, and `dalle2-jax train decoder --config
configs/decoder.py:karlo` (cut to a tiny UNet) fine-tuning a converted diffusers decoder and
resuming bit for bit."""
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # the reference; installed by the dev extra

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel  # noqa: E402

from dalle2_jax import config_util  # noqa: E402
from dalle2_jax.convert import karlo_unet  # noqa: E402
from dalle2_jax.data import pipeline as data_pipeline  # noqa: E402
from dalle2_jax.models.clip import normalize  # noqa: E402
from dalle2_jax.tasks import clip as clip_stage  # noqa: E402
from dalle2_jax.tasks import decoder  # noqa: E402
from dalle2_jax.training import metrics  # noqa: E402

from test_task_decoder import CLIP_MODEL, write_clip_dir  # noqa: E402

SHAPES_SIZES = dict(image_size=32, seed=0, num_train=48, num_test=24, num_test_unseen=6)
WIDTH = 16  # Karlo's text_proj projects the token encodings from the embedding width: text width = embed dim
KARLO_CLIP = dict(CLIP_MODEL, embed_dim=WIDTH, text_width=WIDTH)
TINY_KARLO = dict(
    sample_size=8, layers_per_block=1, block_out_channels=[16, 32], in_channels=3, out_channels=6,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=WIDTH, class_embed_type="identity",
    attention_head_dim=16, resnet_time_scale_shift="scale_shift", norm_num_groups=8)
TINY_TEXT_PROJ = dict(clip_extra_context_tokens=4, clip_embeddings_dim=WIDTH, time_embed_dim=64,
                      cross_attention_dim=WIDTH)
UNET = {"image_size": 8, "channels": "(16, 32)", "num_res_blocks": 1, "attention_resolutions": "(4,)",
        "head_dim": 16, "num_groups": 8, "context_dim": WIDTH, "remat": "none"}
BATCH, STEPS = 8, 2


def karlo_overrides(data_dir, clip_dir, extra=None):
    values = {f"model.{k}": v for k, v in UNET.items()}
    values.update({f"data.{k}": v for k, v in SHAPES_SIZES.items()})
    values.update({"data.data_dir": data_dir, "clip_dir": clip_dir, "compute_dtype": "float32",
                   "total_steps": STEPS, "batch_size": BATCH, "log_every": 1, "eval_every": 0,
                   "checkpoint_every": 1, "progress_bar": False, "optimizer.warmup_steps": 1,
                   "optimizer.learning_rate": 1e-3})
    values.update(extra or {})
    return [f"--config.{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, data_dir):
    return write_clip_dir(str(tmp_path_factory.mktemp("runs") / "clip"), data_dir, KARLO_CLIP)


@pytest.fixture(scope="module")
def config(data_dir, clip_dir):
    return config_util.load_config("configs/decoder.py:karlo", karlo_overrides(data_dir, clip_dir))


@pytest.fixture(scope="module")
def task(config):
    return decoder.make_task(config)


@pytest.fixture(scope="module")
def converted(task, config):
    """A tiny random diffusers Karlo decoder converted for the task's config."""
    generator = torch.Generator().manual_seed(0)
    unet, text_proj = UNet2DConditionModel(**TINY_KARLO), UnCLIPTextProjModel(**TINY_TEXT_PROJ)
    with torch.no_grad():
        for module in (unet, text_proj):
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))  # the zero-initialised ones too
    state = lambda m: {k: v.detach().numpy() for k, v in m.state_dict().items()}  # noqa: E731
    converted_config = karlo_unet.decoder_config_from_diffusers(dict(unet.config), dict(text_proj.config),
                                                                text_len=config.conditioning.text_len)
    rng = np.random.default_rng(0)  # stands in for CLIP's encoding of "" (our tokenizer refuses empty captions)
    empty = {"text_embed": rng.standard_normal(WIDTH), "text_encodings": rng.standard_normal((16, WIDTH))}
    variables = karlo_unet.convert_decoder(state(unet), state(text_proj), converted_config, empty_prompt=empty)
    return converted_config, variables


def test_karlo_config_cut_to_tiny_is_the_converted_model(config, converted):
    converted_config, _ = converted
    assert dict(config.conditioning) == dict(converted_config.conditioning) == {
        "image_embed_dim": WIDTH, "text_len": 16, "text_width": WIDTH}
    ours = {k: v for k, v in config.model.to_dict().items() if k not in ("dtype", "model_channels", "channel_mult")}
    theirs = {k: v for k, v in converted_config.model.to_dict().items()
              if k not in ("dtype", "model_channels", "channel_mult")}
    assert ours == theirs


def test_batches_carry_the_raw_clip_embeddings_and_the_text_embedding(task, clip_dir):
    iterator = task.train_iterator(seed=3, process_index=0, process_count=1, per_process_batch=BATCH)
    batch = next(iterator)
    assert sorted(batch) == ["image", "image_embed", "text_embed", "text_encodings", "text_mask"]
    model, variables, tokenizer, _ = clip_stage.load_clip(clip_dir)
    raw = next(data_pipeline.make_image_text_iterator(
        task.builder.as_data_source("train"), batch_size=BATCH, seed=3, image_size=32, tokenizer=tokenizer))
    stored = jax.jit(functools.partial(clip_stage.encode_batch, model))(
        variables, raw["image"], raw["input_ids"], raw["attention_mask"])
    # encode_batch stores unit-norm embeddings; Karlo's decoder sees them at CLIP's own scale.
    norms = np.linalg.norm(batch["image_embed"], axis=1)
    assert np.abs(norms - 1).max() > 0.05
    np.testing.assert_allclose(np.asarray(normalize(batch["image_embed"])), stored["image_embed"], atol=1e-5)
    np.testing.assert_allclose(np.asarray(normalize(batch["text_embed"])), stored["text_embed"], atol=1e-5)


class StartFrom:
    """The decoder task with its parameters initialised to given values (the converted weights):
    what `--config.init_from` does inside the loop."""

    def __init__(self, task, params):
        self.task, self.params = task, params

    def __getattr__(self, name):
        return getattr(self.task, name)

    def init_params(self, rng, batch):
        return jax.tree.map(jnp.asarray, self.params)


def test_converted_decoder_fine_tunes_and_resumes_bit_for_bit(tmp_path, config, task, converted, devices8):
    """The training loop on 8 devices from the converted weights for 2 steps (Adam, learning rate
    1e-3: every parameter moves, by at most ~1e-3 a step), then again from its step-1
    checkpoint: the same step-2 loss and parameters, bit for bit."""
    from dalle2_jax.training import loop

    _, variables = converted
    start = StartFrom(task, variables["params"])
    workdir = tmp_path / "decoder"
    state = jax.device_get(loop.train(start, config, str(workdir)))
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(workdir / "checkpoints" / "1", resumed_dir / "checkpoints" / "1")
    resumed = jax.device_get(loop.train(start, config, str(resumed_dir)))

    first = [r for r in metrics.read_metrics(workdir) if "loss" in r]
    again = [r for r in metrics.read_metrics(resumed_dir) if "loss" in r]
    assert [r["step"] for r in first] == [1, 2] and [r["step"] for r in again] == [2]
    assert np.isfinite(first[0]["loss"]) and again[0]["loss"] == first[1]["loss"]
    assert int(resumed.step) == STEPS
    for name in ("params", "ema_params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(resumed, name), getattr(state, name))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), state.params,
                         variables["params"])
    assert max(jax.tree.leaves(moved)) < 2.5e-3, moved  # it started from the converted weights
    # the null values move only when a row drops its image / caption
    network = {name: tree for name, tree in moved.items() if not name.startswith("null_")}
    assert min(jax.tree.leaves(network)) > 0
