"""Diffusion prior: model invariants, guidance, reranking, sharding, configs, and an overfit run."""
import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle2_jax import diffusion, sharding
from dalle2_jax.models import prior as prior_lib
from dalle2_jax.models.prior import DiffusionPrior

EMBED_DIM, TEXT_WIDTH, MAX_LEN = 32, 24, 6
TINY = dict(embed_dim=EMBED_DIM, text_encoding_dim=TEXT_WIDTH, max_text_len=MAX_LEN, width=64, depth=2,
            num_heads=4, embed_scale=float(np.sqrt(EMBED_DIM)))
REPO = pathlib.Path(__file__).resolve().parent.parent


def load_prior_config(variant):
    spec = importlib.util.spec_from_file_location("prior_config", REPO / "configs" / "prior.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def text_inputs(seed, batch, length=MAX_LEN, lengths=None):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, length + 1, batch) if lengths is None else np.asarray(lengths)
    return dict(
        text_embed=jnp.asarray(unit(rng.normal(size=(batch, EMBED_DIM))), jnp.float32),
        text_encodings=jnp.asarray(rng.normal(size=(batch, length, TEXT_WIDTH)), jnp.float32),
        text_mask=jnp.asarray(np.arange(length)[None] < lengths[:, None]),
    )


def numpy_params(model, seed=0):
    """Parameters of the shapes `model.init` makes, drawn with NumPy: no init program to compile."""
    batch = 2
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((batch, model.embed_dim)),
                              jnp.zeros((batch,), jnp.int32), **text_inputs(0, batch))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [getattr(p, "key", "") for p in path]
        if names[-1] == "scale":
            return jnp.ones(leaf.shape)
        if names[-1] == "bias":
            return jnp.zeros(leaf.shape)
        if names[-1] == "kernel":
            fan_in = np.prod(leaf.shape[:-1]) if "to_out" in names else leaf.shape[0]
            return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)
        return jnp.asarray(0.02 * rng.normal(size=leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def model():
    return DiffusionPrior(**TINY)


@pytest.fixture(scope="module")
def params(model):
    return numpy_params(model)


@pytest.fixture(scope="module")
def forward(model):
    return jax.jit(model.apply)


def noised(seed, batch):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(batch, EMBED_DIM)) * 3.0, jnp.float32),
            jnp.asarray(rng.integers(0, 1000, batch), jnp.int32))


def test_prior_scale_round_trip():
    embed = jnp.asarray([[3.0, 4.0], [0.0, -2.0]])
    scaled = prior_lib.to_prior_scale(embed, 17.2)
    np.testing.assert_allclose(scaled, [[17.2 * 0.6, 17.2 * 0.8], [0.0, -17.2]], rtol=1e-6)
    np.testing.assert_allclose(prior_lib.from_prior_scale(scaled), [[0.6, 0.8], [0.0, -1.0]], rtol=1e-6)


def test_timestep_embedding_is_cos_then_sin():
    features = prior_lib.timestep_embedding(jnp.asarray([0, 3]), 6)
    freqs = np.exp(-np.log(10000.0) * np.arange(3) / 3)
    np.testing.assert_allclose(features[0], [1, 1, 1, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(features[1], np.r_[np.cos(3 * freqs), np.sin(3 * freqs)], rtol=1e-5)


def test_dropped_text_ignores_text_inputs(params, forward):
    x, t = noised(1, 4)
    text_a, text_b = text_inputs(2, 4), text_inputs(3, 4)
    all_dropped = jnp.ones((4,), bool)
    np.testing.assert_array_equal(forward(params, x, t, **text_a, drop_text=all_dropped),
                                  forward(params, x, t, **text_b, drop_text=all_dropped))
    some_dropped = jnp.asarray([True, False, True, False])
    out_a = np.asarray(forward(params, x, t, **text_a, drop_text=some_dropped))
    out_b = np.asarray(forward(params, x, t, **text_b, drop_text=some_dropped))
    np.testing.assert_array_equal(out_a[[0, 2]], out_b[[0, 2]])
    assert np.abs(out_a[[1, 3]] - out_b[[1, 3]]).max(axis=-1).min() > 1e-3, "kept text must matter"
    kept = forward(params, x, t, **text_a, drop_text=jnp.zeros((4,), bool))
    np.testing.assert_array_equal(kept, forward(params, x, t, **text_a))
    assert np.abs(kept[0] - out_a[0]).max() > 1e-3, "the null text must differ from the text"


def test_padded_text_positions_do_not_change_output(params, forward):
    x, t = noised(4, 4)
    text = text_inputs(5, 4, lengths=[6, 3, 1, 4])
    reference = forward(params, x, t, **text)
    garbage = dict(text, text_encodings=jnp.where(text["text_mask"][..., None], text["text_encodings"], 1e3))
    np.testing.assert_array_equal(forward(params, x, t, **garbage), reference)
    shorter = {k: v[:, :4] if k != "text_embed" else v for k, v in text.items()}
    shorter_ref = forward(params, x[1:], t[1:], **{k: v[1:] for k, v in shorter.items()})
    np.testing.assert_allclose(shorter_ref, reference[1:], atol=1e-5)


def test_text_cache_matches_full_forward(model, params, forward):
    x, t = noised(6, 4)
    text = text_inputs(7, 4)
    drop = jnp.asarray([False, True, False, True])

    @jax.jit
    def cached(params, x, t, text, drop):
        cache = model.apply(params, **text, drop_text=drop, method="encode_text")
        return model.apply(params, x, t, text_cache=cache, method="denoise")

    np.testing.assert_allclose(cached(params, x, t, text, drop), forward(params, x, t, **text, drop_text=drop),
                               atol=1e-5)


def test_rerank_keeps_largest_dot_product():
    rng = np.random.default_rng(8)
    text_embed = unit(rng.normal(size=(3, 16)))
    candidates = unit(rng.normal(size=(3, 4, 16)))
    best = [2, 0, 3]
    for row, k in enumerate(best):  # a planted winner, dot product ~0.95 against ~0.25 for the rest
        candidates[row, k] = unit(text_embed[row] + 0.3 * candidates[row, k])
    candidates = candidates.astype(np.float32)
    assert list(np.einsum("bkd,bd->bk", candidates, text_embed).argmax(1)) == best
    kept = prior_lib.rerank_by_similarity(jnp.asarray(candidates), 5.0 * jnp.asarray(text_embed))
    np.testing.assert_array_equal(kept, candidates[np.arange(3), best])


RECORDED = []


class RecordingPrior(DiffusionPrior):
    """Records the text-drop flags and the denoised batch size seen while sampling."""

    def encode_text(self, text_embed, text_encodings, text_mask, drop_text=None):
        RECORDED.append(("encode_text", None if drop_text is None else "traced"))
        if drop_text is not None:
            jax.debug.callback(lambda flags: RECORDED.append(("drop_text", np.asarray(flags))), drop_text)
        return super().encode_text(text_embed, text_encodings, text_mask, drop_text)

    def denoise(self, noised_image_embed, t, *, text_cache):
        RECORDED.append(("denoise_batch", noised_image_embed.shape[0]))
        return super().denoise(noised_image_embed, t, text_cache=text_cache)


def test_guided_sampling_runs_text_and_null_text_as_one_batch(params):
    RECORDED.clear()
    recording = RecordingPrior(**TINY)
    out = prior_lib.sample_image_embeddings_jit(
        recording, params, jax.random.key(9), **text_inputs(10, 3), schedule=diffusion.make_schedule("cosine", 100),
        steps=2, guidance_scale=3.0, num_candidates=2)
    out = np.asarray(out)
    assert out.shape == (3, EMBED_DIM)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)
    flags = [entry[1] for entry in RECORDED if entry[0] == "drop_text"]
    assert len(flags) == 1, "text and null text are encoded once, together"
    np.testing.assert_array_equal(flags[0], [False] * 6 + [True] * 6)
    assert {entry[1] for entry in RECORDED if entry[0] == "denoise_batch"} == {12}


def test_bad_inputs_raise_value_error(model, params):
    x, t = noised(11, 2)
    text = text_inputs(12, 2)
    apply = functools.partial(jax.eval_shape, model.apply, params)
    with pytest.raises(ValueError, match="text_encodings"):
        apply(x, t, **dict(text, text_encodings=jnp.zeros((2, MAX_LEN + 1, TEXT_WIDTH)),
                           text_mask=jnp.ones((2, MAX_LEN + 1), bool)))
    with pytest.raises(ValueError, match="text_mask"):
        apply(x, t, **dict(text, text_mask=text["text_mask"][:, :3]))
    with pytest.raises(ValueError, match="noised_image_embed"):
        apply(x[:, :5], t, **text)
    with pytest.raises(ValueError, match="drop_text"):
        apply(x, t, **text, drop_text=jnp.zeros((3,), bool))
    with pytest.raises(ValueError, match="objective"):
        jax.eval_shape(DiffusionPrior(**dict(TINY, objective="score")).apply, params, x, t, **text)
    schedule = diffusion.make_schedule("cosine", 100)
    with pytest.raises(ValueError, match="sampler"):
        prior_lib.sample_image_embeddings(model, params, jax.random.key(0), **text, schedule=schedule,
                                          sampler="euler")
    with pytest.raises(ValueError, match="num_candidates"):
        prior_lib.sample_image_embeddings(model, params, jax.random.key(0), **text, schedule=schedule,
                                          num_candidates=0)
    with pytest.raises(ValueError, match="variant"):
        load_prior_config("huge")


def test_sharded_loss_and_forward_match_unsharded(model, params, devices8):
    batch = dict(text_inputs(13, 8), image_embed=jnp.asarray(unit(np.random.default_rng(14).normal(
        size=(8, EMBED_DIM))), jnp.float32))
    x, t = noised(15, 8)
    schedule = diffusion.make_schedule("cosine", 1000)
    rng = jax.random.key(16)

    def loss_and_forward(params, batch, x, t, rng):
        text = {k: batch[k] for k in ("text_embed", "text_encodings", "text_mask")}
        loss, metrics = prior_lib.prior_loss(model, params, rng, schedule=schedule, **batch)
        return loss, metrics, model.apply(params, x, t, **text)

    one_device = jax.sharding.SingleDeviceSharding(devices8[0])
    expected = jax.jit(loss_and_forward)(*jax.device_put((params, batch, x, t, rng), one_device))

    mesh = sharding.make_mesh(data=2, fsdp=4, devices=devices8)
    sharded_params = jax.device_put(params, sharding.param_shardings(params, mesh, min_fsdp_size=0))
    sharded_inputs = jax.device_put((batch, x, t), sharding.batch_sharding(mesh))
    got = jax.jit(loss_and_forward)(sharded_params, *sharded_inputs, rng)
    assert len(got[2].sharding.device_set) == 8
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
    np.testing.assert_allclose(got[1]["text_drop_rate"], expected[1]["text_drop_rate"])
    np.testing.assert_allclose(got[2], expected[2], atol=1e-5)


def test_configs_build_and_paper_prior_has_one_billion_parameters():
    counts = {}
    for variant in ("tiny", "base", "paper", "bench"):
        config = load_prior_config(variant)
        model = DiffusionPrior(**config.model)
        assert config.diffusion.objective == model.objective and config.diffusion.embed_scale == model.embed_scale
        batch, length = 2, config.model.max_text_len
        abstract = jax.eval_shape(
            model.init, jax.random.key(0), jnp.zeros((batch, model.embed_dim)), jnp.zeros((batch,), jnp.int32),
            text_embed=jnp.ones((batch, model.embed_dim)),
            text_encodings=jnp.zeros((batch, length, model.text_encoding_dim)),
            text_mask=jnp.ones((batch, length), bool))
        counts[variant] = sum(leaf.size for leaf in jax.tree.leaves(abstract))
    assert abs(counts["paper"] / 1.0e9 - 1.0) <= 0.05, counts
    assert counts["tiny"] < counts["bench"] < counts["base"] < counts["paper"]
    bench = load_prior_config("bench").model
    assert (bench.width, bench.depth, bench.num_heads, bench.max_text_len) == (512, 6, 8, 77)


@pytest.mark.heavy
def test_overfit_eight_pairs_then_sample(model, params, scale):
    """Adam on 8 (z_t, text, z_i) triples; DDIM samples then land on each z_i."""
    pairs = 8
    text = text_inputs(17, pairs)
    image_embed = jnp.asarray(unit(np.random.default_rng(18).normal(size=(pairs, EMBED_DIM))), jnp.float32)
    repeats = max(2, round(4 * scale))  # every step sees each triple at `repeats` noise levels
    batch = jax.tree.map(lambda a: jnp.tile(a, (repeats,) + (1,) * (a.ndim - 1)),
                         dict(text, image_embed=image_embed))
    schedule = diffusion.make_schedule("cosine", 1000)
    optimizer = optax.adam(3e-3)

    @jax.jit
    def train(params, rng):
        def step(carry, i):
            params, opt_state = carry
            grads, _ = jax.grad(prior_lib.prior_loss, argnums=1, has_aux=True)(
                model, params, jax.random.fold_in(rng, i), schedule=schedule, text_drop_prob=0.1, **batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(300))
        return params

    trained = train(params, jax.random.key(19))
    sample = functools.partial(prior_lib.sample_image_embeddings_jit, model, trained, jax.random.key(20), **text,
                               schedule=schedule, steps=8, guidance_scale=1.0, num_candidates=2)
    samples = np.asarray(sample())
    cosine = np.sum(samples * np.asarray(image_embed), axis=-1)
    assert cosine.min() >= 0.99, cosine
    np.testing.assert_array_equal(sample(), samples)
