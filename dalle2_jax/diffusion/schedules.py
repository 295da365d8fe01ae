"""Noise schedules: the betas of a Gaussian diffusion and everything derived from them.

Everything is computed in float64 NumPy and stored as jnp arrays, so a schedule is a
pytree that jit/vmap/scan can carry. A respaced schedule (improved DDPM's SpacedDiffusion)
keeps a subset of the original steps; `timesteps[i]` is the original training timestep of
index i, which is what a denoiser is conditioned on.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class DiffusionSchedule:
    """A discrete Gaussian diffusion; arrays are indexed by step i in [0, num_timesteps)."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    timesteps: jax.Array
    num_timesteps: int = struct.field(pytree_node=False)

    @property
    def dtype(self):
        return self.betas.dtype


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021): alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), betas clipped."""
    _check_num_timesteps(num_timesteps)
    if not 0.0 < max_beta <= 1.0:
        raise ValueError(f"max_beta: expected a value in (0, 1], got {max_beta}")

    def alpha_bar(frac):
        return math.cos((frac + s) / (1 + s) * math.pi / 2) ** 2

    betas = [
            min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
            for i in range(num_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Ho et al. (2020) linear betas 1e-4..0.02 at T=1000, rescaled by 1000/T (improved DDPM)."""
    _check_num_timesteps(num_timesteps)
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def make_schedule(name_or_betas, num_timesteps: int | None = None, *, dtype=jnp.float32) -> DiffusionSchedule:
    """A schedule from "cosine" (alias "squaredcos_cap_v2") / "linear" (num_timesteps defaults to 1000) or a 1-D array of betas."""
    if isinstance(name_or_betas, str):
        num_timesteps = 1000 if num_timesteps is None else num_timesteps
        if name_or_betas in ("cosine", "squaredcos_cap_v2"):  # the latter: diffusers' name for it
            betas = cosine_betas(num_timesteps)
        elif name_or_betas == "linear":
            betas = linear_betas(num_timesteps)
        else:
            raise ValueError(f"name_or_betas: expected 'cosine', 'squaredcos_cap_v2', 'linear' or an array of betas, got {name_or_betas!r}")
    else:
        betas = np.asarray(name_or_betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"name_or_betas: expected a non-empty 1-D array of betas, got shape {betas.shape}")
        if num_timesteps is not None and num_timesteps != betas.size:
            raise ValueError(f"num_timesteps: got {num_timesteps} but name_or_betas holds {betas.size} betas")
    return _schedule_from_betas(betas, np.arange(betas.size), dtype)


def space_timesteps(num_timesteps: int, spec) -> list[int]:
    """The kept step indices, as improved-diffusion's `space_timesteps`.

    spec: an int N (N evenly spaced steps including 0 and T-1), "N" or "a,b,c" (that many
    steps from each of equal sections of [0, T)), a sequence of section counts, or "ddimN"
    (integer stride giving exactly N steps, starting at 0).
    """
    _check_num_timesteps(num_timesteps)
    if isinstance(spec, str):
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"spec: expected 'ddimN' with an integer N, got {spec!r}") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            if desired == num_timesteps:
                return list(range(num_timesteps))
            raise ValueError(
                f"spec: cannot take exactly {desired} of {num_timesteps} steps with an integer stride ({spec!r})"
            )
        try:
            section_counts = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(f"spec: expected an int, 'a,b,c' section counts or 'ddimN', got {spec!r}") from None
    elif isinstance(spec, (int, np.integer)):
        section_counts = [int(spec)]
    elif isinstance(spec, Sequence) and all(isinstance(c, (int, np.integer)) for c in spec):
        section_counts = [int(c) for c in spec]
    else:
        raise ValueError(f"spec: expected an int, 'a,b,c' section counts or 'ddimN', got {spec!r}")
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"spec: every section count must be >= 1, got {spec!r}")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    steps = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(
                f"spec: cannot take {count} steps from a section of {size} steps ({spec!r} of {num_timesteps})"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(k * stride) for k in range(count)]
        start += size
    return sorted(set(steps))


def respace(schedule: DiffusionSchedule, spec) -> DiffusionSchedule:
    """Keep the steps `space_timesteps(T, spec)`; betas are recomputed from alpha_bar at those steps."""
    kept = np.asarray(space_timesteps(schedule.num_timesteps, spec))
    # Recover log(alpha_i) in float64 from the stored float32 arrays: log1p(-beta) is precise while
    # beta is small, the ratio of consecutive alpha_bars once beta is large (1 - beta would cancel).
    betas = np.asarray(schedule.betas, dtype=np.float64)
    log_alphas_cumprod = np.log(np.asarray(schedule.alphas_cumprod, dtype=np.float64))
    log_alphas = np.where(betas < 0.5, _log_alphas(betas), np.diff(log_alphas_cumprod, prepend=0.0))
    log_kept = np.cumsum(log_alphas)[kept]
    new_betas = -np.expm1(np.diff(log_kept, prepend=0.0))
    timesteps = np.asarray(schedule.timesteps)[kept]
    return _schedule_from_betas(new_betas, timesteps, schedule.dtype)


def _check_num_timesteps(num_timesteps):
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps: expected a positive int, got {num_timesteps!r}")


def _log_alphas(betas: np.ndarray) -> np.ndarray:
    # A beta of exactly 1 would make log(alpha_bar) -inf; alpha_bar ~ 1e-12 is as good as 0.
    return np.log1p(-np.minimum(betas, 1.0 - 1e-12))


def _schedule_from_betas(betas: np.ndarray, timesteps: np.ndarray, dtype) -> DiffusionSchedule:
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0.0) or np.any(betas > 1.0):
        raise ValueError(f"betas: expected values in (0, 1], got min {betas.min()} max {betas.max()}")
    log_alphas_cumprod = np.cumsum(_log_alphas(betas))
    alphas_cumprod = np.exp(log_alphas_cumprod)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    one_minus = -np.expm1(log_alphas_cumprod)  # 1 - alpha_bar without cancellation
    one_minus_prev = np.append(0.0, one_minus[:-1])
    posterior_variance = betas * one_minus_prev / one_minus
    # The true posterior variance at step 0 is 0; the log is clipped to step 1's (improved DDPM).
    first_nonzero = posterior_variance[1] if betas.size > 1 else betas[0]
    posterior_log_variance_clipped = np.log(np.append(first_nonzero, posterior_variance[1:]))
    arrays = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(one_minus),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(one_minus / alphas_cumprod),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / one_minus,
            posterior_mean_coef2=one_minus_prev * np.sqrt(1.0 - betas) / one_minus,
    )
    return DiffusionSchedule(
            **{name: jnp.asarray(value, dtype=dtype) for name, value in arrays.items()},
            timesteps=jnp.asarray(timesteps, dtype=jnp.int32),
            num_timesteps=int(betas.size),
    )
