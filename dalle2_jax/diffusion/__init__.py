"""Gaussian diffusion: schedules, the forward process, losses, samplers and guidance (no networks)."""
from dalle2_jax.diffusion.by_name import DETERMINISTIC, SAMPLERS, SOLVERS, run_sampler, sampler_schedule
from dalle2_jax.diffusion.dpm_solver import dpm_solver_orders, dpm_solver_sample
from dalle2_jax.diffusion.guidance import classifier_free_guidance
from dalle2_jax.diffusion.losses import (
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    min_snr_weights,
    training_losses,
    vlb_terms,
)
from dalle2_jax.diffusion.process import (
    dynamic_threshold_x0,
    eps_from_v,
    model_log_variance,
    model_predictions,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    v_from_x0_eps,
    x0_from_v,
)
from dalle2_jax.diffusion.samplers import (
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    known_region_hook,
    repaint_sample,
    repaint_schedule,
)
from dalle2_jax.diffusion.solver_schedule import (
    SolverSchedule,
    solver_known_region_hook,
    solver_schedule,
)
from dalle2_jax.diffusion.unipc import unipc_orders, unipc_sample
from dalle2_jax.diffusion.schedules import (
    DiffusionSchedule,
    cosine_betas,
    linear_betas,
    make_schedule,
    respace,
    space_timesteps,
)

__all__ = [
    "DiffusionSchedule",
    "DETERMINISTIC",
    "SAMPLERS",
    "SOLVERS",
    "SolverSchedule",
    "run_sampler",
    "sampler_schedule",
    "dpm_solver_orders",
    "dpm_solver_sample",
    "solver_known_region_hook",
    "solver_schedule",
    "unipc_orders",
    "unipc_sample",
    "classifier_free_guidance",
    "cosine_betas",
    "ddim_invert",
    "ddim_sample",
    "ddpm_sample",
    "discretized_gaussian_log_likelihood",
    "dynamic_threshold_x0",
    "eps_from_v",
    "gaussian_log_likelihood",
    "known_region_hook",
    "linear_betas",
    "make_schedule",
    "mean_flat",
    "model_log_variance",
    "model_predictions",
    "normal_kl",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "repaint_sample",
    "repaint_schedule",
    "respace",
    "space_timesteps",
    "min_snr_weights",
    "training_losses",
    "v_from_x0_eps",
    "vlb_terms",
]
