"""DPM-Solver++ multistep (Lu et al. 2022, arXiv:2211.01095), orders 1-3, ODE and SDE, as one `lax.scan`.

The solver integrates the data prediction x0(x, t) in log-SNR lambda between the levels of a
`SolverSchedule` (diffusers' DPMSolverMultistepScheduler with algorithm_type "dpmsolver++" /
"sde-dpmsolver++", solver_type "midpoint", final_sigmas_type "zero"): the first steps warm up at
lower order, the last step (onto sigma = 0) is first order, and with lower_order_final and fewer
than 15 steps the second to last is at most second order. Each step costs one denoiser call.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax.diffusion.solver_schedule import (SolverSchedule, alpha_sigma, check_solver_options,
                                                  data_prediction, log_snr, model_call, step_keys)

LOWER_ORDER_FINAL_BELOW = 15  # steps; diffusers' threshold for the lower-order second-to-last step


def dpm_solver_orders(num_steps: int, order: int, lower_order_final: bool = True) -> np.ndarray:
    """The order of each of num_steps steps (warm-up and final steps lowered, as diffusers)."""
    orders = []
    for i in range(num_steps):
        final = i == num_steps - 1
        second = i == num_steps - 2 and lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW
        if order == 1 or i < 1 or final:
            orders.append(1)
        elif order == 2 or i < 2 or second:
            orders.append(2)
        else:
            orders.append(3)
    return np.asarray(orders, np.int32)


def _update(order: int, sde: bool, x, history, noise, sigmas, i):
    """x at sigmas[i] -> sigmas[i + 1] from the newest `order` data predictions (history[0] newest)."""
    alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
    _, sigma_s0 = alpha_sigma(sigmas[i])
    lambda_t, lambda_s0 = log_snr(sigmas[i + 1]), log_snr(sigmas[i])
    lambda_s1, lambda_s2 = log_snr(sigmas[jnp.maximum(i - 1, 0)]), log_snr(sigmas[jnp.maximum(i - 2, 0)])
    h = lambda_t - lambda_s0
    m0 = history[0]
    if order == 1:
        d1 = d2 = None
    elif order == 2:
        r0 = (lambda_s0 - lambda_s1) / h
        d1, d2 = (m0 - history[1]) / r0, None
    else:
        r0, r1 = (lambda_s0 - lambda_s1) / h, (lambda_s1 - lambda_s2) / h
        d1_0, d1_1 = (m0 - history[1]) / r0, (history[1] - history[2]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
    if not sde:
        x_t = (sigma_t / sigma_s0) * x - (alpha_t * (jnp.exp(-h) - 1.0)) * m0
        if order == 2:
            x_t = x_t - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
        elif order == 3:
            x_t = (x_t + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1
                   - (alpha_t * ((jnp.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2)
        return x_t
    decay = 1.0 - jnp.exp(-2.0 * h)
    x_t = (sigma_t / sigma_s0 * jnp.exp(-h)) * x + (alpha_t * decay) * m0 + sigma_t * jnp.sqrt(decay) * noise
    if order == 2:
        x_t = x_t + 0.5 * (alpha_t * decay) * d1
    elif order == 3:
        x_t = (x_t + (alpha_t * (decay / (-2.0 * h) + 1.0)) * d1
               + (alpha_t * ((decay - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2)
    return x_t


def dpm_solver_sample(
    denoiser: Callable[..., jax.Array],
    x_T: jax.Array,
    schedule: SolverSchedule,
    rng: jax.Array | None = None,
    *,
    cond: Mapping | None = None,
    order: int = 2,
    sde: bool = False,
    lower_order_final: bool = True,
    objective: str = "eps",
    learned_variance: bool = False,
    clip_denoised: bool = True,
    clip_range: float = 1.0,
    dynamic_threshold: float | None = None,
    step_hook: Callable | None = None,
    return_trajectory: bool = False,
):
    """DPM-Solver++ (order M, "dpm++2m" at 2; sde=True: DPM-Solver++ 2M SDE) from x_T at sigmas[0] to x_0.

    x_T is the variance-preserving sample at the first level (N(0, I) at the top of a schedule).
    step_hook(x, level, rng) -> x runs on each new state at schedule.sigmas[level] (inpainting:
    `solver_known_region_hook`). rng drives the SDE noise and the hook (step i: fold_in(rng, i)).
    return_trajectory: also return the states after each step, (N, *x_T.shape).
    """
    cond = {} if cond is None else dict(cond)
    check_solver_options(schedule, order, 3, objective, dynamic_threshold)
    if rng is None and (sde or step_hook is not None):
        raise ValueError("rng: required with sde=True or a step_hook, got None")
    call = model_call(denoiser, schedule, cond)
    sigmas = schedule.sigmas
    orders = dpm_solver_orders(schedule.num_steps, order, lower_order_final)
    branches = [lambda x, h, n, i, k=k: _update(k, sde, x, h, n, sigmas, i) for k in range(1, order + 1)]

    def step(carry, inputs):
        x, history = carry
        i, step_order = inputs
        x0 = data_prediction(call(x, i), x, sigmas[i], objective=objective, learned_variance=learned_variance,
                             clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold,
                             clip_range=clip_range)
        history = jnp.concatenate([x0[None].astype(history.dtype), history[:-1]])
        noise_key, hook_key = step_keys(rng, i) if rng is not None else (None, None)
        noise = jax.random.normal(noise_key, x.shape, history.dtype) if sde else None
        x_next = jax.lax.switch(step_order - 1, branches, x.astype(history.dtype), history, noise, i)
        x_next = x_next.astype(x_T.dtype)
        if step_hook is not None:
            x_next = step_hook(x_next, i + 1, hook_key).astype(x_T.dtype)
        return (x_next, history), x_next if return_trajectory else None

    dtype = jnp.result_type(jnp.float32, x_T.dtype, sigmas.dtype)
    history = jnp.zeros((order,) + x_T.shape, dtype)
    (x0, _), trajectory = jax.lax.scan(step, (x_T, history), (jnp.arange(schedule.num_steps), jnp.asarray(orders)))
    return (x0, trajectory) if return_trajectory else x0
