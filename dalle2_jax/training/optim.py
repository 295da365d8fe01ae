"""Optimizer, learning-rate schedule, EMA and gradient accumulation from `config.optimizer` / `config.ema`.

Config keys (`config.optimizer`): learning_rate, warmup_steps, schedule
("cosine" | "constant"), min_lr_ratio (cosine floor as a fraction of the peak;
default 0), weight_decay, b1, b2, eps, grad_clip_norm (<= 0: no clipping),
grad_accum_steps. `config.ema`: decay, warmup (bool).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "constant")


def _get(config, key, default):
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak over `warmup_steps`, then cosine decay
    to `min_lr_ratio * peak` at `total_steps`, or constant."""
    peak = float(opt_config.learning_rate)
    warmup = int(_get(opt_config, "warmup_steps", 0))
    kind = _get(opt_config, "schedule", "cosine")
    if kind not in SCHEDULES:
        raise ValueError(f"optimizer.schedule: expected one of {SCHEDULES}, got {kind!r}")
    if warmup < 0:
        raise ValueError(f"optimizer.warmup_steps: expected >= 0, got {warmup}")
    if kind == "constant":
        after = optax.constant_schedule(peak)
    else:
        decay_steps = max(int(total_steps) - warmup, 1)
        after = optax.cosine_decay_schedule(peak, decay_steps,
                                            alpha=float(_get(opt_config, "min_lr_ratio", 0.0)))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _decay_mask(params):
    # Weight decay on matrices and kernels only, not on biases, norm scales or embeddings' 1-D leaves.
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(opt_config, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping followed by AdamW with the configured schedule."""
    clip = float(_get(opt_config, "grad_clip_norm", 0.0) or 0.0)
    adamw = optax.adamw(
        learning_rate_schedule(opt_config, total_steps),
        b1=float(_get(opt_config, "b1", 0.9)), b2=float(_get(opt_config, "b2", 0.999)),
        eps=float(_get(opt_config, "eps", 1e-8)),
        weight_decay=float(_get(opt_config, "weight_decay", 0.0)), mask=_decay_mask)
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw


def ema_decay(step: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
    """decay_t = min(decay, (1 + t) / (10 + t)) with warm-up, else `decay`; t = updates applied before."""
    t = jnp.asarray(step, jnp.float32)
    if not warmup:
        return jnp.full_like(t, decay)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def update_ema(ema_params: Any, params: Any, decay_t: jax.Array) -> Any:
    return jax.tree.map(lambda e, p: decay_t * e + (1.0 - decay_t) * p, ema_params, params)


def split_microbatches(batch: Any, num_micro: int) -> Any:
    """(B, ...) -> (num_micro, B // num_micro, ...) with micro-batch i = rows i, i+k, i+2k, ...

    Strided rather than contiguous so that every device holds an equal part of
    each micro-batch when the batch axis is sharded.
    """
    def split(x):
        if x.shape[0] % num_micro:
            raise ValueError(f"grad_accum_steps: {num_micro} does not divide the batch of {x.shape[0]}")
        return jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Callable, params: Any, batch: Any, rng: jax.Array,
                         num_micro: int) -> tuple[jax.Array, dict, Any]:
    """Mean loss, metrics and gradients over `num_micro` equal micro-batches, in one `lax.scan`.

    `loss_fn(params, batch, rng) -> (loss, metrics)` must average over examples,
    so the mean of the micro-batch gradients is the whole batch's gradient.
    Micro-batch i draws its randomness from `fold_in(rng, i)`.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (loss, metrics), grads = grad_fn(params, batch, jax.random.fold_in(rng, 0))
        return loss, metrics, grads

    micro = split_microbatches(batch, num_micro)

    def body(carry, inputs):
        index, micro_batch = inputs
        (loss, metrics), grads = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
        carry = jax.tree.map(jnp.add, carry, (loss, metrics, grads))
        return carry, None

    abstract = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
                        (abstract[0][0], abstract[0][1], abstract[1]))
    (loss, metrics, grads), _ = jax.lax.scan(body, init, (jnp.arange(num_micro), micro))
    return jax.tree.map(lambda x: x / num_micro, (loss, metrics, grads))
