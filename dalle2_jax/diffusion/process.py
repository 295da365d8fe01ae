"""The forward process q and the conversions between what a network predicts (eps, x0, v).

`t` is always an int index into the schedule (a scalar or one per example, shape (B,));
per-example coefficients broadcast over any trailing shape, so images (B, H, W, C) and
vectors (B, D) go through the same code.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dalle2_jax.diffusion.schedules import DiffusionSchedule

OBJECTIVES = ("eps", "x0", "v")
FIXED_VARIANCES = ("small", "large")


def _coef(values: jax.Array, t, x: jax.Array) -> jax.Array:
    """values[t] shaped to broadcast against x: (B,) -> (B, 1, ..., 1)."""
    coef = values[jnp.asarray(t)]
    if coef.ndim > 1:
        raise ValueError(f"t: expected a scalar or a (B,) array of step indices, got shape {coef.shape}")
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def compute_dtype(sched: DiffusionSchedule, *arrays) -> jnp.dtype:
    # At least float32 (and the schedule's dtype, float64 under x64) whatever the network emits.
    return jnp.result_type(sched.dtype, jnp.float32, *(a.dtype for a in arrays))


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")


def q_sample(sched: DiffusionSchedule, x0: jax.Array, t, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    return _coef(sched.sqrt_alphas_cumprod, t, x0) * x0 + _coef(sched.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_mean_variance(sched: DiffusionSchedule, x0: jax.Array, t):
    """Mean, variance and log variance of q(x_t | x0), each shaped like x0."""
    mean = _coef(sched.sqrt_alphas_cumprod, t, x0) * x0
    variance = jnp.broadcast_to(_coef(sched.sqrt_one_minus_alphas_cumprod, t, x0) ** 2, x0.shape)
    return mean, variance, jnp.log(variance)


def q_posterior_mean_variance(sched: DiffusionSchedule, x0: jax.Array, x_t: jax.Array, t):
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0), each shaped like x_t."""
    mean = _coef(sched.posterior_mean_coef1, t, x_t) * x0 + _coef(sched.posterior_mean_coef2, t, x_t) * x_t
    variance = jnp.broadcast_to(_coef(sched.posterior_variance, t, x_t), x_t.shape)
    log_variance = jnp.broadcast_to(_coef(sched.posterior_log_variance_clipped, t, x_t), x_t.shape)
    return mean, variance, log_variance


def predict_x0_from_eps(sched: DiffusionSchedule, x_t: jax.Array, t, eps: jax.Array) -> jax.Array:
    return _coef(sched.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _coef(sched.sqrt_recipm1_alphas_cumprod, t, x_t) * eps


def predict_eps_from_x0(sched: DiffusionSchedule, x_t: jax.Array, t, x0: jax.Array) -> jax.Array:
    scaled_x_t = _coef(sched.sqrt_recip_alphas_cumprod, t, x_t) * x_t
    return (scaled_x_t - x0) / _coef(sched.sqrt_recipm1_alphas_cumprod, t, x_t)


def v_from_x0_eps(sched: DiffusionSchedule, x0: jax.Array, t, eps: jax.Array) -> jax.Array:
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho, 2022)."""
    return _coef(sched.sqrt_alphas_cumprod, t, x0) * eps - _coef(sched.sqrt_one_minus_alphas_cumprod, t, x0) * x0


def x0_from_v(sched: DiffusionSchedule, x_t: jax.Array, t, v: jax.Array) -> jax.Array:
    return _coef(sched.sqrt_alphas_cumprod, t, x_t) * x_t - _coef(sched.sqrt_one_minus_alphas_cumprod, t, x_t) * v


def eps_from_v(sched: DiffusionSchedule, x_t: jax.Array, t, v: jax.Array) -> jax.Array:
    return _coef(sched.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t + _coef(sched.sqrt_alphas_cumprod, t, x_t) * v


def dynamic_threshold_x0(x0: jax.Array, percentile: float) -> jax.Array:
    """Imagen's dynamic thresholding: s = max(1, quantile(|x0|, p)) per example; clip to [-s, s], divide by s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


def split_model_output(model_output: jax.Array, x_t: jax.Array, learned_variance: bool):
    """(prediction, variance interpolation v or None), checking the last axis against x_t."""
    if learned_variance:
        if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != 2 * x_t.shape[-1]:
            raise ValueError(
                f"model_output: with learned_variance expected shape {x_t.shape[:-1] + (2 * x_t.shape[-1],)}, "
                f"got {model_output.shape}"
            )
        prediction, var_values = jnp.split(model_output, 2, axis=-1)
        return prediction, var_values
    if model_output.shape != x_t.shape:
        raise ValueError(f"model_output: expected the shape of x_t {x_t.shape}, got {model_output.shape}")
    return model_output, None


def model_log_variance(sched: DiffusionSchedule, x_t: jax.Array, t, var_values=None, fixed_variance: str = "small"):
    """log variance of p(x_{t-1} | x_t): learned range when var_values is given, else fixed.

    Learned range (improved DDPM): frac = (v + 1) / 2,
    log var = frac * log(beta_t) + (1 - frac) * log(beta_tilde_t), with beta_tilde clipped at t=0.
    Fixed: "small" = beta_tilde (posterior variance), "large" = beta (with beta_tilde_1 at t=0).
    """
    min_log = _coef(sched.posterior_log_variance_clipped, t, x_t)
    max_log = _coef(jnp.log(sched.betas), t, x_t)
    if var_values is not None:
        frac = (var_values + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log
    if fixed_variance == "small":
        return jnp.broadcast_to(min_log, x_t.shape)
    if fixed_variance == "large":
        first = sched.posterior_variance[1:2] if sched.num_timesteps > 1 else sched.betas[:1]
        large = jnp.log(jnp.concatenate([first, sched.betas[1:]]))
        return jnp.broadcast_to(_coef(large, t, x_t), x_t.shape)
    raise ValueError(f"fixed_variance: expected one of {FIXED_VARIANCES}, got {fixed_variance!r}")


def model_predictions(
    sched: DiffusionSchedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t,
    objective: str = "eps",
    learned_variance: bool = False,
    clip_denoised: bool = True,
    dynamic_threshold: float | None = None,
    fixed_variance: str = "small",
    clip_range: float = 1.0,
):
    """Network output at step t -> (x0, eps, model_mean, model_log_variance), computed in >= float32.

    x0 is clipped to [-clip_range, clip_range] (clip_denoised; Karlo's prior uses 5) or dynamically thresholded (dynamic_threshold = the
    percentile, e.g. 0.995, which takes precedence); eps is then recomputed from the processed x0, so
    that DDIM steps stay consistent with it.
    """
    check_objective(objective)
    if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
        raise ValueError(f"dynamic_threshold: expected a percentile in (0, 1], got {dynamic_threshold}")
    dtype = compute_dtype(sched, x_t, model_output)
    x_t = x_t.astype(dtype)
    prediction, var_values = split_model_output(model_output.astype(dtype), x_t, learned_variance)

    if objective == "eps":
        x0 = predict_x0_from_eps(sched, x_t, t, prediction)
    elif objective == "x0":
        x0 = prediction
    else:
        x0 = x0_from_v(sched, x_t, t, prediction)

    if dynamic_threshold is not None:
        x0 = dynamic_threshold_x0(x0, dynamic_threshold)
    elif clip_denoised:
        x0 = jnp.clip(x0, -clip_range, clip_range)

    if objective == "eps" and dynamic_threshold is None and not clip_denoised:
        eps = prediction
    elif objective == "v" and dynamic_threshold is None and not clip_denoised:
        eps = eps_from_v(sched, x_t, t, prediction)
    else:
        eps = predict_eps_from_x0(sched, x_t, t, x0)

    model_mean, _, _ = q_posterior_mean_variance(sched, x0, x_t, t)
    log_variance = model_log_variance(sched, x_t, t, var_values, fixed_variance)
    return x0, eps, model_mean, log_variance
