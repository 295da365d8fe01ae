"""Samplers by name, for the stages: "ddim", "ddpm", "dpm++2m", "dpm++2m-sde", "dpm++3m", "unipc".

`sampler_schedule` turns a stage's training schedule into what the named sampler runs on (a
respaced DiffusionSchedule for DDPM/DDIM, a SolverSchedule for the solvers; host side, outside
jit) and `run_sampler` calls the sampler on it, so the prior and the UNet stages dispatch the
same way.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import jax

from dalle2_jax.diffusion import samplers
from dalle2_jax.diffusion.dpm_solver import dpm_solver_sample
from dalle2_jax.diffusion.schedules import DiffusionSchedule, respace
from dalle2_jax.diffusion.solver_schedule import SolverSchedule, solver_schedule
from dalle2_jax.diffusion.unipc import unipc_sample

SOLVERS = {
    "dpm++2m": (dpm_solver_sample, dict(order=2)),
    "dpm++2m-sde": (dpm_solver_sample, dict(order=2, sde=True)),
    "dpm++3m": (dpm_solver_sample, dict(order=3)),
    "unipc": (unipc_sample, dict(order=2)),
}
SAMPLERS = ("ddim", "ddpm", *SOLVERS)
DETERMINISTIC = ("ddim", "dpm++2m", "dpm++3m", "unipc")  # with eta 0: the same x_T gives the same sample


def check_sampler(sampler) -> str:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
    return sampler


def sampler_schedule(schedule, steps: int, sampler: str, spacing: str = "trailing"):
    """What `sampler` runs on for `steps` steps of the training schedule `schedule`; `schedule`
    itself when it already is that (a SolverSchedule, or a DiffusionSchedule of `steps` steps)."""
    check_sampler(sampler)
    if isinstance(schedule, SolverSchedule):
        if sampler not in SOLVERS or schedule.num_steps != steps:
            raise ValueError(f"schedule: a SolverSchedule of {schedule.num_steps} steps does not run "
                             f"{sampler!r} for {steps} steps")
        return schedule
    if sampler in SOLVERS:
        return solver_schedule(schedule, steps, spacing)
    return schedule if schedule.num_timesteps == steps else respace(schedule, steps)


def run_sampler(sampler: str, denoiser: Callable, x_T: jax.Array, schedule, rng, *, cond: Mapping | None = None,
                eta: float = 0.0, objective: str = "eps", learned_variance: bool = False, clip_denoised: bool = True,
                clip_range: float = 1.0, dynamic_threshold: float | None = None, step_hook=None) -> jax.Array:
    """The named sampler from x_T on `schedule` (from `sampler_schedule`); eta only for DDIM;
    x0 clipped to +-clip_range when clip_denoised."""
    check_sampler(sampler)
    options = dict(cond=cond, objective=objective, learned_variance=learned_variance, clip_denoised=clip_denoised,
                   clip_range=clip_range, dynamic_threshold=dynamic_threshold, step_hook=step_hook)
    if sampler in SOLVERS:
        if not isinstance(schedule, SolverSchedule):
            raise ValueError(f"schedule: expected a SolverSchedule for sampler {sampler!r}, "
                             f"got {type(schedule).__name__}")
        sample, fixed = SOLVERS[sampler]
        return sample(denoiser, x_T, schedule, rng, **fixed, **options)
    if not isinstance(schedule, DiffusionSchedule):
        raise ValueError(f"schedule: expected a DiffusionSchedule for sampler {sampler!r}, "
                         f"got {type(schedule).__name__}")
    if sampler == "ddim":
        return samplers.ddim_sample(denoiser, x_T, schedule, rng, eta=eta, **options)
    return samplers.ddpm_sample(denoiser, x_T, schedule, rng, **options)
