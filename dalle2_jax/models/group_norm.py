"""Group normalisation with a hand-written gradient: the UNet's GroupNorm.

`GroupNorm` takes the place of `flax.linen.GroupNorm` (same parameters, `scale`
and `bias`, same float32 statistics with the one-pass variance E[x^2] - E[x]^2
that flax uses by default) and computes the same numbers in fewer passes over
the activations, which is where its time goes on CPU:

- forward: one reduction pass (per-channel sums of x and x^2 over the spatial
  axes, combined into group statistics on the tiny (batch, channels) arrays),
  then one element-wise pass x * a[b, c] + d[b, c];
- backward (custom VJP): one reduction pass (per-channel sums of dy and dy * x)
  and one element-wise pass dx = dy * k1[b, c] + x * k2[b, c] + k3[b, c].

The per-channel coefficients are spread from groups to channels by a one-hot
matrix product rather than `jnp.repeat`: XLA fuses a repeat into the
element-wise pass as an integer division per element, 2-4x slower at 6
channels per group. On the `bench` UNet's training step (2 CPU cores) this
module replaced flax's at 4.03 -> 3.75 s; alone, GroupNorm + SiLU forward and
backward at (8, 64, 64, 64) went 8.3 -> 1.3 ms and 9.3 -> 2.6 ms.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def _spread(per_group: Array, channels: int) -> Array:
    """(B, G) -> (B, C): each group's value on its channels."""
    groups = per_group.shape[-1]
    onehot = (jnp.arange(channels)[None, :] // (channels // groups) == jnp.arange(groups)[:, None])
    return jnp.dot(per_group, onehot.astype(per_group.dtype), precision=jax.lax.Precision.HIGHEST)


def _per_channel_sums(*arrays: Array) -> list[Array]:
    """Sums over all axes but the first (batch) and last (channels): (B, C) each."""
    axes = tuple(range(1, arrays[0].ndim - 1))
    return [jnp.sum(a, axis=axes) for a in arrays]


def _broadcastable(per_channel: Array, ndim: int) -> Array:
    b, c = per_channel.shape
    return per_channel.reshape((b,) + (1,) * (ndim - 2) + (c,))


def _group_mean(per_channel_sum: Array, x: Array, num_groups: int) -> Array:
    """(B, C) sums over the spatial axes of x -> (B, G) means over each group's elements."""
    b = per_channel_sum.shape[0]
    return per_channel_sum.reshape(b, num_groups, -1).sum(-1) / (x.size // (b * num_groups))


def _forward(x, scale, bias, num_groups, epsilon):
    channels = x.shape[-1]
    xf = x.astype(jnp.float32)
    sum_x, sum_xx = _per_channel_sums(xf, xf * xf)
    mean = _group_mean(sum_x, x, num_groups)
    var = jnp.maximum(_group_mean(sum_xx, x, num_groups) - mean * mean, 0.0)
    rstd = jax.lax.rsqrt(var + epsilon)
    multiplier = _spread(rstd, channels) * scale
    offset = bias - _spread(mean, channels) * multiplier
    y = xf * _broadcastable(multiplier, x.ndim) + _broadcastable(offset, x.ndim)
    return y, (x, scale, mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float) -> Array:
    """(x - mean) / sqrt(var + epsilon) * scale + bias over groups of channels, in float32.

    x: (B, ..., C) channels last; statistics per example and group over all
    other axes. scale, bias: (C,). Returns float32.
    """
    return _forward(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_bwd(num_groups, epsilon, residuals, d_y):
    del epsilon
    x, scale, mean, rstd = residuals
    channels = x.shape[-1]
    d_yf, xf = d_y.astype(jnp.float32), x.astype(jnp.float32)
    sum_dy, sum_dy_x = _per_channel_sums(d_yf, d_yf * xf)
    mean_c, rstd_c = _spread(mean, channels), _spread(rstd, channels)
    # sum over the spatial axes of dy * x_hat, per channel, where x_hat = (x - mean) * rstd
    sum_dy_xhat = rstd_c * (sum_dy_x - mean_c * sum_dy)
    d_scale = jnp.sum(sum_dy_xhat, axis=0)
    d_bias = jnp.sum(sum_dy, axis=0)
    # With g = dy * scale (the gradient at x_hat): dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)),
    # the means over each group's elements; written as dy * k_dy + x * k_x + k_1.
    mean_g = _group_mean(scale * sum_dy, x, num_groups)
    mean_g_xhat = _group_mean(scale * sum_dy_xhat, x, num_groups)
    k_dy = rstd_c * scale
    k_x = _spread(-rstd * rstd * mean_g_xhat, channels)
    k_1 = _spread(rstd * (mean * rstd * mean_g_xhat - mean_g), channels)
    d_x = (d_yf * _broadcastable(k_dy, x.ndim) + xf * _broadcastable(k_x, x.ndim) + _broadcastable(k_1, x.ndim))
    return d_x.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


group_norm.defvjp(_forward, _group_norm_bwd)


class GroupNorm(nn.Module):
    """Group normalisation over the last axis (flax.linen.GroupNorm's parameters and numbers)."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Any = None  # output dtype; None keeps x's
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if x.ndim < 2:
            raise ValueError(f"x: expected (batch, ..., channels), got shape {x.shape}")
        channels = x.shape[-1]
        if self.num_groups < 1 or channels % self.num_groups:
            raise ValueError(f"num_groups: {self.num_groups} does not divide the {channels} channels of x")
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        y = group_norm(x, scale.astype(jnp.float32), bias.astype(jnp.float32), self.num_groups, float(self.epsilon))
        return y.astype(self.dtype or x.dtype)
