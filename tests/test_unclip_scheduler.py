"""Parity of `ddpm_sample` on an int-respaced cosine schedule with diffusers' UnCLIPScheduler
(the prior, decoder and super-res schedulers of Karlo), the same per-step noise replayed into it."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax import diffusion

import torch  # the reference; installed by the dev extra
from diffusers.schedulers import scheduling_unclip  # the reference; installed by the dev extra

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("steps", [2, 3, 4, 7, 9, 25, 64, 333, 1000])
def test_timesteps_match_unclip_spacing(steps):
    reference = scheduling_unclip.UnCLIPScheduler()
    reference.set_timesteps(steps)
    ours = diffusion.respace(diffusion.make_schedule("cosine", 1000), steps)
    np.testing.assert_array_equal(np.asarray(ours.timesteps)[::-1], reference.timesteps.numpy())
    # The schedule itself: alpha_bar at the kept steps, within float32 rounding of torch's cumprod.
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod),
                               reference.alphas_cumprod.numpy()[np.asarray(ours.timesteps)], rtol=2e-5, atol=1e-7)


def test_round_half_to_even_decides_a_step():
    # 25 steps: 999 / 24 * 4 = 166.5 -> 166 (half to even), not 167.
    assert 166 in diffusion.space_timesteps(1000, 25)
    assert 167 not in diffusion.space_timesteps(1000, 25)


def _analytic_denoiser(x, t, out_channels):
    """A smooth function of (x, t) with large enough outputs that clipping matters."""
    scale = 1.0 + t.astype(jnp.float32)[:, None] / 250.0
    flat = x.reshape(x.shape[0], -1)
    out = 3.0 * jnp.tanh(flat * scale.reshape(-1, 1)) + 0.5 * jnp.roll(flat, 1, axis=1)
    out = out.reshape(x.shape)
    if out_channels != x.shape[-1]:
        var = jnp.tanh(0.3 * x + t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1)) / 1000.0)
        out = jnp.concatenate([out, var], axis=-1)
    return out


def _reference_loop(scheduler, x_T_nchw, steps, noises, model):
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    replay = iter(noises)
    original = scheduling_unclip.randn_tensor
    scheduling_unclip.randn_tensor = lambda shape, **kwargs: torch.from_numpy(next(replay).copy()).reshape(shape)
    try:
        x = torch.from_numpy(x_T_nchw.copy())
        for i, t in enumerate(timesteps):
            prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
            x = scheduler.step(model(x, t), t, x, prev_timestep=prev).prev_sample
    finally:
        scheduling_unclip.randn_tensor = original
    return x.numpy()


@pytest.mark.parametrize("case", ["prior", "decoder", "super_res"])
def test_ddpm_sample_matches_unclip_scheduler(case):
    steps = {"prior": 25, "decoder": 5, "super_res": 3}[case]
    if case == "prior":
        kwargs = dict(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0)
        ours = dict(objective="x0", clip_range=5.0)
        shape, out_channels = (3, 16), 16
    elif case == "decoder":
        kwargs = dict(variance_type="learned_range", prediction_type="epsilon", clip_sample_range=1.0)
        ours = dict(objective="eps", learned_variance=True)
        shape, out_channels = (2, 4, 4, 3), 6
    else:
        kwargs = dict(variance_type="fixed_small_log", prediction_type="epsilon", clip_sample_range=1.0)
        ours = dict(objective="eps")
        shape, out_channels = (2, 4, 4, 3), 3
    sched = diffusion.respace(diffusion.make_schedule("cosine", 1000), steps)
    rng = jax.random.key(7)
    x_T = jax.random.normal(jax.random.key(1), shape)
    denoiser = functools.partial(_analytic_denoiser, out_channels=out_channels)
    got = jax.jit(lambda x: diffusion.ddpm_sample(denoiser, x, sched, rng, **ours))(x_T)

    to_nchw = (lambda a: a) if len(shape) == 2 else (lambda a: np.moveaxis(a, -1, 1))
    to_nhwc = (lambda a: a) if len(shape) == 2 else (lambda a: np.moveaxis(a, 1, -1))
    # The noise of steps N-1 .. 1 (the last step, t = 0, draws none).
    noises = [np.ascontiguousarray(to_nchw(np.asarray(diffusion.step_noise(rng, i, shape))))
              for i in range(steps - 1, 0, -1)]

    def model(x, t):
        x = jnp.asarray(to_nhwc(x.numpy()))
        out = denoiser(x, jnp.full((x.shape[0],), int(t), jnp.int32))
        return torch.from_numpy(np.array(to_nchw(np.asarray(out))))

    x_T_nchw = np.array(to_nchw(np.asarray(x_T)))
    scheduler = scheduling_unclip.UnCLIPScheduler(**kwargs)
    reference32 = _reference_loop(scheduler, x_T_nchw, steps, noises, model)
    # Its float32 schedule loses ~1.5e-3 of 1 - alpha_bar_0 to cancellation (beta_0 ~ 4e-5), which
    # moves the last steps' coefficients and variances by ~5e-4 relative; ours is float64-derived.
    # With its schedule rebuilt in float64 the two agree to float32 rounding of the samples.
    scheduler.betas = torch.from_numpy(diffusion.cosine_betas(1000))
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    reference64 = _reference_loop(scheduler, x_T_nchw, steps, noises, model)
    np.testing.assert_allclose(np.asarray(got), to_nhwc(reference64), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(got), to_nhwc(reference32), atol=3e-3, rtol=0)
    # Not a vacuous match: the loop moved far from x_T, and clipping was active.
    assert np.abs(np.asarray(got) - np.asarray(x_T)).max() > 0.5
