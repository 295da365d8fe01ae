"""The autoregressive prior stage through the training loop: overfitting, the quantizer saved with
the workdir and reused on resume, export into a pipeline stage, and the paper config's size."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax import config_util, sharding
from dalle2_jax.data import embeddings
from dalle2_jax.models import ar_prior as ar
from dalle2_jax.models.pca_quantizer import FILE_NAME, PCAQuantizer
from dalle2_jax.pipeline import export
from dalle2_jax.tasks import ar_prior as ar_task
from dalle2_jax.training import loop, metrics

PAIRS, EMBED_DIM, TEXT_LEN, TEXT_WIDTH = 8, 16, 5, 8
BATCH, STEPS = 16, 80


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pairs(seed, count=PAIRS):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, TEXT_LEN + 1, count)
    return dict(image_embeds=unit(rng.normal(size=(count, EMBED_DIM))).astype(np.float32),
                text_embeds=unit(rng.normal(size=(count, EMBED_DIM))).astype(np.float32),
                text_encodings=rng.normal(size=(count, TEXT_LEN, TEXT_WIDTH)).astype(np.float16),
                text_mask=np.arange(TEXT_LEN)[None] < lengths[:, None])


def small_config(train_dir):
    config = config_util.load_config("configs/ar_prior.py:tiny")
    config.model.update(width=32, depth=2, num_heads=2, num_components=8, num_buckets=16, num_dot_buckets=4)
    config.data.train_dir = str(train_dir)
    config.data.eval_dirs = {"test": str(train_dir)}
    config.sampling.update(guidance_scale=1.0, temperature=1.0)
    config.text_drop_prob = 0.0  # memorising 8 pairs: dropped rows would have no single right answer
    config.update(dict(batch_size=BATCH, total_steps=STEPS, log_every=10, eval_every=STEPS, checkpoint_every=0,
                       progress_bar=False))
    config.optimizer.update(learning_rate=3e-3, warmup_steps=10, weight_decay=0.0)
    config.ema.decay = 0.9
    config.eval.update(num_examples=PAIRS, batch_size=PAIRS)
    return config


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    return embeddings.write_embedding_dataset(str(tmp_path_factory.mktemp("emb") / "train"), **pairs(0))


@pytest.fixture(scope="module")
def overfit(train_dir, tmp_path_factory, devices8):
    workdir = tmp_path_factory.mktemp("ar_overfit")
    config = small_config(train_dir)
    task = ar_task.make_task(config, workdir=str(workdir))
    state = loop.train(task, config, str(workdir), mesh=sharding.make_mesh(4, 2))
    return task, state, metrics.read_metrics(workdir), workdir


def sampled_cos(task, variables):
    rows = task.eval_rows("test")
    sampled = ar.sample_image_embeddings_jit(
        task.model, jax.tree.map(jnp.asarray, variables), jax.random.key(0), text_embed=rows["text_embed"],
        text_encodings=rows["text_encodings"], text_mask=rows["text_mask"],
        dot_tokens=task.quantizer.dot_tokens(rows["image_embed"], rows["text_embed"]))
    return float(np.mean(np.sum(np.asarray(sampled) * rows["image_embed"], -1)))


def test_overfitting_drops_the_token_cross_entropy_tenfold(overfit):
    task, state, log, workdir = overfit
    losses = [record["loss"] for record in log if "loss" in record]
    assert len(losses) == STEPS // 10
    assert losses[0] > 1.5 and losses[-1] < 0.1 * losses[0], losses  # ln 16 = 2.77 at the start
    final = [record for record in log if "eval/test/prior_cos" in record][-1]
    assert final["step"] == STEPS and abs(final["eval/test/baseline_cos"]) < 0.4, final
    # Given each pair's own dot-product token (evaluation draws it from the top half, which half
    # of 8 memorised pairs never had), the memorised tokens decode to the pairs' image embeddings.
    assert sampled_cos(task, {"params": state.ema_params, "quantizer": task.quantizer_variables}) > 0.9
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["kind"] == "ar"
    assert (saved["model"]["embed_dim"], saved["model"]["text_encoding_dim"],
            saved["model"]["max_text_len"]) == (EMBED_DIM, TEXT_WIDTH, TEXT_LEN)
    # The batches carried the float64 quantizer's tokens of the stored embeddings.
    batch = next(task.train_iterator(seed=0, process_index=0, process_count=1, per_process_batch=BATCH))
    np.testing.assert_array_equal(batch["image_tokens"], task.quantizer.quantize(batch["image_embed"]))
    np.testing.assert_array_equal(batch["dot_token"],
                                  task.quantizer.dot_tokens(batch["image_embed"], batch["text_embed"]))


def test_the_quantizer_is_saved_reused_and_exported(overfit, train_dir, tmp_path):
    task, state, _, workdir = overfit
    saved = PCAQuantizer.load(workdir / FILE_NAME)
    np.testing.assert_array_equal(saved.components, task.quantizer.components)
    # Resuming reads the file rather than refitting: a file that differs from a refit is what comes back.
    shifted = PCAQuantizer(**{**saved.__dict__, "low": saved.low - 0.5})
    other = tmp_path / "resume"
    other.mkdir()
    shifted.save(other / FILE_NAME)
    np.testing.assert_array_equal(ar_task.make_task(small_config(train_dir), workdir=str(other)).quantizer.low,
                                  shifted.low)
    (other / FILE_NAME).write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=f"workdir: the PCA quantizer .*{FILE_NAME} is corrupt"):
        ar_task.make_task(small_config(train_dir), workdir=str(other))
    wrong = small_config(train_dir)
    wrong.model.num_components = 4
    with pytest.raises(ValueError, match="num_components"):
        ar_task.make_task(wrong, workdir=str(workdir))

    # Export: the workdir's EMA parameters and its quantizer as one prior stage.
    stage = export._workdir_stage(workdir, "prior")
    assert isinstance(stage.module, ar.ARPrior) and stage.module.num_components == 8
    for name, value in saved.as_variables().items():
        np.testing.assert_array_equal(stage.variables["quantizer"][name], value)
    assert stage.module == task.model and sampled_cos(task, stage.variables) > 0.9


def test_paper_config_has_the_papers_parameter_count():
    config = config_util.load_config("configs/ar_prior.py:paper")
    model = ar.ARPrior(**config.model)
    assert (model.num_components, model.num_buckets, model.width, model.depth) == (319, 1024, 2048, 24)
    shapes = jax.eval_shape(
        lambda key: model.init(key, jnp.zeros((1, model.num_components - 1), jnp.int32),
                               text_embed=jnp.zeros((1, model.embed_dim)),
                               text_encodings=jnp.zeros((1, model.max_text_len, model.text_encoding_dim)),
                               text_mask=jnp.ones((1, model.max_text_len), bool), dot_token=jnp.zeros(1, jnp.int32)),
        jax.random.key(0))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))
    assert 0.95e9 < count < 1.1e9, count  # Table 3: 1B


def test_demo_and_export_choose_the_ar_prior(tmp_path):
    from dalle2_jax import cli, demo

    overrides = demo.stage_overrides("ar_prior", "quick", 0)
    assert f"--config.data.text_len={demo.PRIOR_TEXT_LEN}" in overrides and "--config.model.depth=1" in overrides
    args = cli.build_parser().parse_args(["demo", "--prior", "ar"])
    assert args.prior == "ar" and cli.build_parser().parse_args(["export", "--workdir", "w", "--out", "o",
                                                                  "--prior", "ar"]).prior == "ar"
    with pytest.raises(ValueError, match="prior: expected one of"):
        demo.run_demo(tmp_path / "demo", prior="autoregressive")
    with pytest.raises(ValueError, match="prior: expected one of"):
        export.export_pipeline(tmp_path, tmp_path / "out", prior="autoregressive")
    for name in ("clip", "prior", "decoder"):
        (tmp_path / name).mkdir()
    with pytest.raises(FileNotFoundError, match="no ar_prior/ training workdir"):
        export.export_pipeline(tmp_path, tmp_path / "out", prior="ar")
