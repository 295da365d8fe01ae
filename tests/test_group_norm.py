"""GroupNorm with its hand-written gradient: NumPy forward reference, flax parity of values and gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax.models.group_norm import GroupNorm, group_norm

import numpy_reference

# (shape, groups): 2 spatial axes with 3 channels per group, 1 spatial axis with 4, and none.
CASES = [((2, 5, 3, 12), 4), ((3, 7, 24), 6), ((4, 16), 2), ((2, 4, 4, 64), 32)]


def _inputs(shape, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    channels = shape[-1]
    # An offset mean and uneven channel scales: the one-pass variance must still hold.
    x = 3.0 + jax.random.normal(keys[0], shape) * jnp.linspace(0.5, 2.0, channels)
    scale = 1.0 + 0.3 * jax.random.normal(keys[1], (channels,))
    bias = 0.3 * jax.random.normal(keys[2], (channels,))
    weights = jax.random.normal(keys[3], shape)
    return x, scale, bias, weights


def _flax(x, scale, bias, groups):
    return nn.GroupNorm(groups, epsilon=1e-5).apply({"params": {"scale": scale, "bias": bias}}, x)


@pytest.mark.parity_numpy
@pytest.mark.parametrize("shape,groups", CASES)
def test_forward_matches_numpy_reference(shape, groups):
    x, scale, bias, _ = _inputs(shape)
    out = np.asarray(jax.jit(group_norm, static_argnums=(3, 4))(x, scale, bias, groups, 1e-5))
    np.testing.assert_allclose(out, numpy_reference.group_norm(x, groups, scale, bias), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape,groups", CASES)
def test_gradients_match_flax_autodiff(shape, groups):
    """The custom VJP against autodiff through flax.linen.GroupNorm, under a nonlinear loss."""
    x, scale, bias, weights = _inputs(shape, seed=1)

    def loss(norm):
        return lambda x, scale, bias: jnp.sum(nn.silu(norm(x, scale, bias)) * weights)

    ours = jax.jit(jax.grad(loss(lambda x, s, b: group_norm(x, s, b, groups, 1e-5)), argnums=(0, 1, 2)))(
        x, scale, bias)
    reference = jax.grad(loss(lambda x, s, b: _flax(x, s, b, groups)), argnums=(0, 1, 2))(x, scale, bias)
    for name, got, want in zip(("x", "scale", "bias"), ours, reference):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))),
                                   err_msg=f"gradient wrt {name}")


def test_module_has_flax_parameters_and_outputs():
    x, _, _, _ = _inputs((2, 6, 6, 16))
    ours, theirs = GroupNorm(num_groups=4), nn.GroupNorm(num_groups=4)
    params = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, theirs.init(jax.random.key(0), x))
    params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size, dtype=p.dtype), params)
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5, atol=1e-5)


def test_bfloat16_input_keeps_its_dtype_and_float32_statistics():
    x, scale, bias, _ = _inputs((2, 8, 8, 32))
    module = GroupNorm(num_groups=8)
    params = {"params": {"scale": scale, "bias": bias}}
    out = module.apply(params, x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert GroupNorm(num_groups=8, dtype=jnp.float32).apply(params, x.astype(jnp.bfloat16)).dtype == jnp.float32
    reference = numpy_reference.group_norm(np.asarray(x.astype(jnp.bfloat16), np.float32), 8, scale, bias)
    assert float(np.max(np.abs(np.asarray(out, np.float32) - reference))) < 0.05

    grads = jax.grad(lambda x, p: jnp.sum(module.apply(p, x).astype(jnp.float32) ** 2), argnums=(0, 1))(
        x.astype(jnp.bfloat16), params)
    assert grads[0].dtype == jnp.bfloat16 and grads[1]["params"]["scale"].dtype == jnp.float32
    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in jax.tree.leaves(grads))


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="num_groups"):
        GroupNorm(num_groups=5).init(jax.random.key(0), jnp.zeros((1, 4, 4, 16)))
    with pytest.raises(ValueError, match="x: expected"):
        GroupNorm(num_groups=1).init(jax.random.key(0), jnp.zeros((16,)))
