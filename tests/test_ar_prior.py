"""The autoregressive prior: PCA + quantizer, the KV-cached sampler, guidance, nucleus sampling,
the dot-product token, and the paper config's size."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dalle2_jax.models import ar_prior as ar
from dalle2_jax.models import pca_quantizer
from dalle2_jax.models.pca_quantizer import PCAQuantizer
from dalle2_jax.pipeline.stages import random_variables

EMBED_DIM, TEXT_LEN, TEXT_WIDTH = 8, 3, 4


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def spectrum_embeddings(rng, count, dim, num_large):
    """Unit embeddings around a mean direction whose spread has `num_large` large directions
    (std 1..0.3) and small noise in the rest (std 0.01)."""
    stds = np.concatenate([np.linspace(1.0, 0.3, num_large), np.full(dim - num_large, 0.01)])
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    return unit(3.0 * basis[0] + (rng.normal(size=(count, dim)) * stds) @ basis.T)


def test_pca_round_trip_keeps_the_variance_and_buckets_bound_the_error():
    rng = np.random.default_rng(0)
    image = spectrum_embeddings(rng, 4000, 64, 24)
    text = unit(image + 0.5 * rng.normal(size=image.shape))
    quantizer = PCAQuantizer.fit(image, text, num_components=24, num_buckets=256, num_dot_buckets=16)
    # Components are orthonormal and ordered by decreasing eigenvalue.
    np.testing.assert_allclose(quantizer.components @ quantizer.components.T, np.eye(24), atol=1e-10)
    assert np.all(np.diff(quantizer.eigenvalues) <= 1e-15)
    residual = image - quantizer.reconstruct(quantizer.project(image))
    kept = 1.0 - np.sum(residual**2) / np.sum((image - image.mean(0)) ** 2)
    assert kept >= 0.99 and quantizer.explained_variance >= 0.99, (kept, quantizer.explained_variance)
    # Fewer components than the spread has lose variance, as the eigenvalues say.
    few = PCAQuantizer.fit(image, text, num_components=4, num_buckets=256, num_dot_buckets=16)
    assert few.explained_variance < 0.6

    # Quantize / dequantize: each coefficient comes back within half a bucket width.
    tokens = quantizer.quantize(image)
    assert tokens.dtype == np.int32 and tokens.min() == 0 and tokens.max() == 255
    error = np.abs(quantizer.bucket_centres(tokens) - quantizer.project(image))
    assert np.all(error <= 0.5 * quantizer.bucket_width + 1e-12), error.max() / quantizer.bucket_width.max()
    round_trip = quantizer.dequantize(tokens)
    assert np.mean(np.sum(round_trip * image, -1)) > 0.995
    # The JAX dequantization the sampler uses is the same map.
    variables = jax.tree.map(jnp.asarray, quantizer.as_variables())
    np.testing.assert_allclose(pca_quantizer.decode_tokens(variables, jnp.asarray(tokens), 256), round_trip,
                               atol=2e-5)
    # Outside the fitted range: the end buckets.
    far = quantizer.mean + 100.0 * quantizer.components[0]
    assert quantizer.quantize(far[None])[0, 0] == 255 and quantizer.quantize(-far[None])[0, 0] == 0


def test_dot_buckets_hold_equal_mass_and_sampling_draws_the_top_half(tmp_path):
    rng = np.random.default_rng(1)
    image = unit(rng.normal(size=(3200, EMBED_DIM)))
    text = unit(image + rng.uniform(0.2, 3.0, (3200, 1)) * rng.normal(size=image.shape))
    quantizer = PCAQuantizer.fit(image, text, num_components=4, num_buckets=16, num_dot_buckets=8)
    counts = np.bincount(quantizer.dot_tokens(image, text), minlength=8)
    np.testing.assert_array_equal(counts, 400)  # 3200 distinct dots, 8 quantile buckets
    dots = np.sum(image * text, -1)
    top = quantizer.dot_tokens(image, text) >= 4
    assert dots[top].min() >= np.median(dots) - 1e-12
    drawn = np.asarray(ar.top_dot_tokens(jax.random.key(0), 4000, 8))
    assert drawn.min() == 4 and drawn.max() == 7 and np.all(np.abs(np.bincount(drawn)[4:] - 1000) < 120)

    path = tmp_path / "q.npz"
    quantizer.save(path)
    loaded = PCAQuantizer.load(path)
    for name in ("mean", "components", "low", "high", "dot_edges", "eigenvalues"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(quantizer, name))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="q.npz is corrupt"):
        PCAQuantizer.load(path)
    with pytest.raises(FileNotFoundError, match="no PCA quantizer file"):
        PCAQuantizer.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="num_components"):
        PCAQuantizer.fit(image, text, num_components=EMBED_DIM + 1, num_buckets=16, num_dot_buckets=8)


def small_model(**overrides):
    fields = dict(embed_dim=EMBED_DIM, text_encoding_dim=TEXT_WIDTH, max_text_len=TEXT_LEN + 1, num_components=6,
                  num_buckets=16, num_dot_buckets=4, width=32, depth=2, num_heads=2)
    return ar.ARPrior(**{**fields, **overrides})


def text_inputs(rng, batch):
    lengths = rng.integers(1, TEXT_LEN + 1, batch)
    return dict(text_embed=jnp.asarray(unit(rng.normal(size=(batch, EMBED_DIM))), jnp.float32),
                text_encodings=jnp.asarray(rng.normal(size=(batch, TEXT_LEN, TEXT_WIDTH)), jnp.float32),
                text_mask=jnp.asarray(np.arange(TEXT_LEN)[None] < lengths[:, None]))


@pytest.fixture(scope="module")
def random_prior():
    """A small ARPrior with random parameters and a random (but valid) quantizer."""
    model = small_model()
    rng = np.random.default_rng(2)
    text = text_inputs(rng, 4)
    dot = jnp.asarray(rng.integers(0, 4, 4), jnp.int32)
    abstract = jax.eval_shape(functools.partial(model.init, dot_token=dot, **text), jax.random.key(0),
                              jnp.zeros((4, 5), jnp.int32))
    # Host-drawn (no compiled initialiser), larger than the init: logits far from uniform, clear-cut argmaxes.
    params = jax.tree.map(jnp.asarray, random_variables(abstract["params"], seed=0, scale=2.0))
    image = spectrum_embeddings(rng, 200, EMBED_DIM, 6)
    quantizer = PCAQuantizer.fit(image, unit(image + rng.normal(size=image.shape)), num_components=6,
                                 num_buckets=16, num_dot_buckets=4)
    return model, {"params": params, "quantizer": jax.tree.map(jnp.asarray, quantizer.as_variables())}, text, dot


sample_tokens = jax.jit(ar.sample_tokens, static_argnames=("model", "temperature", "top_p"))


def test_kv_cached_sampler_equals_uncached_greedy_decoding(random_prior):
    model, variables, text, dot = random_prior
    params = {"params": variables["params"]}
    cached = sample_tokens(model, variables, jax.random.key(3), dot_token=dot, temperature=0.0, **text)
    # Uncached: the whole sequence through __call__ for every position (the tokens after it, still
    # zeros, are causally masked out).
    full_pass = jax.jit(lambda tokens: model.apply(params, tokens, dot_token=dot, **text))
    tokens = jnp.zeros((4, model.num_components - 1), jnp.int32)
    greedy = []
    for k in range(model.num_components):
        greedy.append(jnp.argmax(full_pass(tokens)[:, k], -1).astype(jnp.int32))
        if k < model.num_components - 1:
            tokens = tokens.at[:, k].set(greedy[-1])
    np.testing.assert_array_equal(cached, jnp.stack(greedy, axis=1))
    assert len(np.unique(np.asarray(cached))) > 3  # not one token repeated
    # The cached logits are the full pass's, position by position: a prefill with two tokens, then one at a time.
    prefill = jax.jit(lambda tokens: model.apply(params, tokens, dot_token=dot, decode=True, mutable=["cache"],
                                                 cache_len=TEXT_LEN + 2 + model.num_components, **text))
    step = jax.jit(lambda cache, token: model.apply({**params, **cache}, token, decode=True, mutable=["cache"]))
    logits, cache = prefill(tokens[:, :2])
    parts = [logits]
    for k in range(2, model.num_components - 1):
        logits, cache = step(cache, tokens[:, k:k + 1])
        parts.append(logits)
    np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full_pass(tokens), rtol=1e-5, atol=1e-4)


def test_guidance_scale_one_is_the_conditional_distribution(random_prior):
    model, variables, text, dot = random_prior
    rng = np.random.default_rng(4)
    cond, uncond = rng.normal(size=(2, 5, 16))
    np.testing.assert_array_equal(ar.guided_log_probs(jnp.asarray(np.concatenate([cond, uncond])), 1.0),
                                  jax.nn.log_softmax(jnp.asarray(cond)))
    guided = ar.guided_log_probs(jnp.asarray(np.concatenate([cond, uncond])), 3.0)
    expected = jax.nn.log_softmax(cond) + 2.0 * (jax.nn.log_softmax(cond) - jax.nn.log_softmax(uncond))
    np.testing.assert_allclose(guided, expected, atol=1e-5)
    # The sampler: [cond; uncond] at scale 1 draws the unguided sampler's tokens, key for key.
    unguided = sample_tokens(model, variables, jax.random.key(5), dot_token=dot, **text)
    at_one = sample_tokens(model, variables, jax.random.key(5), dot_token=dot, guidance_scale=1.0, **text)
    np.testing.assert_array_equal(at_one, unguided)
    at_three = sample_tokens(model, variables, jax.random.key(5), dot_token=dot, guidance_scale=3.0, **text)
    assert not np.array_equal(at_three, unguided)


def test_top_p_keeps_the_nucleus_and_temperature_zero_is_argmax():
    log_probs = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]] * 4000))
    keys = jax.random.key(6)
    full = np.bincount(np.asarray(ar.draw_tokens(keys, log_probs, 1.0, 1.0)), minlength=4) / 4000
    np.testing.assert_allclose(full, [0.05, 0.5, 0.15, 0.3], atol=0.03)
    nucleus = np.bincount(np.asarray(ar.draw_tokens(keys, log_probs, 1.0, 0.7)), minlength=4) / 4000
    # 0.5 + 0.3 reaches 0.7: tokens 1 and 3 only, renormalised to 5/8 and 3/8.
    assert nucleus[0] == 0 and nucleus[2] == 0
    np.testing.assert_allclose(nucleus[[1, 3]], [0.625, 0.375], atol=0.03)
    np.testing.assert_array_equal(ar.draw_tokens(keys, log_probs, 0.0, 1.0), 1)
    with pytest.raises(ValueError, match="top_p"):
        ar.sample_tokens(None, None, keys, text_embed=None, text_encodings=None, text_mask=None, dot_token=None,
                         top_p=0.0)


def dot_data(rng, count, captions):
    """Image embeddings at a drawn cosine c ~ U(0.1, 0.95) from their caption's z_t."""
    index = rng.integers(0, len(captions["text_embed"]), count)
    text_embed = captions["text_embed"][index]
    c = rng.uniform(0.1, 0.95, (count, 1))
    other = rng.normal(size=text_embed.shape)
    other = unit(other - np.sum(other * text_embed, -1, keepdims=True) * text_embed)
    image = c * text_embed + np.sqrt(1 - c**2) * other
    return image, {key: value[index] for key, value in captions.items()}


@pytest.mark.heavy
def test_the_dot_product_token_moves_the_cosine_with_z_t(scale):
    """Trained on pairs whose cosine varies, samples for the lowest dot bucket lie farther from
    z_t than those for the highest; the top-half default lies in between, nearer the top."""
    rng = np.random.default_rng(7)
    captions = {key: np.asarray(value) for key, value in text_inputs(rng, 4).items()}
    model = small_model(num_components=EMBED_DIM, num_buckets=16, width=64)
    image, text = dot_data(rng, 4000, captions)
    quantizer = PCAQuantizer.fit(image, text["text_embed"], num_components=EMBED_DIM, num_buckets=16,
                                 num_dot_buckets=4)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, EMBED_DIM - 1), jnp.int32),
                                 dot_token=jnp.zeros(1, int), **{k: v[:1] for k, v in text.items()})["params"]
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, batch, rng):
        def loss_fn(params):
            return ar.ar_prior_loss(model, {"params": params}, rng, text_drop_prob=0.1, **batch)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    for i in range(int(200 * scale)):
        image, text = dot_data(rng, 64, captions)
        batch = dict(image_tokens=quantizer.quantize(image), dot_token=quantizer.dot_tokens(image, text["text_embed"]),
                     **text)
        params, opt_state, loss = step(params, opt_state, batch, jax.random.key(i))
    variables = {"params": params, "quantizer": jax.tree.map(jnp.asarray, quantizer.as_variables())}
    rows = {key: jnp.asarray(np.repeat(value, 32, 0)) for key, value in captions.items()}

    def mean_cos(dot_tokens):
        sampled = ar.sample_image_embeddings_jit(model, variables, jax.random.key(1), dot_tokens=dot_tokens, **rows)
        return float(np.mean(np.sum(np.asarray(sampled) * np.asarray(rows["text_embed"]), -1)))

    low, high = mean_cos(jnp.zeros(128, jnp.int32)), mean_cos(jnp.full(128, 3, jnp.int32))
    default = mean_cos(None)
    print(f"cos(sampled z_i, z_t): lowest dot bucket {low:.3f}, highest {high:.3f}, top-half draw {default:.3f}")
    assert high > low + 0.2, (low, high)
    assert low < default < high, (low, default, high)
