"""The prior stage through the training loop: overfitting, mesh parity, text drops, the
clip-retrieval layout (no token encodings), and the cosine evaluation against z_t."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle2_jax import config_util, sharding
from dalle2_jax.data import embeddings
from dalle2_jax.tasks import prior as prior_task
from dalle2_jax.training import loop, metrics

PAIRS, EMBED_DIM, TEXT_LEN, TEXT_WIDTH = 8, 16, 5, 8
BATCH = 16
STEPS = 60  # of the overfitting run


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pairs(seed, count=PAIRS):
    """Unrelated unit image and text embeddings (cos ~ 0) with padded token encodings."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, TEXT_LEN + 1, count)
    return dict(image_embeds=unit(rng.normal(size=(count, EMBED_DIM))).astype(np.float32),
                text_embeds=unit(rng.normal(size=(count, EMBED_DIM))).astype(np.float32),
                text_encodings=rng.normal(size=(count, TEXT_LEN, TEXT_WIDTH)).astype(np.float16),
                text_mask=np.arange(TEXT_LEN)[None] < lengths[:, None])


def write_clip_retrieval(directory, seed, count=PAIRS):
    """img_emb/text_emb only, float16, not unit norm, shards numbered without padding."""
    data = pairs(seed, count)
    for folder, key in (("img_emb", "image_embeds"), ("text_emb", "text_embeds")):
        os.makedirs(os.path.join(directory, folder))
        np.save(os.path.join(directory, folder, f"{folder}_0.npy"), (3.0 * data[key]).astype(np.float16))
    return str(directory)


def small_config(train_dir, **overrides):
    config = config_util.load_config("configs/prior.py:tiny")
    config.model.update(embed_dim=None, text_encoding_dim=None, max_text_len=None, width=32, depth=2,
                        num_heads=2, embed_scale=4.0)
    config.data.train_dir = str(train_dir)
    config.data.eval_dirs = {"test": str(train_dir)}
    config.diffusion.update(sampling_steps=8, guidance_scale=1.0, num_candidates=2)
    config.update(dict(batch_size=BATCH, total_steps=STEPS, log_every=10, eval_every=0, checkpoint_every=0,
                       progress_bar=False))
    config.optimizer.update(learning_rate=3e-3, warmup_steps=10, weight_decay=0.0)
    config.ema.decay = 0.9
    config.eval.update(num_examples=PAIRS, batch_size=PAIRS)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    return embeddings.write_embedding_dataset(str(tmp_path_factory.mktemp("emb") / "train"), **pairs(0))


@pytest.fixture(scope="module")
def overfit(train_dir, tmp_path_factory, devices8):
    """STEPS steps on the 8 pairs over a 4 x 2 mesh, evaluated on the same pairs at the end."""
    workdir = tmp_path_factory.mktemp("overfit")
    config = small_config(train_dir, eval_every=STEPS)
    task = prior_task.make_task(config, workdir=str(workdir))
    state = loop.train(task, config, str(workdir), mesh=sharding.make_mesh(4, 2))
    return task, state, metrics.read_metrics(workdir), workdir


@pytest.mark.heavy
def test_training_lowers_the_loss_and_overfits_the_pairs(overfit):
    task, state, log, workdir = overfit
    losses = [record["loss"] for record in log if "loss" in record]
    assert len(losses) == STEPS // 10 and np.mean(losses[-2:]) < 0.2 * np.mean(losses[:2]), losses
    final = [record for record in log if "eval/test/prior_cos" in record]
    assert [record["step"] for record in final] == [STEPS]
    assert final[0]["eval/test/prior_cos"] >= 0.95, final
    assert abs(final[0]["eval/test/baseline_cos"]) < 0.3, final
    # The sizes left None were read from the data and recorded for whoever rebuilds the model.
    saved = json.loads((workdir / "config.json").read_text())["model"]
    assert (saved["embed_dim"], saved["text_encoding_dim"], saved["max_text_len"]) == (EMBED_DIM, TEXT_WIDTH,
                                                                                        TEXT_LEN)
    assert task.use_text_encodings and int(state.step) == STEPS


@pytest.mark.heavy
def test_evaluation_cosines_by_hand(overfit):
    task, state, log, _ = overfit
    rows = task.eval_rows("test")
    data = pairs(0)
    np.testing.assert_array_equal(rows["text_mask"], data["text_mask"])
    got = task.evaluate(state.ema_params, step=STEPS, workdir="unused")
    assert got == {key[len("eval/"):]: value for key, value in log[-1].items() if key.startswith("eval/")}
    baseline = np.mean(np.sum(data["text_embeds"].astype(np.float64) * data["image_embeds"], axis=-1))
    np.testing.assert_allclose(got["test/baseline_cos"], baseline, rtol=1e-6)
    # prior_cos: the mean cosine of the unit samples the task draws (fold_in(key(eval.seed), chunk)).
    sampled = task.sample(state.ema_params, rows)
    np.testing.assert_allclose(np.linalg.norm(sampled, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got["test/prior_cos"], np.mean(np.sum(sampled * data["image_embeds"], axis=-1)),
                               rtol=1e-5)
    assert not np.array_equal(task.sample(state.ema_params, rows, jax.random.key(1)), sampled)


@pytest.fixture(scope="module")
def loss_and_grads(overfit):
    """jit(value_and_grad(task.loss)) of the overfitting run's task, a 512-row batch of its pairs and
    the same batch with other text."""
    task = overfit[0]
    rng = np.random.default_rng(1)
    size = 512
    data = {key: np.tile(value, (size // PAIRS,) + (1,) * (value.ndim - 1)) for key, value in pairs(0).items()}
    batch = {"image_embed": data["image_embeds"], "text_embed": data["text_embeds"],
             "text_encodings": data["text_encodings"].astype(np.float32), "text_mask": data["text_mask"]}
    other_text = dict(batch, text_embed=unit(rng.normal(size=(size, EMBED_DIM))).astype(np.float32),
                      text_encodings=rng.normal(size=(size, TEXT_LEN, TEXT_WIDTH)).astype(np.float32))
    return jax.jit(jax.value_and_grad(task.loss, has_aux=True)), batch, other_text


def on_device(tree, mesh):
    """Replicated over `mesh`, so that calls with either placement reuse one compiled program."""
    return jax.device_put(tree, sharding.replicated(mesh))


@pytest.mark.heavy
def test_sgd_steps_on_eight_devices_equal_one_device(overfit, loss_and_grads, devices8):
    """The loss's draws (timesteps, noise, text drops) do not depend on how the batch is laid out."""
    state = overfit[1]
    function, batch, _ = loss_and_grads
    runs = {}
    for name, mesh in (("one", sharding.make_mesh(devices=devices8[:1])), ("eight", sharding.make_mesh(8, 1))):
        params, losses = jax.device_get(state.params), []
        for step in range(3):
            (loss, aux), grads = function(on_device(params, mesh), sharding.global_batch(batch, mesh),
                                          jax.random.key(step))
            params = jax.tree.map(lambda p, g: np.asarray(p) - 0.05 * np.asarray(g), params, grads)
            losses.append((float(loss), float(aux["text_drop_rate"])))
        runs[name] = params, losses
    np.testing.assert_allclose(runs["eight"][1], runs["one"][1], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(runs["eight"][0]), jax.tree.leaves(runs["one"][0])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(runs["one"][0]), jax.tree.leaves(state.params))]
    assert max(moved) > 1e-3


def test_text_drop_takes_the_null_path_at_the_configured_rate(overfit, loss_and_grads, train_dir, devices8):
    mesh = sharding.make_mesh(devices=devices8[:1])
    function, batch, other_text = (on_device(x, mesh) if i else x for i, x in enumerate(loss_and_grads))
    params = on_device(jax.device_get(overfit[1].params), mesh)
    key = jax.random.key(3)
    # The configured 0.1 (the paper's): binomial(512, 0.1) / 512 has sd 0.013.
    (loss, aux), _ = function(params, batch, key)
    assert overfit[0].text_drop_prob == 0.1 and abs(float(aux["text_drop_rate"]) - 0.1) < 0.04, aux
    assert float(function(params, batch, key)[0][0]) == float(loss)  # the draws come from the key alone
    assert float(function(params, batch, jax.random.key(4))[0][1]["text_drop_rate"]) != float(aux["text_drop_rate"])
    assert abs(float(function(params, other_text, key)[0][0]) - float(loss)) > 1e-3 * float(loss)
    # With 1.0 every example sees the learned null: the text cannot matter.
    task = prior_task.make_task(small_config(train_dir, **{"diffusion.text_drop_prob": 1.0}))
    loss_all_dropped = jax.jit(task.loss)
    (same, aux), (other, _) = loss_all_dropped(params, batch, key), loss_all_dropped(params, other_text, key)
    assert float(aux["text_drop_rate"]) == 1.0 and float(same) == float(other)


def numpy_params(abstract, seed):
    """Parameters of `abstract`'s shapes drawn with NumPy: no init program to compile."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [getattr(p, "key", "") for p in path]
        name = names[-1]
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1]) if "to_out" in names else leaf.shape[0]
            return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
        return (0.02 * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.mark.heavy
def test_clip_retrieval_layout_trains_on_z_t_alone(tmp_path, scale):
    train_dir = write_clip_retrieval(tmp_path / "clip_retrieval", seed=5)
    config = small_config(train_dir)
    task = prior_task.make_task(config)
    assert not task.use_text_encodings and config.data.use_text_encodings is False
    assert (task.model.embed_dim, task.model.text_encoding_dim, task.model.max_text_len) == (EMBED_DIM, 1, 1)
    iterator = task.train_iterator(seed=0, process_index=0, process_count=1, per_process_batch=BATCH)
    batches = [next(iterator) for _ in range(4)]
    assert sorted(batches[0]) == ["image_embed", "text_embed"] and batches[0]["image_embed"].dtype == np.float32
    params = numpy_params(jax.eval_shape(task.init_params, jax.random.key(0), batches[0]), seed=0)
    stacked = jax.tree.map(lambda *b: jnp.asarray(np.stack(b)), *batches)
    optimizer = optax.adam(3e-3)
    steps = max(100, round(200 * scale))

    @jax.jit
    def train(params):
        def step(carry, i):
            params, opt_state = carry
            batch = jax.tree.map(lambda b: b[i % len(batches)], stacked)
            (loss, _), grads = jax.value_and_grad(task.loss, has_aux=True)(params, batch, jax.random.key(i))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(steps))
        return params, losses

    trained, losses = jax.device_get(train(params))
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:20]), losses[::20]
    cosines = task.cosine_similarities(trained, task.eval_rows("test"))  # the training pairs, float16 on disk
    assert cosines["prior_cos"] >= 0.9 and abs(cosines["baseline_cos"]) < 0.3, cosines


def test_bad_configs_raise(train_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.data.train_dir"):
        prior_task.make_task(small_config(tmp_path / "missing"))
    config = small_config(train_dir)
    config.data.train_dir = ""
    with pytest.raises(ValueError, match="config.data.train_dir: required"):
        prior_task.make_task(config)
    with pytest.raises(ValueError, match=r"config.model.embed_dim: 64 does not match the training set's 16"):
        prior_task.make_task(small_config(train_dir, **{"model.embed_dim": 64}))
    with pytest.raises(ValueError, match=r"config.model.max_text_len: 3 is shorter"):
        prior_task.make_task(small_config(train_dir, **{"model.max_text_len": 3}))
    with pytest.raises(ValueError, match=r"config.diffusion.text_drop_prob: expected a probability"):
        prior_task.make_task(small_config(train_dir, **{"diffusion.text_drop_prob": 1.5}))
    with pytest.raises(FileNotFoundError, match="config.data.eval_dirs.test"):
        prior_task.make_task(small_config(train_dir, **{"data.eval_dirs": {"test": str(tmp_path / "nope")}}))
    retrieval = write_clip_retrieval(tmp_path / "retrieval", seed=6)
    with pytest.raises(ValueError, match="config.data.use_text_encodings: True"):
        prior_task.make_task(small_config(retrieval, **{"data.use_text_encodings": True}))
    # An evaluation set whose embeddings do not fit the training set's.
    task = prior_task.make_task(small_config(train_dir, **{"data.eval_dirs": {"test": retrieval}}))
    with pytest.raises(ValueError, match="config.data.eval_dirs.test: expected text encodings"):
        task.eval_rows("test")
    # Defaulted evaluation sets that do not exist are skipped; the defaults sit beside train_dir.
    config = small_config(train_dir, **{"data.eval_dirs": {"test": "", "test_unseen": ""}})
    assert prior_task.make_task(config).eval_dirs == {}
    assert prior_task.default_train_dir(tmp_path / "runs" / "prior") == str(tmp_path / "runs" / "embeddings" / "train")


def test_text_len_cuts_the_padding_and_refuses_longer_captions(train_dir, tmp_path):
    """config.data.text_len trains on the first N token positions (the padding after them costs
    attention for nothing); a row with a real token past N is an error, not a silent cut."""
    short = pairs(7, count=PAIRS)
    short["text_mask"][:, 3:] = False
    short_dir = embeddings.write_embedding_dataset(str(tmp_path / "short"), **short)
    task = prior_task.make_task(small_config(short_dir, **{"data.text_len": 3}))
    assert task.model.max_text_len == TEXT_LEN  # the model keeps the stored length: CLIP's context
    batch = next(task.train_iterator(seed=0, process_index=0, process_count=1, per_process_batch=PAIRS))
    assert batch["text_encodings"].shape == (PAIRS, 3, TEXT_WIDTH) and batch["text_mask"].shape == (PAIRS, 3)
    rows = task.eval_rows("test")
    np.testing.assert_array_equal(rows["text_mask"], short["text_mask"][:, :3])
    np.testing.assert_allclose(rows["text_encodings"], short["text_encodings"][:, :3].astype(np.float32))
    # Only the real tokens matter: the cut rows give the loss of the full-length rows.
    full_task = prior_task.make_task(small_config(short_dir))
    full = next(full_task.train_iterator(seed=0, process_index=0, process_count=1, per_process_batch=PAIRS))
    params = numpy_params(jax.eval_shape(task.init_params, jax.random.key(0), batch), seed=1)
    cut_loss, _ = task.loss(params, batch, jax.random.key(3), train=False)
    full_loss, _ = full_task.loss(params, full, jax.random.key(3), train=False)
    np.testing.assert_allclose(cut_loss, full_loss, rtol=1e-5)

    long_task = prior_task.make_task(small_config(train_dir, **{"data.text_len": 3}))
    with pytest.raises(ValueError, match="config.data.text_len"):
        long_task.eval_rows("test")
