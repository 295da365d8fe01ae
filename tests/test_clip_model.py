"""The CLIP module, its contrastive loss and image preprocessing."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs.clip import VARIANTS, get_config
from dalle2_jax.models.clip import (
    CLIP,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    clip_contrastive_loss,
    preprocess_images,
)

BATCH, CONTEXT, IMAGE = 16, 8, 32


def _tiny_model(**overrides):
    """The "tiny" config at test size: 32px images, 8 tokens, 1 layer per tower."""
    fields = dict(get_config("tiny").model)
    fields.update(image_size=IMAGE, context_length=CONTEXT, text_depth=1, vision_depth=1)
    fields.update(overrides)
    return CLIP(**fields)


def _pairs(seed=0):
    """16 distinct random images in [-1, 1] and 16 distinct padded captions ending in eos."""
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-1, 1, (BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
    input_ids = np.zeros((BATCH, CONTEXT), np.int32)
    attention_mask = np.zeros((BATCH, CONTEXT), np.int32)
    for row in range(BATCH):
        n = 3 + row % 5
        input_ids[row, :n] = [2, *rng.integers(3, 1024, n - 2), 1]  # <|startoftext|> ... <|endoftext|>
        attention_mask[row, :n] = 1
    return jnp.asarray(input_ids), jnp.asarray(attention_mask), jnp.asarray(pixels)


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.fixture(scope="module")
def pairs():
    return _pairs()


@pytest.fixture(scope="module")
def init_params(model, pairs):
    input_ids, attention_mask, pixels = pairs
    # An RngBitGenerator key: XLA:CPU compiles the init's ~30 normal draws in half the threefry time.
    return jax.jit(model.init)(jax.random.key(0, impl="unsafe_rbg"), input_ids, pixels, attention_mask)


@pytest.fixture(scope="module")
def forward(model):
    return jax.jit(model.apply)


@pytest.fixture(scope="module")
def encode_text(model):
    return jax.jit(lambda params, ids, mask: model.apply(params, ids, mask, method=CLIP.encode_text))


def _retrieval_accuracy(logits):
    labels = np.arange(logits.shape[0])
    return (np.argmax(logits, 1) == labels).mean(), (np.argmax(logits, 0) == labels).mean()


@pytest.mark.heavy
def test_overfits_16_pairs(model, pairs, init_params, forward, scale):
    input_ids, attention_mask, pixels = pairs
    optimizer = optax.adam(1e-3)

    def loss_fn(params):
        out = model.apply(params, input_ids, pixels, attention_mask)
        return clip_contrastive_loss(out.image.embeds, out.text.embeds, out.logit_scale)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    before = forward(init_params, input_ids, pixels, attention_mask)
    params, opt_state, losses = init_params, optimizer.init(init_params), []
    for _ in range(max(30, round(60 * scale))):  # random pairs separate in ~10 steps
        params, opt_state, loss = step(params, opt_state)
        losses.append(loss)
    after = forward(params, input_ids, pixels, attention_mask)
    losses = np.asarray(losses)
    assert losses[0] > 0.5 * math.log(BATCH)  # chance level is log(16) = 2.77
    assert losses[-1] < 0.05, losses[::5]
    assert min(_retrieval_accuracy(np.asarray(before.logits_per_image))) < 0.5
    assert _retrieval_accuracy(np.asarray(after.logits_per_image)) == (1.0, 1.0)
    np.testing.assert_allclose(after.logits_per_text, after.logits_per_image.T, rtol=1e-6)


def test_output_shapes_and_dtypes(model, pairs, init_params, forward):
    input_ids, attention_mask, pixels = pairs
    out = forward(init_params, input_ids, pixels, attention_mask)
    patches = (IMAGE // model.patch_size) ** 2
    assert out.text.embeds.shape == out.image.embeds.shape == (BATCH, model.embed_dim)
    assert out.text.encodings.shape == (BATCH, CONTEXT, model.text_width)
    assert out.image.encodings.shape == (BATCH, 1 + patches, model.vision_width)
    np.testing.assert_array_equal(out.text.mask, attention_mask)
    assert out.image.mask.shape == (BATCH, 1 + patches) and np.all(out.image.mask == 1)
    # The tiny config starts at the clamp (keeps the modality gap); the public shapes at CLIP's 1/0.07.
    assert float(out.logit_scale) == pytest.approx(math.log(100.0))
    assert get_config("B/32").model.logit_scale_init == pytest.approx(math.log(1 / 0.07))
    # A bfloat16 compute dtype keeps float32 params.
    bf16 = _tiny_model(dtype="bfloat16")
    shapes = jax.eval_shape(bf16.init, jax.random.key(0), input_ids, pixels)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    out_shapes = jax.eval_shape(bf16.apply, init_params, input_ids, pixels)
    assert out_shapes.text.encodings.dtype == out_shapes.image.embeds.dtype == jnp.bfloat16


def test_logit_scale_is_clamped_at_100(pairs, init_params, forward):
    input_ids, attention_mask, pixels = pairs
    params = jax.tree.map(lambda x: x, init_params)
    params["params"]["logit_scale"] = jnp.asarray(math.log(100.0) + 1.0, jnp.float32)
    out = forward(params, input_ids, pixels, attention_mask)
    image = out.image.embeds / np.linalg.norm(out.image.embeds, axis=-1, keepdims=True)
    text = out.text.embeds / np.linalg.norm(out.text.embeds, axis=-1, keepdims=True)
    np.testing.assert_allclose(out.logits_per_image, 100.0 * image @ text.T, rtol=1e-5, atol=1e-4)


def test_text_pooling_and_padding(model, pairs, init_params, encode_text):
    input_ids, attention_mask, _ = pairs
    out = encode_text(init_params, input_ids, attention_mask)
    # Pooled at the first eos, then projected without bias.
    first_eos = np.argmax(np.asarray(input_ids) == model.eos_token_id, axis=1)
    pooled = np.asarray(out.encodings)[np.arange(BATCH), first_eos]
    kernel = np.asarray(init_params["params"]["text_projection"]["kernel"])
    np.testing.assert_allclose(out.embeds, pooled @ kernel, rtol=1e-5, atol=1e-5)
    # Padding content, a missing mask, or eos tokens as padding do not change real positions.
    real = np.asarray(attention_mask, bool)
    padded_with_eos = np.where(real, input_ids, model.eos_token_id)
    padded_with_junk = np.where(real, input_ids, 7)
    for ids, mask in [(padded_with_eos, attention_mask), (padded_with_junk, np.ones_like(real, np.int32))]:
        other = encode_text(init_params, ids, mask)
        np.testing.assert_allclose(other.embeds, out.embeds, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(other.encodings)[real], np.asarray(out.encodings)[real], atol=1e-5)
    # Causal: a token does not see later ones.
    changed = np.array(input_ids)
    changed[:, 2] = 5
    other = encode_text(init_params, changed, attention_mask)
    np.testing.assert_allclose(other.encodings[:, :2], out.encodings[:, :2], atol=1e-6)
    assert np.abs(np.asarray(other.encodings[:, 2:]) - np.asarray(out.encodings[:, 2:])).max() > 1e-3


def test_legacy_argmax_pooling(pairs, init_params):
    input_ids, attention_mask, _ = pairs
    legacy = _tiny_model(text_pooling="argmax")
    out = jax.jit(partial(legacy.apply, method=CLIP.encode_text))(init_params, input_ids, attention_mask)
    pooled = np.asarray(out.encodings)[np.arange(BATCH), np.argmax(np.asarray(input_ids), axis=1)]
    kernel = np.asarray(init_params["params"]["text_projection"]["kernel"])
    np.testing.assert_allclose(out.embeds, pooled @ kernel, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise(model, pairs, init_params):
    input_ids, attention_mask, pixels = pairs
    with pytest.raises(ValueError, match=r"pixel_values.*\(batch, 32, 32, 3\).*\(16, 3, 32, 32\)"):
        jax.eval_shape(lambda p, x: model.apply(p, x, method=CLIP.encode_image), init_params,
                       pixels.transpose(0, 3, 1, 2))
    long_ids = jnp.ones((2, CONTEXT + 1), jnp.int32)
    with pytest.raises(ValueError, match=r"input_ids has length 9.*context_length 8"):
        jax.eval_shape(lambda p, x: model.apply(p, x, method=CLIP.encode_text), init_params, long_ids)
    with pytest.raises(ValueError, match="attention_mask"):
        jax.eval_shape(lambda p, x, m: model.apply(p, x, m, method=CLIP.encode_text),
                       init_params, input_ids, attention_mask[:, :4])
    with pytest.raises(ValueError, match="activation.*'relu'"):
        jax.eval_shape(_tiny_model(activation="relu").init, jax.random.key(0), input_ids, pixels)
    with pytest.raises(ValueError, match="text_pooling"):
        jax.eval_shape(_tiny_model(text_pooling="mean").init, jax.random.key(0), input_ids, pixels)


def test_contrastive_loss_analytic():
    loss_fn = jax.jit(clip_contrastive_loss)
    # Orthonormal, perfectly matched pairs: every row is softmax([s, 0, ..., 0]).
    batch, scale = 8, 5.0
    embeds = np.eye(batch, 12, dtype=np.float32) * 3.0  # normalised inside
    loss = loss_fn(embeds, 2.0 * embeds, np.float32(math.log(scale)))
    assert float(loss) == pytest.approx(math.log(1 + (batch - 1) * math.exp(-scale)), rel=1e-5)
    # Swapping the roles of images and texts leaves the symmetric loss unchanged.
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, batch, 12)).astype(np.float32)
    assert float(loss_fn(a, b, np.float32(2))) == pytest.approx(float(loss_fn(b, a, np.float32(2))), rel=1e-6)
    # The scale is clamped at 100.
    assert float(loss_fn(a, b, np.float32(9))) == pytest.approx(
        float(loss_fn(a, b, np.float32(math.log(100.0)))), rel=1e-6
    )
    with pytest.raises(ValueError, match="image_embeds and text_embeds"):
        loss_fn(a, b[:4], np.float32(2))


def test_contrastive_loss_sharded_over_8_devices(devices8):
    rng = np.random.default_rng(1)
    image, text = rng.standard_normal((2, 32, 24)).astype(np.float32)
    logit_scale = jnp.asarray(math.log(20.0))
    expected = float(clip_contrastive_loss(image, text, logit_scale))
    mesh = Mesh(np.array(devices8), ("data",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    image_s, text_s = jax.device_put(image, batch_sharding), jax.device_put(text, batch_sharding)
    assert len(image_s.addressable_shards) == 8 and image_s.addressable_shards[0].data.shape == (4, 24)
    sharded = jax.jit(clip_contrastive_loss)(image_s, text_s, logit_scale)
    assert float(sharded) == pytest.approx(expected, rel=1e-6)


def test_preprocess_images():
    # A constant image normalises to (v - mean) / std, whatever the input size and type.
    value = np.uint8(200)
    uint8_image = np.full((40, 56, 3), value, np.uint8)
    out = preprocess_images(uint8_image, 32)
    assert out.shape == (1, 32, 32, 3) and out.dtype == jnp.float32
    expected = (value / 255.0 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-5)
    # Float images in [-1, 1] map like their uint8 counterparts.
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        preprocess_images(batch, 32), preprocess_images(batch / 127.5 - 1.0, 32), atol=1e-5
    )
    # A wide image is centre-cropped: only the middle square survives.
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 16:48] = 255
    np.testing.assert_allclose(preprocess_images(wide, 32, mean=(0, 0, 0), std=(1, 1, 1)), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match=r"images.*\(N, H, W, 3\).*\(2, 3, 32, 32\)"):
        preprocess_images(batch.transpose(0, 3, 1, 2), 32)
    with pytest.raises(ValueError, match="images.*dtype int32"):
        preprocess_images(batch.astype(np.int32), 32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_configs_build(variant):
    config = get_config(variant)
    model = CLIP(**config.model)
    ids = jax.ShapeDtypeStruct((1, model.context_length), jnp.int32)
    pixels = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, pixels)
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    # Parameter counts of the public checkpoints (transformers' CLIPModel, which has the same tensors).
    expected = {"B/32": 151_277_313, "B/16": 149_620_737, "L/14": 427_616_513, "L/14-336": 427_944_193,
                "H/14": 986_109_441}
    if variant in expected:
        assert count == expected[variant]
    else:
        assert count < 5_000_000
    with pytest.raises(ValueError, match="variant"):
        get_config("XL")
