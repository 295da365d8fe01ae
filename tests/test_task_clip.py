"""The CLIP stage: global-batch contrastive loss, training through the entry point (tokenizer,
zero-shot eval), load_clip and the embedding export the prior reads."""
import json
import os

import jax
import numpy as np
import pytest

from dalle2_jax import cli, config_util, sharding
from dalle2_jax.data import embeddings, pipeline, shapes
from dalle2_jax.models.clip import normalize, preprocess_images
from dalle2_jax.tasks import clip as clip_task
from dalle2_jax.tokenizer import TOKENIZER_FILE, train_bpe_tokenizer
from dalle2_jax.training import entry, metrics

SHAPES_SIZES = dict(image_size=32, seed=0, num_train=192, num_test=40, num_test_unseen=24)
MODEL_OVERRIDES = dict(embed_dim=32, context_length=16, text_width=32, text_depth=1, text_heads=2,
                       text_mlp_dim=64, image_size=32, patch_size=8, vision_width=32, vision_depth=1,
                       vision_heads=2, vision_mlp_dim=64)
STEPS = 4
REFERENCE_ROWS = 40


def _overrides(data_dir, **extra):
    values = {f"model.{k}": v for k, v in MODEL_OVERRIDES.items()}
    values.update({f"data.{k}": v for k, v in SHAPES_SIZES.items()})
    values.update({"data.data_dir": data_dir, "total_steps": STEPS, "batch_size": 16, "log_every": 2,
                   "eval_every": 2, "checkpoint_every": 0, "progress_bar": False,
                   "eval.num_examples": 36, "eval.batch_size": 20})
    values.update(extra)
    return [f"--config.{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_dir):
    """A few loop steps of the tiny config (shrunk) through `dalle2-jax train clip`'s entry point."""
    workdir = str(tmp_path_factory.mktemp("run") / "clip")
    entry.run_train("clip", "configs/clip.py:tiny", workdir, _overrides(data_dir))
    return workdir


@pytest.fixture(scope="module")
def loaded(workdir):
    return clip_task.load_clip(workdir)


@pytest.fixture(scope="module")
def reference(loaded):
    """Direct `model.apply` on one device, compiled once for REFERENCE_ROWS rows:
    (images uint8 or [-1, 1], input_ids, attention_mask) -> (image embeds, text embeds, text encodings)."""
    model, variables, _, _ = loaded

    @jax.jit
    def encode(images, input_ids, attention_mask):
        pixels = preprocess_images(images, model.image_size, model.image_mean, model.image_std)
        out = model.apply(variables, input_ids, pixels, attention_mask)
        return out.image.embeds, out.text.embeds, out.text.encodings

    def run(images, input_ids, attention_mask):
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 127.5 - 1.0
        inputs = [_pad_rows(np.asarray(x)) for x in (images, input_ids, attention_mask)]
        image, text, encodings = (np.asarray(x) for x in encode(*inputs))
        return image[:len(images)], text[:len(input_ids)], encodings[:len(input_ids)]

    return run


def _pad_rows(array):
    return np.concatenate([array, np.zeros((REFERENCE_ROWS - len(array), *array.shape[1:]), array.dtype)])


def test_zero_shot_bookkeeping():
    captions = clip_task.zero_shot_captions()
    assert len(captions) == 18 and len(set(captions)) == 18
    assert captions[0] == "a red circle" and captions[5] == "a green triangle" and captions[17] == "a orange triangle"
    # Rows: best caption (colour, shape) vs. truth. Colour right only, shape right only, both, neither,
    # both, and a padding row that would be right but must not count.
    best = [(0, 1), (2, 2), (5, 0), (3, 1), (1, 2), (4, 1)]
    truth = [(0, 2), (1, 2), (5, 0), (4, 0), (1, 2), (4, 1)]
    scores = np.full((6, 18), -1.0, np.float32)
    for row, (colour, shape) in enumerate(best):
        scores[row, colour * 3 + shape] = 1.0
        assert captions[colour * 3 + shape] == f"a {shapes.COLOUR_NAMES[colour]} {shapes.SHAPES[shape]}"
    colour_ids, shape_ids = np.array(truth).T
    valid = np.array([1, 1, 1, 1, 1, 0], bool)
    counts = jax.jit(clip_task.zero_shot_counts)(scores, colour_ids, shape_ids, valid)
    np.testing.assert_array_equal(counts, [3, 3, 2, 5])
    assert clip_task.zero_shot_metrics(counts) == {"colour_acc": 0.6, "shape_acc": 0.6, "acc": 0.4}


def _info_nce(image, text, scale):
    """Symmetric InfoNCE in numpy (float64)."""
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    logits = scale * image.astype(np.float64) @ text.T.astype(np.float64)
    diagonal = np.diag(logits)
    row = np.log(np.exp(logits).sum(1)) - diagonal
    column = np.log(np.exp(logits).sum(0)) - diagonal
    return 0.5 * (row.mean() + column.mean())


@pytest.mark.parity_numpy
def test_loss_over_the_global_batch_is_the_unsharded_loss(loaded, reference, devices8):
    model, variables, _, config = loaded
    task = clip_task.make_task(config)  # config.data.data_dir is set
    rng = np.random.default_rng(0)
    batch_size, length = 16, model.context_length
    mask = (np.arange(length) < rng.integers(3, length, (batch_size, 1))).astype(np.int32)
    ids = np.where(mask, rng.integers(3, 200, (batch_size, length)), 0).astype(np.int32)
    ids[np.arange(batch_size), mask.sum(1) - 1] = model.eos_token_id
    batch = {"image": rng.uniform(-1, 1, (batch_size, 32, 32, 3)).astype(np.float32),
             "input_ids": ids, "attention_mask": mask}
    params = variables["params"]
    loss_fn = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(1))[0])
    one_device = float(loss_fn(jax.device_put(params, devices8[0]), jax.device_put(batch, devices8[0])))
    mesh = sharding.make_mesh(devices=devices8)
    sharded_batch = sharding.global_batch(batch, mesh)
    assert sharded_batch["image"].addressable_shards[0].data.shape == (2, 32, 32, 3)
    on_8 = float(loss_fn(jax.device_put(params, sharding.replicated(mesh)), sharded_batch))
    assert on_8 == pytest.approx(one_device, rel=1e-5)
    image, text, _ = reference(batch["image"], ids, mask)
    scale = min(float(np.exp(params["logit_scale"])), 100.0)
    assert on_8 == pytest.approx(_info_nce(image, text, scale), rel=1e-4)
    # The negatives span the whole batch: the mean of the per-device losses is another number.
    per_device = np.mean([_info_nce(image[i:i + 2], text[i:i + 2], scale) for i in range(0, batch_size, 2)])
    assert on_8 - per_device > 0.5  # 15 negatives per example instead of 1


def test_training_run_logs_zero_shot_eval_and_saves_the_tokenizer(workdir, data_dir):
    records = metrics.read_metrics(workdir)
    evals = [r for r in records if "eval/test/colour_acc" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        for split, count in (("test", 36), ("test_unseen", 24)):  # test_unseen has only 24 examples
            for name in ("colour_acc", "shape_acc", "acc"):
                value = record[f"eval/{split}/{name}"]
                assert 0.0 <= value <= 1.0
                assert value * count == pytest.approx(round(value * count), abs=1e-9)
            assert record[f"eval/{split}/acc"] <= min(record[f"eval/{split}/colour_acc"],
                                                      record[f"eval/{split}/shape_acc"])
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4] and all(np.isfinite(r["loss"]) for r in train_records)
    assert 0 <= train_records[-1]["image_to_text_acc"] <= 1 and train_records[-1]["logit_scale"] > 1
    # The tokenizer is the BPE of the training captions, deterministically.
    saved = open(os.path.join(workdir, "tokenizer", TOKENIZER_FILE), encoding="utf-8").read()
    builder = shapes.build_shapes(data_dir, **SHAPES_SIZES)
    captions = clip_task.read_captions(builder, "train")
    assert len(captions) == 192 and captions[0] == shapes.generate_example(0, "train", 0, 32)["caption"]
    retrained = train_bpe_tokenizer(captions, vocab_size=1024, context_length=16)
    assert json.loads(retrained.backend.to_str()) == json.loads(saved)
    assert retrained(["a red circle"])["input_ids"].shape == (1, 16)


def test_resumed_task_reuses_the_saved_tokenizer(workdir, tmp_path):
    config = config_util.load_config("configs/clip.py:tiny", _overrides(str(tmp_path / "no-data-here")))
    task = clip_task.make_task(config, workdir=workdir)
    tokens = task.tokenizer(["a purple triangle"])
    assert task._builder is None  # loaded, not retrained: the dataset was never needed
    assert not (tmp_path / "no-data-here").exists()
    assert tokens["input_ids"][0, 0] == 2 and 1 in tokens["input_ids"][0]


def test_zero_shot_eval_matches_a_direct_computation(workdir, loaded, reference, data_dir):
    """The accuracies logged at the last step (EMA params = the checkpoint's) against model.apply."""
    logged = [r for r in metrics.read_metrics(workdir) if "eval/test/acc" in r][-1]
    assert logged["step"] == STEPS
    model, variables, tokenizer, config = loaded
    builder = shapes.build_shapes(data_dir, **SHAPES_SIZES)
    captions = tokenizer(clip_task.zero_shot_captions())
    for split, count in (("test", 36), ("test_unseen", 24)):
        items = [builder.as_data_source(split)[i] for i in range(count)]
        image, text, _ = reference(np.stack([item["image"] for item in items]), captions["input_ids"],
                                   captions["attention_mask"])
        scores = np.asarray(normalize(image) @ normalize(text).T)
        top2 = np.sort(scores, axis=1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] > 1e-5)  # no near-ties: the argmax is well defined
        best = scores.argmax(1)
        colour_hit = best // 3 == np.array([item["colour"] for item in items])
        shape_hit = best % 3 == np.array([item["shape"] for item in items])
        assert logged[f"eval/{split}/colour_acc"] == colour_hit.sum() / count
        assert logged[f"eval/{split}/shape_acc"] == shape_hit.sum() / count
        assert logged[f"eval/{split}/acc"] == (colour_hit & shape_hit).sum() / count


def test_load_clip(workdir, loaded):
    model, variables, tokenizer, config = loaded
    assert model.embed_dim == 32 and model.context_length == 16 and model.image_size == 32
    assert config.data.num_train == 192 and tokenizer.context_length == 16
    assert tokenizer.eos_token_id == model.eos_token_id
    from dalle2_jax import checkpoint

    ema = checkpoint.load_params(workdir)
    raw = checkpoint.load_params(workdir, which="params")
    for got, want in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw)))
    with pytest.raises(FileNotFoundError, match="path"):
        clip_task.load_clip(os.path.join(workdir, "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        clip_task.load_clip(os.path.join(workdir, "tokenizer"))


def test_embed_writes_what_the_prior_reads(workdir, loaded, reference, data_dir, tmp_path):
    out_dir = str(tmp_path / "embeddings")
    # 40 examples in batches of 24 (padded to 24 rows on 8 devices; the last batch has 16).
    assert cli.main(["embed", "--clip", workdir, "--data", "shapes", "--out", out_dir, "--data-dir", data_dir,
                     "--split", "test", "--batch-size", "24"]) == 0
    source = embeddings.EmbeddingSource(out_dir)
    assert len(source) == 40
    tokenizer = loaded[2]
    builder = shapes.build_shapes(data_dir, **SHAPES_SIZES)
    items = [builder.as_data_source("test")[i] for i in range(40)]
    captions = [item["caption"].decode() for item in items]
    rows = [source[i] for i in range(40)]
    assert [row["caption"] for row in rows] == captions

    tokens = tokenizer(captions)
    image, text, encodings = reference(np.stack([item["image"] for item in items]), tokens["input_ids"],
                                       tokens["attention_mask"])
    stored = {key: np.stack([row[key] for row in rows]) for key in ("image_embed", "text_embed",
                                                                   "text_encodings", "text_mask")}
    assert stored["image_embed"].shape == (40, 32) and stored["image_embed"].dtype == np.float32
    assert stored["text_encodings"].shape == (40, 16, 32) and stored["text_encodings"].dtype == np.float16
    np.testing.assert_allclose(stored["image_embed"], normalize(image), atol=2e-6)
    np.testing.assert_allclose(stored["text_embed"], normalize(text), atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(stored["image_embed"], axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(stored["text_encodings"], encodings, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(stored["text_mask"], tokens["attention_mask"].astype(bool))

    # The prior's input pipeline reads it.
    batch = next(pipeline.make_embedding_iterator(source, batch_size=8, seed=0))
    assert batch["image_embed"].shape == (8, 32) and batch["text_encodings"].dtype == np.float32
    assert batch["text_mask"].dtype == bool and len(batch["caption"]) == 8


def test_bad_arguments_raise(workdir, data_dir, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        clip_task.run_embed(clip_dir=workdir, data="shapes", out_dir=str(tmp_path / "a"), batch_size=0)
    with pytest.raises(FileNotFoundError, match="data"):
        clip_task.run_embed(clip_dir=workdir, data=str(tmp_path / "nowhere"), out_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="split"):
        clip_task.run_embed(clip_dir=workdir, data="shapes", out_dir=str(tmp_path / "c"), data_dir=data_dir,
                            split="validation")
    assert not any((tmp_path / name).exists() for name in "abc")
    config = config_util.load_config("configs/clip.py:tiny", _overrides(data_dir, **{"data.name": "imagenet"}))
    with pytest.raises(ValueError, match="config.data.name"):
        clip_task.make_task(config)
    config = config_util.load_config("configs/clip.py:tiny", _overrides("", **{"data.name": "folder"}))
    with pytest.raises(ValueError, match="config.data.data_dir"):
        clip_task.make_task(config)
    task = clip_task.make_task(config, workdir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="config.data.source"):
        task.builder
