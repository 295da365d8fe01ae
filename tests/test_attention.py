"""models.attention: the blocked (memory-efficient) attention equals the dense one, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax.models import attention
from dalle2_jax.models.unet import UNet


def _inputs(batch=3, queries=12, keys=17, heads=2, width=8, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(k[0], (batch, queries, heads, width)) * 2.0
    kk = jax.random.normal(k[1], (batch, keys, heads, width)) * 2.0
    v = jax.random.normal(k[2], (batch, keys, heads, width))
    lengths = jnp.arange(batch) * 3 + keys - 3 * (batch - 1)  # every row keeps >= 1 key, the last all
    mask = jnp.arange(keys)[None] < lengths[:, None]
    return q.astype(dtype), kk.astype(dtype), v.astype(dtype), mask


def _numpy_attention(q, k, v, mask):
    q, k, v, mask = (np.asarray(a, np.float64) for a in (q, k, v, mask))
    logits = np.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, None, None, :] > 0, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhnm,bmhd->bnhd", weights, v)


# block_bytes 1: one (batch, head) pair per block (a lax.map over 6 blocks); 2 KB: 2 pairs a block
# (12 x 17 x 4 bytes each); the default: everything in one block.
@pytest.mark.parity_numpy
@pytest.mark.parametrize("block_bytes", [1, 2048, attention.DEFAULT_BLOCK_BYTES])
def test_blocked_equals_dense_and_numpy_with_gradients(block_bytes):
    q, k, v, mask = _inputs()
    blocked = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, implementation="blocked",
                                                             block_bytes=block_bytes)
    dense = lambda q, k, v: attention.dot_product_attention(q, k, v, mask, implementation="dense")
    np.testing.assert_allclose(jax.jit(blocked)(q, k, v), _numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(blocked)(q, k, v), jax.jit(dense)(q, k, v), rtol=1e-5, atol=1e-6)

    # A loss that weights every output differently, so each gradient entry is exercised.
    weights = jax.random.normal(jax.random.key(9), q.shape)
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(weights * jnp.tanh(f(*a))), argnums=(0, 1, 2)))
    for got, want in zip(grad(blocked)(q, k, v), grad(dense)(q, k, v)):
        assert float(jnp.max(jnp.abs(want))) > 1e-2
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_masked_keys_get_no_weight_and_no_gradient():
    q, k, v, mask = _inputs()
    f = lambda k, v: attention.dot_product_attention(q, k, v, mask, implementation="blocked", block_bytes=1)
    d_k, d_v = jax.grad(lambda k, v: jnp.sum(f(k, v) ** 2), argnums=(0, 1))(k, v)
    masked = ~np.asarray(mask)
    assert masked.any()
    assert float(jnp.max(jnp.abs(d_k[masked]))) == 0.0 and float(jnp.max(jnp.abs(d_v[masked]))) == 0.0
    # Changing a masked key's value changes nothing.
    v2 = jnp.where(jnp.asarray(masked)[:, :, None, None], 100.0, v)
    np.testing.assert_array_equal(f(k, v), f(k, v2))


def test_bfloat16_blocked_is_close_to_float32():
    q, k, v, mask = _inputs(dtype=jnp.bfloat16)
    out = attention.dot_product_attention(q, k, v, mask, implementation="blocked", block_bytes=1)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _numpy_attention(q, k, v, mask), atol=3e-2)
    grads = jax.grad(lambda q: jnp.sum(attention.dot_product_attention(
        q, k, v, mask, implementation="blocked").astype(jnp.float32) ** 2))(q)
    assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads)))


def test_groups_per_block_is_the_largest_fitting_divisor():
    assert attention._groups_per_block(32, 100, 1) == 1
    assert attention._groups_per_block(32, 100, 750) == 4  # 7 fit; 4 is the largest divisor of 32 <= 7
    assert attention._groups_per_block(32, 100, 10_000) == 32
    assert attention._groups_per_block(6, 100, 500) == 3


def test_auto_is_blocked_on_cpu():
    assert jax.default_backend() == "cpu"
    assert attention.resolve_implementation("auto") == "blocked"


def test_bad_arguments_name_what_was_expected():
    q, k, v, mask = _inputs()
    with pytest.raises(ValueError, match="implementation"):
        attention.dot_product_attention(q, k, v, mask, implementation="flash")
    with pytest.raises(ValueError, match=r"q, k, v"):
        attention.dot_product_attention(q[0], k, v, mask)
    with pytest.raises(ValueError, match=r"q, k, v"):
        attention.dot_product_attention(q, k[:, :, :1], v[:, :, :1], mask)
    with pytest.raises(ValueError, match="mask"):
        attention.dot_product_attention(q, k, v, mask[:, :-1])
    with pytest.raises(ValueError, match="block_bytes"):
        attention.dot_product_attention(q, k, v, mask, implementation="blocked", block_bytes=0)
    with pytest.raises(ValueError, match="attention_impl"):
        UNet(image_size=8, channels=(8,), num_res_blocks=1, attention_resolutions=(8,), head_dim=4, num_groups=4,
             attention_impl="fast").init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32))


def test_unet_outputs_and_gradients_do_not_depend_on_the_attention_implementation():
    config = dict(image_size=16, channels=(8, 16), num_res_blocks=1, attention_resolutions=(16, 8), head_dim=4,
                  num_groups=4, use_image_embed=True, num_context_tokens=2, use_text_encodings=True,
                  context_dim=8)
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (2, 16, 16, 3))
    t = jnp.array([10, 900])
    cond = dict(image_embed=jax.random.normal(keys[1], (2, 6)), text_encodings=jax.random.normal(keys[2], (2, 5, 4)),
                text_mask=jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool))
    params = UNet(**config, attention_impl="dense").init(keys[3], x, t, **cond)
    params = jax.tree.map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)

    def loss(impl):
        model = UNet(**config, attention_impl=impl)
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply(p, x, t, **cond) ** 2)))(params)

    (dense_loss, dense_grads), (blocked_loss, blocked_grads) = loss("dense"), loss("blocked")
    assert float(dense_loss) > 0
    np.testing.assert_allclose(blocked_loss, dense_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(blocked_grads), jax.tree.leaves(dense_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)
