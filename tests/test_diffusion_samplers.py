"""Samplers with the exact denoiser of Gaussian data, against closed forms and float64 references.

Data: x_0 ~ N(MU, diag(SIG^2)) in 4 dims. Then E[x_0 | x_t] is linear in x_t and known, so every
sampler is exercised with a perfect network. Sample statistics are checked against exact float64
moments to Z standard errors (100k samples: means to 1.6% of SIG, stds to 1.1%); where a sampler
is not exact (fixed variances, deterministic DDIM), its float64 moments are held to the data's.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dalle2_jax import diffusion

MU = np.array([1.5, -2.0, 3.0, -4.0])
SIG = np.array([0.5, 0.75, 1.0, 1.5])
NUM_SAMPLES = 100_000
Z = 5.0  # standard errors: a false alarm ~6e-7 per checked statistic


@pytest.fixture(scope="module")
def full():
    return diffusion.make_schedule("cosine", num_timesteps=1000)


@pytest.fixture(scope="module")
def fast100(full):
    return diffusion.respace(full, 100)


@pytest.fixture(scope="module")
def x_T():
    return jax.random.normal(jax.random.key(0), (NUM_SAMPLES, 4))


# Compiled once for the module; the tests that share them also share batch shapes.
@pytest.fixture(scope="module")
def ddpm100(full, fast100):
    return sampler(diffusion.ddpm_sample, gaussian_denoiser(full), sched=fast100, clip_denoised=False)


@pytest.fixture(scope="module")
def ddim100(full, fast100):
    return sampler(diffusion.ddim_sample, gaussian_denoiser(full), sched=fast100, clip_denoised=False)


def exact_variance(sched):
    """Per-step, per-dim variance of the true reverse conditional q(x_{i-1} | x_i) of the Gaussian data."""
    a = np.asarray(sched.alphas_cumprod, np.float64)[:, None]
    var_x0_given_xt = SIG**2 * (1 - a) / (a * SIG**2 + 1 - a)
    coef1 = np.asarray(sched.posterior_mean_coef1, np.float64)[:, None]
    return np.asarray(sched.posterior_variance, np.float64)[:, None] + coef1**2 * var_x0_given_xt


def gaussian_denoiser(full, objective="eps", learned_for=None):
    """The optimal denoiser of N(MU, SIG^2) data; with learned_for=sched, also the v giving the exact variance."""
    sqrt_a_table, sqrt_1ma_table = full.sqrt_alphas_cumprod, full.sqrt_one_minus_alphas_cumprod
    mu, sig2 = jnp.asarray(MU, jnp.float32), jnp.asarray(SIG**2, jnp.float32)
    if learned_for is not None:
        small = np.asarray(learned_for.posterior_log_variance_clipped, np.float64)[:, None]
        large = np.log(np.asarray(learned_for.betas, np.float64))[:, None]
        frac = (np.log(np.maximum(exact_variance(learned_for), 1e-30)) - small) / (large - small)
        frac[0] = 0.0  # no noise is added at the last step
        v_table = jnp.asarray(2 * frac - 1, jnp.float32)
        index_of = np.zeros(full.num_timesteps, np.int32)
        index_of[np.asarray(learned_for.timesteps)] = np.arange(learned_for.num_timesteps)
        index_of = jnp.asarray(index_of)

    def denoiser(x, t):
        sqrt_a, sqrt_1ma = sqrt_a_table[t][:, None], sqrt_1ma_table[t][:, None]
        x0 = mu + sqrt_a * sig2 / (sqrt_a**2 * sig2 + sqrt_1ma**2) * (x - sqrt_a * mu)
        eps = (x - sqrt_a * x0) / sqrt_1ma
        out = {"eps": eps, "x0": x0, "v": sqrt_a * eps - sqrt_1ma * x0}[objective]
        if learned_for is not None:
            out = jnp.concatenate([out, v_table[index_of[t]]], axis=-1)
        return out

    return denoiser


def reference_moments(sched, kind, variance="small"):
    """Float64 mean/std of the sampler's output: each step is affine in x for this denoiser."""
    f64 = lambda name: np.asarray(getattr(sched, name), np.float64)
    A, A_prev, coef1, coef2 = (f64(name) for name in (
        "alphas_cumprod", "alphas_cumprod_prev", "posterior_mean_coef1", "posterior_mean_coef2"))
    step_var = {
        "small": np.exp(f64("posterior_log_variance_clipped"))[:, None] * np.ones(4),
        "large": np.append(f64("posterior_variance")[1], f64("betas")[1:])[:, None] * np.ones(4),
        "exact": exact_variance(sched),
    }[variance]
    mean, var = np.zeros(4), np.ones(4)  # moments of x, starting from x_T ~ N(0, 1)
    scale, shift = np.ones(4), np.zeros(4)  # the noise-free part of x: scale * x_T + shift
    for i in reversed(range(sched.num_timesteps)):
        a = A[i]
        gain = np.sqrt(a) * SIG**2 / (a * SIG**2 + 1 - a)  # x0_hat = gain * x + offset
        offset = MU * (1 - gain * np.sqrt(a))
        if kind == "ddpm":
            slope, intercept = coef1[i] * gain + coef2[i], coef1[i] * offset
            noise_var = step_var[i] if i > 0 else 0.0
        else:
            eps_gain, eps_offset = (1 - np.sqrt(a) * gain) / np.sqrt(1 - a), -np.sqrt(a) * offset / np.sqrt(1 - a)
            slope = np.sqrt(A_prev[i]) * gain + np.sqrt(1 - A_prev[i]) * eps_gain
            intercept = np.sqrt(A_prev[i]) * offset + np.sqrt(1 - A_prev[i]) * eps_offset
            noise_var = 0.0
        mean, var = slope * mean + intercept, slope**2 * var + noise_var
        scale, shift = slope * scale, slope * shift + intercept
    return mean, np.sqrt(var), scale, shift


def assert_moments(samples, mean, std, what):
    """Sample mean and std within Z standard errors (std / sqrt(n), std / sqrt(2n)) of the exact ones."""
    samples = np.asarray(samples, np.float64)
    n = len(samples)
    mean_z = np.abs(samples.mean(0) - mean) / (std / np.sqrt(n))
    std_z = np.abs(samples.std(0) - std) / (std / np.sqrt(2 * n))
    assert mean_z.max() < Z and std_z.max() < Z, f"{what}: mean off by {mean_z}, std by {std_z} standard errors"


def assert_matches_data(samples, what):
    assert_moments(samples, MU, SIG, what)


def assert_reference_near_data(mean, std, rtol, what):
    """A sampler's exact float64 output moments against the data's (no sampling error)."""
    assert np.all(np.abs(mean - MU) < 1e-3 * SIG), f"{what}: mean off by {(mean - MU) / SIG} of sigma"
    assert np.all(np.abs(std / SIG - 1) < rtol), f"{what}: std off by {std / SIG - 1}"


def sampler(fn, denoiser, **options):
    return jax.jit(functools.partial(fn, denoiser, **options))


@pytest.mark.parametrize(
    "steps, variance, check_data",
    [(1000, "small", True), (100, "large", True), (100, "exact", True), (100, "small", False)],
)
@pytest.mark.parity_numpy
def test_ddpm_samples_the_gaussian(full, x_T, steps, variance, check_data):
    sched = full if steps == 1000 else diffusion.respace(full, steps)
    learned = variance == "exact"
    denoiser = gaussian_denoiser(full, learned_for=sched if learned else None)
    run = sampler(diffusion.ddpm_sample, denoiser, sched=sched, learned_variance=learned,
                  fixed_variance="small" if learned else variance, clip_denoised=False)
    samples = np.asarray(run(x_T, rng=jax.random.key(steps)), np.float64)
    mean, std, _, _ = reference_moments(sched, "ddpm", variance)
    what = f"DDPM {steps} steps, {variance} variance"
    assert_moments(samples, mean, std, what)
    if variance == "exact":  # the true reverse conditionals: the data itself (float64 std within 1e-4)
        assert_matches_data(samples, what)
    elif check_data:  # measured: within 0.4% (1000 steps, small) and 0.9% (100 steps, large) of sigma
        assert_reference_near_data(mean, std, 0.015, what)
    else:
        # The fixed posterior variance misses coef1^2 Var[x0|x_t] per step: too narrow at 100 steps.
        assert np.all(std / SIG < 0.98)


def step_noises(rng, num_steps, shape):
    """The N(0, I) draw of each step i as the samplers make it: split(fold_in(rng, i))[0] (samplers.py)."""
    draw = lambda i: jax.random.normal(jax.random.split(jax.random.fold_in(rng, i))[0], shape)  # noqa: E731
    return np.asarray(jax.jit(jax.vmap(draw))(jnp.arange(num_steps)), np.float64)


def numpy_ddpm(sched, x_T, noises, variance):
    """Float64 ancestral sampling of the Gaussian data with the exact denoiser, given each step's noise."""
    f64 = lambda name: np.asarray(getattr(sched, name), np.float64)  # noqa: E731
    A, coef1, coef2 = f64("alphas_cumprod"), f64("posterior_mean_coef1"), f64("posterior_mean_coef2")
    log_var = {
        "small": f64("posterior_log_variance_clipped")[:, None] * np.ones(4),
        "large": np.log(np.append(f64("posterior_variance")[1], f64("betas")[1:]))[:, None] * np.ones(4),
        "exact": np.log(np.maximum(exact_variance(sched), 1e-30)),
    }[variance]
    x = np.asarray(x_T, np.float64)
    for i in reversed(range(sched.num_timesteps)):
        x0 = MU + np.sqrt(A[i]) * SIG**2 / (A[i] * SIG**2 + 1 - A[i]) * (x - np.sqrt(A[i]) * MU)
        x = coef1[i] * x0 + coef2[i] * x + (np.exp(0.5 * log_var[i]) * noises[i] if i > 0 else 0.0)
    return x


@pytest.mark.parity_numpy
@pytest.mark.parametrize("variance", ["small", "exact"])  # fixed, and learned (the model's v output)
def test_ddpm_matches_the_float64_reference_sample_by_sample(full, fast100, x_T, ddpm100, variance):
    """Every step's mean, variance and noise, to the last one (which adds none), with the sampler's own draws."""
    x, rng = x_T[:512], jax.random.key(11)
    if variance == "small":
        run = ddpm100
    else:
        learned = variance == "exact"
        run = sampler(diffusion.ddpm_sample, gaussian_denoiser(full, learned_for=fast100 if learned else None),
                      sched=fast100, learned_variance=learned, fixed_variance="small" if learned else variance,
                      clip_denoised=False)
    got = np.asarray(run(x, rng=rng), np.float64)
    want = numpy_ddpm(fast100, x, step_noises(rng, fast100.num_timesteps, x.shape), variance)
    # float32 rounding over 100 steps: measured <= 5.4e-6. Leaving out step 1's noise moves samples by 0.02-0.09.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parity_numpy
def test_ddim_is_the_affine_map_of_the_discrete_reference(full, x_T):
    """DDIM (eta = 0) with this denoiser is x_T -> scale * x_T + shift; compare sample by sample."""
    for steps in (50, 250):
        sched = diffusion.respace(full, steps)
        samples = sampler(diffusion.ddim_sample, gaussian_denoiser(full), sched=sched, clip_denoised=False)(x_T)
        _, std, scale, shift = reference_moments(sched, "ddim")
        np.testing.assert_allclose(samples, scale * np.asarray(x_T, np.float64) + shift, rtol=1e-4, atol=5e-4)
        samples = np.asarray(samples, np.float64)
        assert_moments(samples, shift, np.abs(scale), f"DDIM {steps} steps")  # x_T ~ N(0, I)
        if steps == 250:
            assert_reference_near_data(shift, np.abs(scale), 0.01, "DDIM 250 steps")  # measured: 0.5-0.6%
        else:
            # Deterministic DDIM shrinks the std by prod_i cos(theta_i - theta_{i-1}) for unit-variance
            # data (abar = cos^2 theta): >= 2.4% for ANY 50-step grid. Here: 2.5-3.1%, as the reference says.
            np.testing.assert_allclose(samples.std(0), std * np.asarray(x_T).std(0), rtol=1e-4)
            assert np.all((std / SIG > 0.965) & (std / SIG < 0.98))


@pytest.mark.parametrize("objective", ["x0", "v"])
def test_objectives_give_the_same_samples(full, fast100, x_T, ddim100, ddpm100, objective):
    x = x_T[:512]
    denoiser = gaussian_denoiser(full, objective)
    got = sampler(diffusion.ddim_sample, denoiser, sched=fast100, objective=objective, clip_denoised=False)(x)
    np.testing.assert_allclose(got, ddim100(x), rtol=1e-4, atol=2e-4)
    if objective == "v":
        run = sampler(diffusion.ddpm_sample, denoiser, sched=fast100, objective="v", clip_denoised=False)
        got = run(x, rng=jax.random.key(3))
        np.testing.assert_allclose(got, ddpm100(x, rng=jax.random.key(3)), rtol=1e-4, atol=2e-4)


def test_ddim_with_eta_one_is_ddpm(full, fast100, x_T, ddpm100):
    x, rng = x_T[:512], jax.random.key(4)
    run = sampler(diffusion.ddim_sample, gaussian_denoiser(full), sched=fast100, eta=1.0, clip_denoised=False)
    ddim = run(x, rng=rng)
    np.testing.assert_allclose(ddim, ddpm100(x, rng=rng), rtol=1e-4, atol=1e-4)


def test_ddim_inversion_reconstructs_x0(full, fast100, ddim100):
    x0 = jnp.asarray(MU + SIG * np.random.default_rng(5).standard_normal((512, 4)), jnp.float32)
    errors = {}
    for iters in (0, 1):
        latent = sampler(diffusion.ddim_invert, gaussian_denoiser(full), sched=fast100, fixed_point_iters=iters)(x0)
        errors[iters] = float(jnp.linalg.norm(ddim100(latent) - x0) / jnp.linalg.norm(x0))
        if iters:
            np.testing.assert_allclose(np.asarray(latent).std(0), np.ones(4), rtol=0.1)  # the latent looks like noise
    assert errors[1] < 1e-3, errors
    # The plain one-call inversion evaluates the model on the wrong side of each step.
    assert errors[0] > 10 * errors[1], errors


def test_sampling_is_one_scan_and_deterministic(full, fast100, x_T, ddpm100):
    calls = []

    def counting(x, t):
        calls.append(x.shape)
        return gaussian_denoiser(full)(x, t)

    run = functools.partial(diffusion.ddpm_sample, counting, sched=fast100, clip_denoised=False)
    jaxpr = jax.make_jaxpr(run)(jnp.zeros((8, 4)), rng=jax.random.key(0))
    assert [eqn.primitive.name for eqn in jaxpr.eqns].count("scan") == 1
    assert len(calls) == 1 and calls[0] == (8, 4)  # traced once, inside the scan body

    x = x_T[:512]
    first, second = ddpm100(x, rng=jax.random.key(2)), ddpm100(x, rng=jax.random.key(2))
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(ddpm100(x, rng=jax.random.PRNGKey(2)), first)  # raw uint32 keys work alike
    assert not np.allclose(first, ddpm100(x, rng=jax.random.key(3)))


def test_sharded_batch_equals_one_device(x_T, ddpm100, devices8):
    mesh = Mesh(np.asarray(devices8), ("data",))
    x = x_T[:512]
    one_device = ddpm100(jax.device_put(x, devices8[0]), rng=jax.random.key(7))
    sharded = ddpm100(jax.device_put(x, NamedSharding(mesh, P("data"))), rng=jax.random.key(7))
    assert len(sharded.sharding.device_set) == 8 and len(one_device.sharding.device_set) == 1
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(one_device), rtol=1e-5, atol=1e-6)


KNOWN = np.array([True, False, True, False])  # mask = ~KNOWN: dims 1 and 3 are generated


def assert_inpainted(samples, x_known, what):
    samples = np.asarray(samples, np.float64)
    np.testing.assert_array_equal(samples[:, KNOWN], np.asarray(x_known)[:, KNOWN])
    # The exact variance makes every step the true reverse conditional: the data, to sampling error.
    assert_moments(samples[:, ~KNOWN], MU[~KNOWN], SIG[~KNOWN], what)


@pytest.fixture(scope="module")
def x_known():
    data = MU + SIG * np.random.default_rng(8).standard_normal((NUM_SAMPLES, 4))
    data[:, ~KNOWN] = 100.0  # whatever sits in the generated region must not matter
    return jnp.asarray(data, jnp.float32)


def test_repaint_keeps_known_dims_and_samples_the_rest(full, x_T, x_known):
    # Few, large steps: a re-noising jump with the wrong level's beta would show in the statistics.
    fast15 = diffusion.respace(full, 15)
    run = sampler(diffusion.repaint_sample, gaussian_denoiser(full, learned_for=fast15), sched=fast15,
                  learned_variance=True, clip_denoised=False, jump_length=3, jump_n_sample=3)
    samples = run(x_T, rng=jax.random.key(9), x_known=x_known, mask=~KNOWN)
    assert_inpainted(samples, x_known, "RePaint with resampling")


def test_known_region_hook_inpaints_with_ddpm(full, fast100, x_T, x_known):
    hook = diffusion.known_region_hook(fast100, x_known, jnp.asarray(~KNOWN))
    run = sampler(diffusion.ddpm_sample, gaussian_denoiser(full, learned_for=fast100), sched=fast100,
                  learned_variance=True, clip_denoised=False, step_hook=hook)
    assert_inpainted(run(x_T, rng=jax.random.key(10)), x_known, "DDPM + known_region_hook")


def test_known_region_hook_noises_to_the_level_reached(fast100):
    """After step i the known region is a draw of q(x_{i-1} | x_known); the generated region is untouched."""
    x_known = jnp.asarray(np.tile(MU, (50_000, 1)), jnp.float32)
    x = jnp.full_like(x_known, 7.0)
    hook = jax.jit(diffusion.known_region_hook(fast100, x_known, jnp.asarray(~KNOWN)))
    for i in (0, 1, 50, 99):
        out = np.asarray(hook(x, jnp.int32(i), jax.random.key(i)), np.float64)
        np.testing.assert_array_equal(out[:, ~KNOWN], 7.0)
        if i == 0:
            np.testing.assert_array_equal(out[:, KNOWN], np.asarray(x_known)[:, KNOWN])
            continue
        a = float(fast100.alphas_cumprod[i - 1])
        std = np.sqrt(1 - a)
        assert_moments(out[:, KNOWN], np.sqrt(a) * MU[KNOWN], np.full(2, std), f"known region after step {i}")


@pytest.mark.parametrize("steps, jump_length, jump_n_sample", [(100, 10, 2), (250, 10, 10), (27, 5, 3), (15, 10, 1)])
def test_repaint_schedule_walks_down_with_jumps(steps, jump_length, jump_n_sample):
    pairs = diffusion.repaint_schedule(steps, jump_length, jump_n_sample)
    levels = [pairs[0][0]] + [cur for _, cur in pairs]
    assert levels[0] == steps - 1 and levels[-1] == -1
    assert all(abs(cur - last) == 1 for last, cur in pairs)
    jumps = len(range(0, steps - jump_length, jump_length)) * (jump_n_sample - 1)
    down = sum(cur < last for last, cur in pairs)
    assert down == steps + jumps * jump_length and len(pairs) - down == jumps * jump_length


def test_bad_arguments_name_themselves(full, fast100):
    den = gaussian_denoiser(full)
    x = jnp.zeros((2, 4))
    with pytest.raises(ValueError, match="objective"):
        diffusion.ddpm_sample(den, x, fast100, jax.random.key(0), objective="score")
    with pytest.raises(ValueError, match="fixed_variance"):
        diffusion.ddpm_sample(den, x, fast100, jax.random.key(0), fixed_variance="medium")
    with pytest.raises(ValueError, match="rng"):
        diffusion.ddim_sample(den, x, fast100, eta=0.5)
    with pytest.raises(ValueError, match="rng"):
        diffusion.ddpm_sample(den, x, fast100, None)
    with pytest.raises(ValueError, match="cond"):
        diffusion.ddim_sample(den, x, fast100, cond=[1, 2])
    with pytest.raises(ValueError, match="fixed_point_iters"):
        diffusion.ddim_invert(den, x, fast100, fixed_point_iters=-1)
    with pytest.raises(ValueError, match="x_known"):
        diffusion.repaint_sample(den, x, fast100, jax.random.key(0), x_known=jnp.zeros((3, 4)), mask=jnp.ones(4, bool))
    with pytest.raises(ValueError, match="mask"):
        diffusion.repaint_sample(den, x, fast100, jax.random.key(0), x_known=x, mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="mask"):
        diffusion.known_region_hook(fast100, x, jnp.ones((5, 4), bool))
