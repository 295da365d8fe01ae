"""Time steps of the multistep ODE/SDE solvers (DPM-Solver++, UniPC) and what they share.

The solvers work in the noise level sigma = sqrt((1 - abar) / abar) (diffusers' `sigmas`):
alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t, lambda = log(alpha_t / sigma_t).
A `SolverSchedule` holds the N training timesteps the denoiser is conditioned on and the N + 1
noise levels (the last one 0: the final step lands on the clean sample), chosen on the host in
float64 from a discrete training schedule:

  "trailing"  uniform in training time from T - 1 down (diffusers' timestep_spacing="trailing");
  "logsnr"    uniform in log-SNR between the schedule's ends (diffusers' use_lu_lambdas);
  "karras"    Karras et al. (2022) rho = 7 sigmas between the ends (use_karras_sigmas).

For "logsnr" and "karras" the timestep of a sigma comes from interpolating log-sigma in t and is
rounded (the denoiser takes integer t); the solver uses the exact sigma.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dalle2_jax.diffusion import process
from dalle2_jax.diffusion.schedules import DiffusionSchedule

SPACINGS = ("trailing", "logsnr", "karras")
KARRAS_RHO = 7.0


@struct.dataclass
class SolverSchedule:
    """Step i conditions the denoiser on timesteps[i] at noise level sigmas[i] and lands on sigmas[i + 1]."""

    timesteps: jax.Array  # int32 (N,): original training timesteps
    sigmas: jax.Array  # (N + 1,): decreasing, sigmas[N] = 0
    num_steps: int = struct.field(pytree_node=False)


def _training_sigmas(sched: DiffusionSchedule) -> np.ndarray:
    # Recomputed in float64 from the betas: the stored float32 alpha_bar loses the small ones' digits.
    betas = np.asarray(sched.betas, np.float64)
    alphas_cumprod = np.exp(np.cumsum(np.log1p(-np.minimum(betas, 1.0 - 1e-12))))
    return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def solver_schedule(sched: DiffusionSchedule, steps: int, spacing: str = "trailing") -> SolverSchedule:
    """N = steps solver steps over the (not respaced) training schedule `sched`; see the module docstring."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    num_train = sched.num_timesteps
    if steps > num_train:
        raise ValueError(f"steps: expected at most the schedule's {num_train} steps, got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
    train_sigmas = _training_sigmas(sched)
    if spacing == "trailing":
        indices = np.round(np.arange(num_train, 0, -num_train / steps)).astype(np.int64) - 1
        sigmas = train_sigmas[indices]
    else:
        log_sigmas = np.log(train_sigmas)
        if spacing == "logsnr":
            sigmas = np.exp(np.linspace(log_sigmas[-1], log_sigmas[0], steps))
        else:
            ramp = np.linspace(0.0, 1.0, steps)
            hi, lo = train_sigmas[-1] ** (1 / KARRAS_RHO), train_sigmas[0] ** (1 / KARRAS_RHO)
            sigmas = (hi + ramp * (lo - hi)) ** KARRAS_RHO
        # log-sigma is increasing in t: interpolate t at each sigma.
        indices = np.round(np.interp(np.log(sigmas), log_sigmas, np.arange(num_train))).astype(np.int64)
    timesteps = np.asarray(sched.timesteps)[indices]
    return SolverSchedule(timesteps=jnp.asarray(timesteps, jnp.int32),
                          sigmas=jnp.asarray(np.append(sigmas, 0.0), sched.dtype), num_steps=int(steps))


def alpha_sigma(sigma):
    """(alpha_t, sigma_t) of the variance-preserving process at noise level sigma."""
    alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def log_snr(sigma):
    """lambda = log(alpha_t) - log(sigma_t); +inf at sigma = 0."""
    alpha, sigma_t = alpha_sigma(sigma)
    return jnp.log(alpha) - jnp.log(sigma_t)


def data_prediction(model_output, x, sigma, *, objective: str, learned_variance: bool, clip_denoised: bool,
                    dynamic_threshold: float | None, clip_range: float = 1.0) -> jax.Array:
    """The model's x0 at noise level sigma (variance half ignored), clipped to +-clip_range /
    thresholded as asked."""
    dtype = jnp.result_type(jnp.float32, x.dtype, model_output.dtype, jnp.asarray(sigma).dtype)
    x = x.astype(dtype)
    prediction, _ = process.split_model_output(model_output.astype(dtype), x, learned_variance)
    alpha, sigma_t = alpha_sigma(sigma.astype(dtype))
    if objective == "eps":
        x0 = (x - sigma_t * prediction) / alpha
    elif objective == "v":
        x0 = alpha * x - sigma_t * prediction
    else:
        x0 = prediction
    if dynamic_threshold is not None:
        return process.dynamic_threshold_x0(x0, dynamic_threshold)
    return jnp.clip(x0, -clip_range, clip_range) if clip_denoised else x0


def model_call(denoiser: Callable, schedule: SolverSchedule, cond: dict):
    def call(x, i):
        t = jnp.broadcast_to(schedule.timesteps[i], (x.shape[0],)).astype(jnp.int32)
        return denoiser(x, t, **cond)

    return call


def solver_known_region_hook(schedule: SolverSchedule, x_known: jax.Array, mask: jax.Array):
    """A solver step_hook(x, level, rng) keeping the known region (mask False) at q(x_level | x_known).

    level indexes schedule.sigmas; at level N (sigma 0) the known region is x_known exactly.
    mask: True where the sampler generates, broadcastable to x_known's shape.
    """
    x_known = jnp.asarray(x_known)
    mask = jnp.asarray(mask)
    try:
        shape = np.broadcast_shapes(mask.shape, x_known.shape)
    except ValueError:
        shape = None
    if shape != x_known.shape:
        raise ValueError(f"mask: expected a shape that broadcasts to {x_known.shape}, got {mask.shape}")
    mask = mask.astype(bool)

    def hook(x, level, rng):
        if x.shape != x_known.shape:
            raise ValueError(f"x_known: expected the shape of the samples {x.shape}, got {x_known.shape}")
        alpha, sigma_t = alpha_sigma(schedule.sigmas[level])
        noise = jax.random.normal(rng, x.shape, jnp.float32)
        return jnp.where(mask, x, (alpha * x_known + sigma_t * noise).astype(x.dtype))

    return hook


def step_keys(rng, i):
    """(noise key, hook key) of step i, as the DDPM/DDIM samplers draw them."""
    keys = jax.random.split(jax.random.fold_in(rng, i))
    return keys[0], keys[1]


def check_solver_options(schedule, order, max_order, objective, dynamic_threshold):
    if not isinstance(schedule, SolverSchedule):
        raise ValueError(f"schedule: expected a SolverSchedule (diffusion.solver_schedule), "
                         f"got {type(schedule).__name__}")
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or not 1 <= order <= max_order:
        raise ValueError(f"order: expected an int in [1, {max_order}], got {order!r}")
    process.check_objective(objective)
    if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
        raise ValueError(f"dynamic_threshold: expected a percentile in (0, 1], got {dynamic_threshold}")
