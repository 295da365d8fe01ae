"""UniPC multistep (Zhao et al. 2023, arXiv:2302.04867), B(h) = e^h - 1 ("bh2"), data prediction, one `lax.scan`.

Each step calls the denoiser once at the predictor's state x_i, uses that output first to
correct x_i (UniC, from the previous state and the same outputs; free, no extra call) and then
to predict x_{i+1} (UniP) from the corrected state. Orders warm up from 1 and, with
lower_order_final, fall to N - i in the last steps (the final step onto sigma = 0 is first
order), as diffusers' UniPCMultistepScheduler (predict_x0=True, solver_type="bh2",
final_sigmas_type "zero").
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax.diffusion.solver_schedule import (SolverSchedule, alpha_sigma, check_solver_options,
                                                  data_prediction, log_snr, model_call, step_keys)


def unipc_orders(num_steps: int, order: int, lower_order_final: bool = True) -> np.ndarray:
    """The predictor order of each step: min(order, i + 1) and, with lower_order_final, <= N - i."""
    return np.asarray([min(order, i + 1, num_steps - i if lower_order_final else order)
                       for i in range(num_steps)], np.int32)


def _coefficients(h, rks, order: int):
    """UniPC's (h phi_1(h), B(h), R, b) for the data-prediction form (hh = -h)."""
    hh = -h
    h_phi_1 = jnp.expm1(hh)
    b_h = jnp.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append(jnp.stack([r ** (k - 1) for r in rks]))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, jnp.stack(rows), jnp.stack(b)


def _differences(history, sigmas, base, h, offsets):
    """rks and D1s of the older outputs history[k] at levels base - offsets[k-1] against history[0]."""
    lambda_0 = log_snr(sigmas[base])
    rks, d1s = [], []
    for k, offset in enumerate(offsets, start=1):
        rk = (log_snr(sigmas[jnp.maximum(base - offset, 0)]) - lambda_0) / h
        rks.append(rk)
        d1s.append((history[k] - history[0]) / rk)
    return rks, d1s


def _predict(order: int, x, history, sigmas, i):
    """UniP: x at sigmas[i] -> sigmas[i + 1]; history[0] is the output at x."""
    alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
    _, sigma_s0 = alpha_sigma(sigmas[i])
    h = log_snr(sigmas[i + 1]) - log_snr(sigmas[i])
    x_t = sigma_t / sigma_s0 * x
    if order == 1:
        return x_t - alpha_t * jnp.expm1(-h) * history[0]
    rks, d1s = _differences(history, sigmas, i, h, range(1, order))
    h_phi_1, b_h, rows, b = _coefficients(h, rks + [jnp.ones_like(h)], order)
    rhos = [0.5] if order == 2 else list(jnp.linalg.solve(rows[:-1, :-1], b[:-1]))
    residual = sum(rho * d for rho, d in zip(rhos, d1s))
    return x_t - alpha_t * h_phi_1 * history[0] - alpha_t * b_h * residual


def _correct(order: int, model_t, last_x, history, sigmas, i):
    """UniC of the state at sigmas[i] predicted from last_x at sigmas[i - 1] with this order;
    model_t is the output at the predicted state, history[0] the one at last_x."""
    alpha_t, sigma_t = alpha_sigma(sigmas[i])
    _, sigma_s0 = alpha_sigma(sigmas[i - 1])
    h = log_snr(sigmas[i]) - log_snr(sigmas[i - 1])
    rks, d1s = _differences(history, sigmas, i - 1, h, range(1, order))
    h_phi_1, b_h, rows, b = _coefficients(h, rks + [jnp.ones_like(h)], order)
    rhos = [0.5] if order == 1 else list(jnp.linalg.solve(rows, b))
    residual = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), jnp.zeros_like(model_t))
    return (sigma_t / sigma_s0 * last_x - alpha_t * h_phi_1 * history[0]
            - alpha_t * b_h * (residual + rhos[-1] * (model_t - history[0])))


def unipc_sample(
    denoiser: Callable[..., jax.Array],
    x_T: jax.Array,
    schedule: SolverSchedule,
    rng: jax.Array | None = None,
    *,
    cond: Mapping | None = None,
    order: int = 2,
    lower_order_final: bool = True,
    objective: str = "eps",
    learned_variance: bool = False,
    clip_denoised: bool = True,
    clip_range: float = 1.0,
    dynamic_threshold: float | None = None,
    step_hook: Callable | None = None,
    return_trajectory: bool = False,
):
    """UniPC-bh2 of the given order from x_T at sigmas[0] to x_0, one denoiser call per step.

    step_hook(x, level, rng) -> x runs on every state at schedule.sigmas[level], predicted and
    corrected (with the same key, so both see the same noisy known region). rng is needed only
    for the hook. return_trajectory: also the predictor's states after each step, (N, *x_T.shape).
    """
    cond = {} if cond is None else dict(cond)
    check_solver_options(schedule, order, 3, objective, dynamic_threshold)
    if rng is None and step_hook is not None:
        raise ValueError("rng: required with a step_hook, got None")
    call = model_call(denoiser, schedule, cond)
    sigmas = schedule.sigmas
    orders = unipc_orders(schedule.num_steps, order, lower_order_final)
    predictors = [lambda x, h, i, k=k: _predict(k, x, h, sigmas, i) for k in range(1, order + 1)]
    # Branch 0: no correction (the first step).
    correctors = [lambda m, last, x, h, i: x] + [
        lambda m, last, x, h, i, k=k: _correct(k, m, last, h, sigmas, i) for k in range(1, order + 1)]

    def step(carry, inputs):
        x, last_x, history = carry
        i, step_order, previous_order = inputs
        dtype = history.dtype
        model_x0 = data_prediction(call(x, i), x, sigmas[i], objective=objective, learned_variance=learned_variance,
                                   clip_denoised=clip_denoised, dynamic_threshold=dynamic_threshold,
                             clip_range=clip_range).astype(dtype)
        x = jax.lax.switch(previous_order, correctors, model_x0, last_x, x.astype(dtype), history, i)
        if step_hook is not None:
            x = jnp.where(i > 0, step_hook(x, i, step_keys(rng, jnp.maximum(i - 1, 0))[1]), x).astype(dtype)
        history = jnp.concatenate([model_x0[None], history[:-1]])
        x_next = jax.lax.switch(step_order - 1, predictors, x, history, i).astype(x_T.dtype)
        if step_hook is not None:
            x_next = step_hook(x_next, i + 1, step_keys(rng, i)[1]).astype(x_T.dtype)
        return (x_next, x, history), x_next if return_trajectory else None

    dtype = jnp.result_type(jnp.float32, x_T.dtype, sigmas.dtype)
    history = jnp.zeros((order,) + x_T.shape, dtype)
    previous = np.concatenate([[0], orders[:-1]]).astype(np.int32)
    (x0, _, _), trajectory = jax.lax.scan(
        step, (x_T, x_T.astype(dtype), history),
        (jnp.arange(schedule.num_steps), jnp.asarray(orders), jnp.asarray(previous)))
    return (x0, trajectory) if return_trajectory else x0
