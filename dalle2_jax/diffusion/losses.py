"""Training losses: the MSE of the chosen target and improved DDPM's hybrid loss.

All arithmetic is done in float32 (float64 under x64 schedules) whatever dtype the network
emits; every log and exp is guarded so that the loss and its gradient stay finite at every
t, including t = 0 (decoder NLL) and t = T-1 (alpha_bar ~ 1e-9 with the cosine schedule).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

from dalle2_jax.diffusion import process
from dalle2_jax.diffusion.schedules import DiffusionSchedule

DATA_LIKELIHOODS = ("discretized", "gaussian")

# exp() arguments are capped here: exp(80) ~ 5.5e34 still leaves room in float32.
_MAX_EXP = 80.0
_LOG_FLOOR = 1e-12


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the first."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(jnp.minimum(logvar1 - logvar2, _MAX_EXP))
        + jnp.square(mean1 - mean2) * jnp.exp(jnp.minimum(-logvar2, _MAX_EXP))
    )


def discretized_gaussian_log_likelihood(x, *, means, log_scales, bin_width: float = 2.0 / 255.0):
    """log P(bin of x) under N(means, exp(log_scales)^2) for data in [-1, 1] quantised to 256 levels.

    The edge bins extend to -inf and +inf (Ho et al. 2020). Uses the exact normal CDF, and
    log_ndtr for the edge bins, so the tails do not underflow to log(0).
    """
    centered = x - means
    # Capped lower than _MAX_EXP: the CDF arguments get squared inside log_ndtr.
    inv_std = jnp.exp(jnp.minimum(-log_scales, 30.0))
    upper = inv_std * (centered + bin_width / 2)
    lower = inv_std * (centered - bin_width / 2)
    log_cdf_upper = log_ndtr(upper)
    log_one_minus_cdf_lower = log_ndtr(-lower)
    # For bins in the far tail the difference of CDFs cancels; the mirrored form keeps precision.
    delta = jnp.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_delta = jnp.log(jnp.maximum(delta, _LOG_FLOOR))
    return jnp.where(
        x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_one_minus_cdf_lower, log_delta)
    )


def gaussian_log_likelihood(x, *, means, log_variance):
    """log N(x; means, exp(log_variance)) elementwise, in nats (continuous data)."""
    return -0.5 * (
        math.log(2 * math.pi)
        + log_variance
        + jnp.square(x - means) * jnp.exp(jnp.minimum(-log_variance, _MAX_EXP))
    )


def vlb_terms(
    sched: DiffusionSchedule,
    model_output: jax.Array,
    *,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    objective: str = "eps",
    learned_variance: bool = True,
    data_likelihood: str = "discretized",
) -> jax.Array:
    """Per-example L_t in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, -log p(x_0|x_1) at t = 0."""
    if data_likelihood not in DATA_LIKELIHOODS:
        raise ValueError(f"data_likelihood: expected one of {DATA_LIKELIHOODS}, got {data_likelihood!r}")
    dtype = process.compute_dtype(sched, x_t, model_output)
    x_start, x_t = x_start.astype(dtype), x_t.astype(dtype)
    t = jnp.asarray(t)
    _, _, model_mean, model_log_variance = process.model_predictions(
        sched, model_output.astype(dtype), x_t, t, objective, learned_variance, clip_denoised=False
    )
    true_mean, _, true_log_variance = process.q_posterior_mean_variance(sched, x_start, x_t, t)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2.0)
    if data_likelihood == "discretized":
        log_likelihood = discretized_gaussian_log_likelihood(
            x_start, means=model_mean, log_scales=0.5 * model_log_variance
        )
    else:
        log_likelihood = gaussian_log_likelihood(x_start, means=model_mean, log_variance=model_log_variance)
    decoder_nll = -mean_flat(log_likelihood) / math.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl)


def min_snr_weights(sched: DiffusionSchedule, t: jax.Array, objective: str, gamma: float) -> jax.Array:
    """(B,) Min-SNR-gamma weights of the `objective`'s mse at timesteps t (see training_losses)."""
    alpha_bar = sched.alphas_cumprod[t].astype(jnp.float32)
    snr = alpha_bar / (1.0 - alpha_bar)
    clipped = jnp.minimum(snr, gamma)
    # eps as min(1, gamma / SNR): SNR underflows to 0 at the last step of a cosine schedule.
    return {"eps": jnp.minimum(1.0, gamma / snr), "x0": clipped, "v": clipped / (snr + 1.0)}[objective]


def training_losses(
    sched: DiffusionSchedule,
    model_output: jax.Array,
    *,
    x_start: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    objective: str = "eps",
    learned_variance: bool = False,
    vlb_weight: float = 1e-3,
    data_likelihood: str = "discretized",
    snr_gamma: float = 0.0,
) -> dict[str, jax.Array]:
    """Per-example (B,) losses: "loss" (to average), "mse", and "vlb" (bits/dim) when learned_variance.

    mse: mean over non-batch dims of (target - prediction)^2, target = noise / x_start / v.
    Hybrid loss (improved DDPM): L_simple + vlb_weight * L_vlb, where L_vlb = sum_t L_t is
    estimated by num_timesteps * L_t; the prediction is stop-gradiented inside L_t so that the
    vlb trains only the variance. With T = 1000 and vlb_weight = 1e-3 this is improved-diffusion's
    `mse + vb`. data_likelihood: "discretized" for images in [-1, 1], "gaussian" for vectors.
    snr_gamma > 0: Min-SNR-gamma weighting of the mse in "loss" (Hang et al. 2023), the x0 error
    weighted by min(SNR_t, gamma) whatever the objective: eps mse x min(SNR, gamma) / SNR,
    v mse x min(SNR, gamma) / (SNR + 1); "mse" stays the unweighted value.
    """
    process.check_objective(objective)
    if isinstance(snr_gamma, bool) or not isinstance(snr_gamma, (int, float)) or not snr_gamma >= 0:
        raise ValueError(f"snr_gamma: expected a number >= 0 (0 = unweighted), got {snr_gamma!r}")
    if data_likelihood not in DATA_LIKELIHOODS:
        raise ValueError(f"data_likelihood: expected one of {DATA_LIKELIHOODS}, got {data_likelihood!r}")
    if x_start.shape != x_t.shape or noise.shape != x_t.shape:
        raise ValueError(
            f"x_start, x_t, noise: expected one shape, got {x_start.shape}, {x_t.shape}, {noise.shape}"
        )
    dtype = process.compute_dtype(sched, x_t, model_output)
    x_start, x_t, noise = x_start.astype(dtype), x_t.astype(dtype), noise.astype(dtype)
    t = jnp.asarray(t)
    prediction, var_values = process.split_model_output(model_output.astype(dtype), x_t, learned_variance)

    if objective == "eps":
        target = noise
    elif objective == "x0":
        target = x_start
    else:
        target = process.v_from_x0_eps(sched, x_start, t, noise)
    mse = mean_flat(jnp.square(target - prediction))
    weighted = mse * min_snr_weights(sched, t, objective, snr_gamma).astype(mse.dtype) if snr_gamma else mse
    if not learned_variance:
        return {"loss": weighted, "mse": mse}

    frozen_output = jnp.concatenate([jax.lax.stop_gradient(prediction), var_values], axis=-1)
    vlb = vlb_terms(
        sched, frozen_output, x_start=x_start, x_t=x_t, t=t, objective=objective,
        learned_variance=True, data_likelihood=data_likelihood,
    )
    loss = weighted + vlb_weight * sched.num_timesteps * vlb
    return {"loss": loss, "mse": mse, "vlb": vlb}
