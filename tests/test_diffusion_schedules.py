"""Noise schedules and respacing against float64 NumPy references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax import diffusion


@pytest.fixture(scope="module")
def cosine():
    return diffusion.make_schedule("cosine", num_timesteps=1000)


def reference_cosine_alpha_bar(t_frac, s=0.008):
    return np.cos((t_frac + s) / (1 + s) * np.pi / 2) ** 2


@pytest.mark.parity_numpy
def test_cosine_betas_follow_the_alpha_bar_ratio():
    T = 1000
    betas = diffusion.cosine_betas(T)
    ratio = reference_cosine_alpha_bar(np.arange(1, T + 1) / T) / reference_cosine_alpha_bar(np.arange(T) / T)
    np.testing.assert_allclose(betas, np.minimum(1 - ratio, 0.999), rtol=1e-12)
    assert betas[-1] == 0.999  # alpha_bar(1) = 0, so the last beta is the clip
    # Away from the clipped end, alpha_bar is the closed form.
    np.testing.assert_allclose(
        np.cumprod(1 - betas)[:-1],
        reference_cosine_alpha_bar(np.arange(1, T) / T) / reference_cosine_alpha_bar(0.0),
        rtol=1e-9,
    )


@pytest.mark.parametrize("T", [50, 1000, 4000])
def test_linear_betas_are_scaled_to_any_length(T):
    betas = diffusion.linear_betas(T)
    assert betas.shape == (T,)
    np.testing.assert_allclose([betas[0], betas[-1]], [1e-4 * 1000 / T, 0.02 * 1000 / T], rtol=1e-12)
    np.testing.assert_allclose(np.diff(betas), np.full(T - 1, np.diff(betas).mean()), rtol=1e-9)


@pytest.mark.parity_numpy
def test_schedule_fields_match_float64_reference(cosine):
    betas = diffusion.cosine_betas(1000)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    expected = dict(
        betas=betas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1 - abar),
        sqrt_recip_alphas_cumprod=1 / np.sqrt(abar),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1 / abar - 1),
        posterior_variance=post_var,
        posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1 - abar),
        posterior_mean_coef2=(1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar),
    )
    for name, value in expected.items():
        got = getattr(cosine, name)
        assert got.dtype == jnp.float32, name
        np.testing.assert_allclose(np.asarray(got, np.float64), value, rtol=2e-6, atol=1e-30, err_msg=name)
    np.testing.assert_array_equal(cosine.timesteps, np.arange(1000))
    assert cosine.timesteps.dtype == jnp.int32 and cosine.num_timesteps == 1000


def test_schedule_is_a_pytree_with_static_length(cosine):
    assert len(jax.tree.leaves(cosine)) == 12

    @jax.jit
    def last_alpha_bar(sched):
        return sched.alphas_cumprod[sched.num_timesteps - 1]  # num_timesteps is a Python int here

    assert float(last_alpha_bar(cosine)) == float(cosine.alphas_cumprod[-1])


def test_make_schedule_from_betas_and_bad_input():
    betas = np.linspace(1e-3, 0.05, 20)
    sched = diffusion.make_schedule(betas)
    np.testing.assert_allclose(sched.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-6)
    with pytest.raises(ValueError, match="name_or_betas"):
        diffusion.make_schedule("quadratic")
    with pytest.raises(ValueError, match="betas"):
        diffusion.make_schedule(np.array([0.1, 1.5]))
    with pytest.raises(ValueError, match="num_timesteps"):
        diffusion.make_schedule(betas, num_timesteps=10)
    with pytest.raises(ValueError, match="num_timesteps"):
        diffusion.make_schedule("cosine", num_timesteps=0)


def test_space_timesteps_sections_follow_improved_diffusion():
    # 300 steps in 3 sections of 100; each section strided from its first to its last step.
    steps = np.asarray(diffusion.space_timesteps(300, "10,15,20"))
    assert len(steps) == 45
    for start, count, chunk in [(0, 10, steps[:10]), (100, 15, steps[10:25]), (200, 20, steps[25:])]:
        assert chunk[0] == start and chunk[-1] == start + 99
        stride = 99 / (count - 1)
        np.testing.assert_array_equal(chunk, start + np.round(np.arange(count) * stride))
    # Uneven sections: the first `T % n` sections get one extra step.
    steps = diffusion.space_timesteps(10, [2, 2, 2])
    assert steps == [0, 3, 4, 6, 7, 9]


@pytest.mark.parametrize("count", [15, 27, 64, 250])
def test_paper_step_counts_keep_both_ends(cosine, count):
    fast = diffusion.respace(cosine, count)
    kept = np.asarray(fast.timesteps)
    assert fast.num_timesteps == count and kept.shape == (count,)
    assert kept[0] == 0 and kept[-1] == 999 and np.all(np.diff(kept) > 0)
    gaps = np.diff(kept)
    assert gaps.max() - gaps.min() <= 1  # evenly strided
    # The kept steps see exactly the original noise levels.
    np.testing.assert_allclose(fast.alphas_cumprod, cosine.alphas_cumprod[kept], rtol=1e-6)
    abar = np.cumprod(1 - diffusion.cosine_betas(1000))[kept]
    np.testing.assert_allclose(fast.betas, 1 - abar / np.append(1.0, abar[:-1]), rtol=1e-5)
    for leaf in jax.tree.leaves(fast):
        assert np.all(np.isfinite(np.asarray(leaf)))
    assert np.all(np.asarray(fast.posterior_variance[1:]) > 0)


def test_ddim_spacing_uses_an_integer_stride(cosine):
    fast = diffusion.respace(cosine, "ddim50")
    np.testing.assert_array_equal(fast.timesteps, np.arange(0, 1000, 20))
    with pytest.raises(ValueError, match="spec"):
        diffusion.respace(cosine, "ddim999")  # no stride gives exactly 999 of 1000 steps


def test_respacing_a_respaced_schedule_keeps_original_timesteps(cosine):
    fast = diffusion.respace(diffusion.respace(cosine, 250), 27)
    inner = np.asarray(diffusion.respace(cosine, 250).timesteps)
    kept = inner[diffusion.space_timesteps(250, 27)]
    np.testing.assert_array_equal(fast.timesteps, kept)
    np.testing.assert_allclose(fast.alphas_cumprod, cosine.alphas_cumprod[kept], rtol=1e-6)


@pytest.mark.parametrize("spec", [0, 1001, "a,b", "ddimx", "10,0", 2.5])
def test_respace_rejects_bad_specs(cosine, spec):
    with pytest.raises(ValueError, match="spec"):
        diffusion.respace(cosine, spec)


def test_single_step_schedule_is_finite(cosine):
    one = diffusion.respace(cosine, 1)
    assert one.num_timesteps == 1 and int(one.timesteps[0]) == 0
    assert math.isfinite(float(one.posterior_log_variance_clipped[0]))
