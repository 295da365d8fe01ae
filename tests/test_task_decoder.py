"""The decoder stage: frozen-CLIP conditioning of the batches, one-batch overfitting through the
task's loss, the learned-variance hybrid loss in bfloat16 at every t, `dalle2-jax train decoder`
on 8 devices equal to one device, the sample grid and the pixel judge.

Compiles are the cost here (a UNet's random init alone takes ~20 s of CPU to compile), so the
UNet is the tiny config cut to one 8px level, the training run's params feed the other tests,
and the one-device reference resumes from the 8-device run's first checkpoint instead of
initialising again."""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle2_jax import checkpoint, config_util, diffusion, sharding
from dalle2_jax.data import embeddings, pipeline, shapes
from dalle2_jax.models.clip import CLIP
from dalle2_jax.tasks import clip as clip_stage
from dalle2_jax.tasks import decoder
from dalle2_jax.tokenizer import train_bpe_tokenizer
from dalle2_jax.training import entry, loop, metrics

SHAPES_SIZES = dict(image_size=32, seed=0, num_train=64, num_test=120, num_test_unseen=12)
CLIP_MODEL = dict(embed_dim=16, context_length=16, text_width=24, text_depth=1, text_heads=2, text_mlp_dim=32,
                  image_size=16, patch_size=8, vision_width=16, vision_depth=1, vision_heads=2, vision_mlp_dim=32)
UNET = {"image_size": 8, "model_channels": 16, "channel_mult": "(1,)", "num_res_blocks": 1,
        "attention_resolutions": "()", "head_dim": 16, "num_groups": 8, "num_context_tokens": 2,
        "context_dim": 16}
BATCH, STEPS = 8, 3


def write_clip_dir(path: str, data_dir: str, clip_model: dict = CLIP_MODEL) -> str:
    """A CLIP workdir as `dalle2-jax train clip` leaves it (config.json, checkpoints/, tokenizer/),
    with random parameters: the decoder only needs a fixed function of images and captions."""
    overrides = [f"--config.model.{k}={v}" for k, v in clip_model.items()]
    overrides += [f"--config.data.{k}={v}" for k, v in SHAPES_SIZES.items()] + [f"--config.data.data_dir={data_dir}"]
    config = config_util.load_config("configs/clip.py:tiny", overrides)
    model = CLIP(**config.model)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32), jnp.zeros((1, 16, 16, 3)))
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    with checkpoint.Checkpointer(os.path.join(path, "checkpoints")) as ckpt:
        ckpt.save(0, {"params": params["params"], "ema_params": params["params"]})
        ckpt.wait()
    captions = [shapes.generate_example(0, "train", i, 32)["caption"] for i in range(64)]
    train_bpe_tokenizer(captions, vocab_size=300, context_length=16).save(os.path.join(path, "tokenizer"))
    return path


def decoder_overrides(data_dir: str, clip_dir: str, extra: dict | None = None) -> list[str]:
    values = {f"model.{k}": v for k, v in UNET.items()}
    values.update({f"data.{k}": v for k, v in SHAPES_SIZES.items()})
    values.update({"data.data_dir": data_dir, "clip_dir": clip_dir, "total_steps": STEPS, "batch_size": BATCH,
                   "log_every": 1, "eval_every": STEPS, "checkpoint_every": 1, "progress_bar": False,
                   "optimizer.warmup_steps": 1, "optimizer.learning_rate": 1e-3,
                   "eval.samples_per_condition": 1, "eval.sampling_steps": 3})
    values.update(extra or {})
    return [f"--config.{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, data_dir):
    return write_clip_dir(str(tmp_path_factory.mktemp("runs") / "clip"), data_dir)


@pytest.fixture(scope="module")
def config(data_dir, clip_dir):
    return config_util.load_config("configs/decoder.py:tiny", decoder_overrides(data_dir, clip_dir))


@pytest.fixture(scope="module")
def task(config):
    return decoder.make_task(config)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir, clip_dir, devices8):
    """`dalle2-jax train decoder` on 8 devices (checkpoint every step, eval at the end)."""
    workdir = str(tmp_path_factory.mktemp("runs") / "decoder")
    state = entry.run_train("decoder", "configs/decoder.py:tiny", workdir, decoder_overrides(data_dir, clip_dir))
    return workdir, jax.device_get(state)


def test_batches_carry_the_frozen_clip_conditioning(task, config, clip_dir):
    assert dict(config.conditioning) == {"image_embed_dim": 16, "text_len": 16, "text_width": 24}
    assert task.load_size == 32  # the CLIP run's load size; the CLIP model sees 16px, the decoder 8px
    iterator = task.train_iterator(seed=3, process_index=0, process_count=1, per_process_batch=BATCH)
    position = iterator.get_state()
    batch = next(iterator)
    assert sorted(batch) == ["image", "image_embed", "text_encodings", "text_mask"]
    raw = next(pipeline.make_image_text_iterator(task.builder.as_data_source("train"), batch_size=BATCH, seed=3,
                                                 image_size=32, tokenizer=task.tokenizer))
    # The decoder's target is the exact 4x4 block mean of the loaded image.
    blocks = raw["image"].reshape(BATCH, 8, 4, 8, 4, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(batch["image"], blocks, atol=1e-6)
    # The rest is what `dalle2-jax embed` would store for these images and captions.
    model, variables, _, _ = clip_stage.load_clip(clip_dir)
    stored = jax.jit(functools.partial(clip_stage.encode_batch, model))(
        variables, raw["image"], raw["input_ids"], raw["attention_mask"])
    np.testing.assert_allclose(batch["image_embed"], stored["image_embed"], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batch["image_embed"], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batch["text_encodings"], stored["text_encodings"], rtol=2e-3, atol=2e-3)
    assert batch["text_encodings"].dtype == np.float32 and batch["text_encodings"].shape == (BATCH, 16, 24)
    np.testing.assert_array_equal(batch["text_mask"], stored["text_mask"])
    np.testing.assert_array_equal(batch["text_mask"], raw["attention_mask"].astype(bool))
    iterator.set_state(position)  # checkpointable: the same batch again
    np.testing.assert_array_equal(next(iterator)["image_embed"], batch["image_embed"])


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory, data_dir, clip_dir):
    """`dalle2-jax embed` of the train split with the frozen CLIP."""
    return clip_stage.run_embed(clip_dir=clip_dir, data="shapes", data_dir=data_dir, split="train",
                                out_dir=str(tmp_path_factory.mktemp("runs") / "embeddings" / "train"),
                                batch_size=24, progress=False)


def test_stored_embeddings_give_the_batches_and_statistics_of_the_frozen_clip(task, data_dir, clip_dir,
                                                                               embeddings_dir):
    """config.embeddings_dir: the same batches (the same block means, up to float rounding; the
    conditioning as the embed stage stored it) in the same order as encoding on the fly, and the
    same standardisation."""
    stored_task = decoder.make_task(config_util.load_config(
        "configs/decoder.py:tiny", decoder_overrides(data_dir, clip_dir, {"embeddings_dir": embeddings_dir})))
    assert stored_task.config.model.image_embed_mean == pytest.approx(task.config.model.image_embed_mean, abs=1e-5)
    assert stored_task.config.model.image_embed_std == pytest.approx(task.config.model.image_embed_std, rel=1e-4)
    on_the_fly = task.train_iterator(seed=5, process_index=0, process_count=1, per_process_batch=BATCH)
    iterator = stored_task.train_iterator(seed=5, process_index=0, process_count=1, per_process_batch=BATCH)
    for _ in range(2):
        position = iterator.get_state()
        want, batch = next(on_the_fly), next(iterator)
        assert sorted(batch) == sorted(want)
        assert {key: value.dtype for key, value in batch.items()} == {key: value.dtype for key, value in want.items()}
        np.testing.assert_allclose(batch["image"], want["image"], atol=1e-6)
        np.testing.assert_allclose(batch["image_embed"], want["image_embed"], atol=1e-5)
        # token encodings are stored as float16
        np.testing.assert_allclose(batch["text_encodings"], want["text_encodings"], rtol=2e-3, atol=2e-3)
        np.testing.assert_array_equal(batch["text_mask"], want["text_mask"])
        iterator.set_state(position)
        np.testing.assert_array_equal(next(iterator)["image_embed"], batch["image_embed"])
    params = jax.jit(stored_task.init_params)(jax.random.key(0), batch)
    loss, _ = jax.jit(stored_task.loss)(params, batch, jax.random.key(0))
    assert np.isfinite(float(loss))


def test_stored_embeddings_of_other_rows_are_refused(data_dir, clip_dir, embeddings_dir, tmp_path):
    def make(extra):
        config = config_util.load_config("configs/decoder.py:tiny", decoder_overrides(data_dir, clip_dir, extra))
        return decoder.make_task(config)

    stored = embeddings.EmbeddingSource(embeddings_dir)
    rows = [stored[i] for i in range(len(stored))]
    arrays = {key: np.stack([row[key] for row in rows]) for key in ("image_embed", "text_embed", "text_encodings",
                                                                   "text_mask")}
    captions = [row["caption"] for row in rows]
    reversed_dir = embeddings.write_embedding_dataset(
        str(tmp_path / "reversed"), *(arrays[key][::-1] for key in ("image_embed", "text_embed")),
        text_encodings=arrays["text_encodings"][::-1], text_mask=arrays["text_mask"][::-1], captions=captions[::-1])
    with pytest.raises(ValueError, match=r"config.embeddings_dir: row 0 is the caption"):
        make({"embeddings_dir": reversed_dir})
    shorter_dir = embeddings.write_embedding_dataset(
        str(tmp_path / "shorter"), arrays["image_embed"][:-1], arrays["text_embed"][:-1],
        text_encodings=arrays["text_encodings"][:-1], text_mask=arrays["text_mask"][:-1], captions=captions[:-1])
    with pytest.raises(ValueError, match=r"config.embeddings_dir: holds 63 rows, the train split 64"):
        make({"embeddings_dir": shorter_dir})
    no_text_dir = embeddings.write_embedding_dataset(str(tmp_path / "no-text"), arrays["image_embed"],
                                                     arrays["text_embed"], captions=captions)
    with pytest.raises(ValueError, match=r"config.embeddings_dir: has no text_enc/text_mask"):
        make({"embeddings_dir": no_text_dir})
    with pytest.raises(FileNotFoundError, match="config.embeddings_dir"):
        make({"embeddings_dir": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="config.data.augment / random_flip"):
        make({"embeddings_dir": embeddings_dir, "data.augment": "random_crop"})


def test_image_embeds_are_standardised_with_the_training_set_statistics(task, config, run):
    """tiny: UNet.image_embed_mean/std are the frozen CLIP's statistics over the first training
    examples (all 64 here), and the workdir's config.json carries them to the pipeline."""
    items = decoder.first_examples(task.builder, "train", config.image_embed_stats_examples)
    assert len(items) == 64
    images = np.stack([clip_stage._square(item["image"], task.load_size) for item in items])
    embeds = task.encode(images, [clip_stage._text(item["caption"]) for item in items])["image_embed"]
    np.testing.assert_allclose(config.model.image_embed_mean, embeds.mean(0), atol=1e-6)
    np.testing.assert_allclose(config.model.image_embed_std, np.sqrt(embeds.var(0).mean()), rtol=1e-4)
    assert 0.0 < config.model.image_embed_std < 0.5  # unit-norm embeddings: well below 1 per component
    assert task.unet.image_embed_std == config.model.image_embed_std
    with open(os.path.join(run[0], loop.CONFIG_FILE)) as f:
        written = json.load(f)["model"]
    np.testing.assert_allclose(written["image_embed_mean"], config.model.image_embed_mean, rtol=1e-6)
    assert written["image_embed_std"] == pytest.approx(config.model.image_embed_std)


def test_training_run_on_8_devices_logs_samples_and_judge(run, task):
    workdir, state = run
    records = metrics.read_metrics(workdir)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["mse"]) and r["skipped"] == 0 for r in train_records)
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["conditioning"] == {"image_embed_dim": 16, "text_len": 16, "text_width": 24}
    (evaluation,) = [r for r in records if "eval/colour_acc" in r]
    assert evaluation["step"] == STEPS
    for name in ("colour_acc", "shape_acc", "acc"):  # 18 samples, 2 of the held-out pairs
        assert evaluation[f"eval/{name}"] * 18 == pytest.approx(round(evaluation[f"eval/{name}"] * 18))
        assert evaluation[f"eval/unseen/{name}"] in (0.0, 0.5, 1.0)
    from PIL import Image

    grid = np.asarray(Image.open(os.path.join(workdir, "samples", f"step_{STEPS}.png")))
    assert grid.shape == (18 * 8, 2 * 8, 3)  # a row per condition: the conditioning image, one sample
    conditions = task.eval_conditions()
    np.testing.assert_array_equal(grid[:, :8].reshape(18, 8, 8, 3), decoder.to_uint8(conditions["image"]))
    assert conditions["captions"][0] == "a red circle" and conditions["captions"][-1] == "a orange triangle"
    assert conditions["colour"][-1] == "orange" and conditions["shape"][-1] == "triangle"

    # evaluate() decodes with sampling.decode_images and judges those very samples.
    params = jax.device_put(state.ema_params, sharding.replicated(sharding.make_mesh()))
    samples = task.sample(params, conditions["image_embed"], conditions["text_encodings"], conditions["text_mask"],
                          rng=jax.random.key(0))
    np.testing.assert_array_equal(decoder.to_uint8(samples), grid[:, 8:].reshape(18, 8, 8, 3))
    judged = decoder.judge_samples(decoder.to_uint8(samples), conditions["colour"], conditions["shape"])
    assert judged == {k[len("eval/"):]: v for k, v in evaluation.items() if k.startswith("eval/")}


@pytest.mark.heavy
def test_one_device_continues_exactly_like_8_devices(run, tmp_path, data_dir, clip_dir, devices8):
    """Steps 2 and 3 again on one device from the 8-device run's step-1 checkpoint (float32)."""
    workdir, state = run
    shutil.copytree(os.path.join(workdir, "checkpoints", "1"), tmp_path / "checkpoints" / "1")
    config = config_util.load_config("configs/decoder.py:tiny",
                                     decoder_overrides(data_dir, clip_dir, {"eval_every": 0}))
    one_device = sharding.make_mesh(1, 1, devices=devices8[:1])
    reference = jax.device_get(loop.train(decoder.make_task(config), config, str(tmp_path), mesh=one_device))
    expected = [r for r in metrics.read_metrics(workdir) if "loss" in r][1:]
    got = [r for r in metrics.read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in got] == [2, 3]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in expected], rtol=1e-5)
    assert int(reference.step) == STEPS
    for name in ("params", "ema_params", "opt_state"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     getattr(reference, name), getattr(state, name))


def test_overfits_one_batch(task, run):
    """A fixed batch, timesteps, noise and drop flags: the loss falls at least 10x."""
    _, state = run
    batch = next(task.train_iterator(seed=0, process_index=0, process_count=1, per_process_batch=4))
    tx = optax.adam(3e-3)
    rng = jax.random.key(7)

    @jax.jit
    def fit(params):
        def step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(lambda p: task.loss(p, batch, rng)[0])(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        _, losses = jax.lax.scan(step, (params, tx.init(params)), None, length=150)
        return losses

    losses = np.asarray(fit(state.params))
    assert np.all(np.isfinite(losses))
    assert losses[-5:].mean() < losses[0] / 10, (losses[0], losses[-5:])


def _learned_variance_params(params, seed: int):
    """`params` with a 6-channel output conv, every all-zero kernel redrawn large, so the
    variance half of the output spans far beyond [-1, 1] and every layer gets a gradient."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
    leaves = []
    for path, leaf in flat:
        name = jax.tree_util.keystr(path)
        if "conv_out" in name:
            leaf = jnp.concatenate([leaf, leaf], axis=-1)
        if name.endswith("['kernel']") and not np.any(np.asarray(leaf)):
            fan_in = int(np.prod(leaf.shape[:-1]))
            leaf = 3.0 * jax.random.normal(next(keys), leaf.shape) / np.sqrt(fan_in)
        leaves.append(leaf)
    return jax.tree.unflatten(treedef, leaves)


def test_hybrid_loss_and_gradient_are_finite_at_every_t_in_bfloat16(data_dir, clip_dir, task, run):
    config = config_util.load_config("configs/decoder.py:tiny", decoder_overrides(
        data_dir, clip_dir, {"compute_dtype": "bfloat16", "model.learned_variance": True}))
    bf16_task = decoder.make_task(config)
    assert bf16_task.unet.dtype == "bfloat16" and bf16_task.unet.learned_variance
    params = _learned_variance_params(run[1].params, seed=1)
    batch = next(task.train_iterator(seed=0, process_index=0, process_count=1, per_process_batch=BATCH))
    timesteps = bf16_task.schedule.num_timesteps
    batch = jax.tree.map(lambda x: np.resize(x, (timesteps, *x.shape[1:])), batch)  # example i at t = i

    @jax.jit
    def losses_and_grads(params):
        def total(params):
            losses = bf16_task.example_losses(params, batch, jax.random.key(0), t=jnp.arange(timesteps))
            return jnp.sum(losses["loss"]), losses

        return jax.grad(total, has_aux=True)(params)

    grads, losses = losses_and_grads(params)
    for name in ("loss", "mse", "vlb"):
        assert np.all(np.isfinite(losses[name])), name
    assert np.all(np.asarray(losses["vlb"]) > 0)
    # The tiny config weights the mse by Min-SNR-gamma.
    weights = diffusion.min_snr_weights(bf16_task.schedule, jnp.arange(timesteps), bf16_task.objective,
                                        config.diffusion.snr_gamma)
    assert config.diffusion.snr_gamma > 0
    np.testing.assert_allclose(losses["loss"], losses["mse"] * weights + 1e-3 * timesteps * losses["vlb"],
                               rtol=1e-5)
    # A sum of the per-example gradients: one non-finite example would make it non-finite.
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert float(optax.global_norm(grads)) > 0


def test_judge_scores_rendered_shapes():
    pairs = [(colour, shape) for colour in shapes.COLOUR_NAMES for shape in shapes.SHAPES]
    images = np.stack([shapes.render_shape(colour, shape, diameter=14, center=(16, 16), background="white",
                                           image_size=32) for colour, shape in pairs])
    colours, kinds = [c for c, _ in pairs], [s for _, s in pairs]
    perfect = decoder.judge_samples(images, colours, kinds)
    assert perfect == {"colour_acc": 1.0, "shape_acc": 1.0, "acc": 1.0,
                       "unseen/colour_acc": 1.0, "unseen/shape_acc": 1.0, "unseen/acc": 1.0}
    # Ask for the next colour of the palette: every colour is wrong, every shape still right.
    shifted = [shapes.COLOUR_NAMES[(shapes.COLOUR_NAMES.index(c) + 1) % 6] for c in colours]
    scored = decoder.judge_samples(images, shifted, kinds)
    assert scored == {"colour_acc": 0.0, "shape_acc": 1.0, "acc": 0.0,  # yellow/purple triangle and
                      "unseen/colour_acc": 0.0, "unseen/shape_acc": 1.0, "unseen/acc": 0.0}  # circle -> held out
    seen_only = decoder.judge_samples(images[:3], ["red"] * 3, ["circle", "circle", "circle"])
    assert seen_only == {"colour_acc": 1.0, "shape_acc": 1 / 3, "acc": 1 / 3}  # no held-out pair asked for
    blank = np.full((2, 32, 32, 3), 200, np.uint8)  # nothing to see: no colour, no shape
    assert decoder.judge_samples(blank, ["red", "purple"], ["circle", "triangle"]) == {
        "colour_acc": 0.0, "shape_acc": 0.0, "acc": 0.0,
        "unseen/colour_acc": 0.0, "unseen/shape_acc": 0.0, "unseen/acc": 0.0}


def test_downsample_is_the_block_mean_or_an_antialiased_resize():
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 12, 12, 3)), jnp.float32)
    np.testing.assert_allclose(decoder.downsample_images(images, 4),
                               images.reshape(2, 4, 3, 4, 3, 3).mean(axis=(2, 4)), atol=1e-6)
    assert decoder.downsample_images(images, 12) is images
    constant = jnp.full((1, 12, 12, 3), 0.25)
    np.testing.assert_allclose(decoder.downsample_images(constant, 5), 0.25, atol=1e-5)


def test_bad_configuration_raises(data_dir, clip_dir, tmp_path):
    def make(extra, workdir=None):
        config = config_util.load_config("configs/decoder.py:tiny", decoder_overrides(data_dir, clip_dir, extra))
        return decoder.make_task(config, workdir=workdir)

    with pytest.raises(FileNotFoundError, match="config.clip_dir"):
        make({"clip_dir": str(tmp_path / "no-clip")})
    with pytest.raises(FileNotFoundError, match="config.clip_dir"):
        make({"clip_dir": ""}, workdir=str(tmp_path / "decoder"))  # the default <workdir>/../clip
    with pytest.raises(ValueError, match="config.clip_dir"):
        make({"clip_dir": ""})
    with pytest.raises(ValueError, match="config.data.name"):
        make({"data.name": "imagenet"})
    with pytest.raises(ValueError, match="config.diffusion.drop_text_prob"):
        make({"diffusion.drop_text_prob": 1.5})
    with pytest.raises(ValueError, match="config.model.use_low_res"):
        make({"model.use_low_res": True})
    with pytest.raises(ValueError, match="config.data.image_size"):
        make({"data.image_size": 4})
    with pytest.raises(ValueError, match="config.image_embed_stats_examples"):
        make({"image_embed_stats_examples": -1})
    config = config_util.load_config("configs/decoder.py:tiny", decoder_overrides(data_dir, clip_dir))
    del config["data"]
    with pytest.raises(ValueError, match="config.data"):
        decoder.make_task(config)
