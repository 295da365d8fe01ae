"""The forward process, the posterior and the prediction conversions against float64 NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax import diffusion

T = 1000
# Jitted once per static configuration: far cheaper than compiling every primitive eagerly.
model_predictions = jax.jit(
    diffusion.model_predictions,
    static_argnames=("objective", "learned_variance", "clip_denoised", "dynamic_threshold", "fixed_variance"),
)
STEPS = np.array([0, 1, 17, 250, 500, 998, 999])


@pytest.fixture(scope="module")
def sched():
    return diffusion.make_schedule("cosine", num_timesteps=T)


@pytest.fixture(scope="module")
def ref():
    """Float64 reference quantities built from the betas alone."""
    betas = diffusion.cosine_betas(T)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    return dict(betas=betas, abar=abar, abar_prev=abar_prev)


@pytest.mark.parity_numpy
def test_q_sample_matches_reference_and_statistics(sched, ref):
    x0 = np.array([0.7, -0.3, 1.2], np.float32)
    n = 100_000
    t = np.repeat(STEPS, n // len(STEPS) + 1)[:n]
    noise = jax.random.normal(jax.random.key(0), (n, 3))
    x_t = jax.jit(diffusion.q_sample)(sched, jnp.broadcast_to(x0, (n, 3)), jnp.asarray(t), noise)
    a = ref["abar"][t][:, None]
    want = np.sqrt(a) * x0 + np.sqrt(1 - a) * np.asarray(noise, np.float64)
    np.testing.assert_allclose(x_t, want, rtol=1e-5, atol=1e-6)
    for step in (1, 500, 999):
        chunk = np.asarray(x_t)[t == step]
        se = 1 / np.sqrt(len(chunk))
        np.testing.assert_allclose(chunk.mean(0), np.sqrt(ref["abar"][step]) * x0, atol=5 * se)
        np.testing.assert_allclose(chunk.var(0), np.full(3, 1 - ref["abar"][step]), rtol=5 * np.sqrt(2) * se)

    mean, var, log_var = diffusion.q_mean_variance(sched, jnp.broadcast_to(x0, (len(STEPS), 3)), jnp.asarray(STEPS))
    a = ref["abar"][STEPS][:, None]
    np.testing.assert_allclose(mean, np.sqrt(a) * x0, rtol=1e-6)
    np.testing.assert_allclose(var, np.broadcast_to(1 - a, (len(STEPS), 3)), rtol=1e-5)
    np.testing.assert_allclose(log_var, np.log(np.broadcast_to(1 - a, (len(STEPS), 3))), rtol=1e-5, atol=1e-6)


@pytest.mark.parity_numpy
def test_posterior_is_bayes_rule(sched, ref):
    """q(x_{t-1} | x_t, x_0) from precision-weighting q(x_t | x_{t-1}) and q(x_{t-1} | x_0)."""
    rng = np.random.default_rng(0)
    t = STEPS[1:]  # t = 0 has no x_{t-1}; see the clipped-log test below
    x0 = rng.standard_normal((len(t), 2))
    x_t = rng.standard_normal((len(t), 2))
    beta, a_prev = ref["betas"][t][:, None], ref["abar_prev"][t][:, None]
    precision = 1 / (1 - a_prev) + (1 - beta) / beta
    var = 1 / precision
    mean = var * (np.sqrt(a_prev) * x0 / (1 - a_prev) + np.sqrt(1 - beta) * x_t / beta)
    got_mean, got_var, got_log_var = diffusion.q_posterior_mean_variance(
        sched, jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t)
    )
    np.testing.assert_allclose(got_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_var, np.broadcast_to(var, x0.shape), rtol=1e-5)
    np.testing.assert_allclose(got_log_var, np.log(np.broadcast_to(var, x0.shape)), rtol=1e-5)


@pytest.mark.parity_numpy
def test_posterior_log_variance_is_clipped_at_step_zero(sched, ref):
    var1 = ref["betas"][1] * (1 - ref["abar"][0]) / (1 - ref["abar"][1])
    zeros = jnp.zeros((1, 2))
    _, var, log_var = diffusion.q_posterior_mean_variance(sched, zeros, zeros, jnp.zeros(1, jnp.int32))
    np.testing.assert_array_equal(var, 0.0)
    np.testing.assert_allclose(log_var, np.full((1, 2), np.log(var1)), rtol=1e-6)


@pytest.mark.parity_numpy
def test_eps_x0_v_conversions_round_trip(sched, ref):
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((len(STEPS), 5))
    eps = rng.standard_normal((len(STEPS), 5))
    a = ref["abar"][STEPS][:, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    v = np.sqrt(a) * eps - np.sqrt(1 - a) * x0
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    t = jnp.asarray(STEPS)
    np.testing.assert_allclose(diffusion.v_from_x0_eps(sched, f32(x0), t, f32(eps)), v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(diffusion.x0_from_v(sched, f32(x_t), t, f32(v)), x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(diffusion.eps_from_v(sched, f32(x_t), t, f32(v)), eps, rtol=1e-5, atol=1e-5)
    # eps <-> x0 is ill-conditioned at the ends (1/sqrt(abar) ~ 2e4 at t = 999): compare where it is not.
    mid = slice(0, 5)
    np.testing.assert_allclose(diffusion.predict_x0_from_eps(sched, f32(x_t), t, f32(eps))[mid], x0[mid], atol=2e-4)
    np.testing.assert_allclose(diffusion.predict_eps_from_x0(sched, f32(x_t), t, f32(x0))[2:], eps[2:], atol=2e-4)


def test_coefficients_broadcast_over_images_and_vectors(sched):
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32)
    t = jnp.array([5, 400, 990])
    as_images = model_predictions(sched, eps, images, t, "eps", clip_denoised=True)
    as_vectors = model_predictions(sched, eps.reshape(3, -1), images.reshape(3, -1), t, "eps", clip_denoised=True)
    for got, want in zip(as_images, as_vectors):
        assert got.shape == images.shape
        np.testing.assert_allclose(got.reshape(3, -1), want, rtol=1e-6)
    scalar_t = diffusion.q_sample(sched, images, 400, eps)
    np.testing.assert_allclose(scalar_t, diffusion.q_sample(sched, images, jnp.full(3, 400), eps), rtol=1e-6)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_model_predictions_agree_across_objectives(sched, objective):
    rng = np.random.default_rng(3)
    x0 = jnp.asarray(rng.uniform(-0.9, 0.9, (4, 6)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    t = jnp.array([0, 10, 300, 900])
    x_t = diffusion.q_sample(sched, x0, t, eps)
    output = {"eps": eps, "x0": x0, "v": diffusion.v_from_x0_eps(sched, x0, t, eps)}[objective]
    got_x0, got_eps, mean, log_var = model_predictions(sched, output, x_t, t, objective, clip_denoised=False)
    np.testing.assert_allclose(got_x0, x0, atol=1e-4)
    np.testing.assert_allclose(got_eps, eps, atol=1e-3)
    want_mean, _, want_log_var = diffusion.q_posterior_mean_variance(sched, x0, x_t, t)
    np.testing.assert_allclose(mean, want_mean, atol=1e-5)
    np.testing.assert_allclose(log_var, want_log_var, rtol=1e-6)


@pytest.mark.parity_numpy
def test_learned_range_and_fixed_variances(sched, ref):
    t = jnp.array([0, 1, 500, 999])
    x_t = jnp.zeros((4, 3))
    small = np.log(np.append(ref["betas"][1] * (1 - ref["abar"][0]) / (1 - ref["abar"][1]),
                             ref["betas"][1:] * (1 - ref["abar_prev"][1:]) / (1 - ref["abar"][1:])))[t]
    large = np.log(ref["betas"])[t]
    for v, frac in [(-1.0, 0.0), (1.0, 1.0), (0.0, 0.5), (0.5, 0.75)]:
        output = jnp.concatenate([jnp.zeros((4, 3)), jnp.full((4, 3), v)], axis=-1)
        *_, log_var = model_predictions(sched, output, x_t, t, "eps", learned_variance=True)
        want = np.broadcast_to((frac * large + (1 - frac) * small)[:, None], (4, 3))
        np.testing.assert_allclose(log_var, want, rtol=1e-5, atol=1e-6)
    *_, log_var = model_predictions(sched, jnp.zeros((4, 3)), x_t, t, fixed_variance="large")
    large_fixed = np.where(np.asarray(t) == 0, small[0], large)
    np.testing.assert_allclose(log_var[:, 0], large_fixed, rtol=1e-5, atol=1e-6)
    *_, log_var = model_predictions(sched, jnp.zeros((4, 3)), x_t, t, fixed_variance="small")
    np.testing.assert_allclose(log_var[:, 0], small, rtol=1e-5)


@pytest.mark.parity_numpy
def test_clipping_and_dynamic_thresholding(sched):
    t = jnp.array([100, 100])
    x0 = jnp.stack([jnp.linspace(-3.0, 3.0, 101), jnp.linspace(-0.5, 0.5, 101)])
    x_t = diffusion.q_sample(sched, x0, t, jnp.zeros_like(x0))
    output = diffusion.predict_eps_from_x0(sched, x_t, t, x0)

    clipped, eps, mean, _ = model_predictions(sched, output, x_t, t, "eps", clip_denoised=True)
    np.testing.assert_allclose(clipped, np.clip(x0, -1, 1), atol=1e-4)
    # eps is recomputed from the clipped x0, so x_t = sqrt(abar) x0 + sqrt(1 - abar) eps still holds.
    np.testing.assert_allclose(diffusion.q_sample(sched, clipped, t, eps), x_t, atol=1e-5)

    p = 0.9
    s = np.maximum(np.quantile(np.abs(np.asarray(x0, np.float64)), p, axis=1), 1.0)[:, None]
    thresholded, *_ = model_predictions(sched, output, x_t, t, "eps", dynamic_threshold=p)
    np.testing.assert_allclose(thresholded, np.clip(x0, -s, s) / s, atol=1e-4)
    assert s[0, 0] == pytest.approx(2.7) and s[1, 0] == 1.0  # row 2 is inside [-1, 1]: untouched
    np.testing.assert_allclose(thresholded[1], x0[1], atol=1e-4)


def test_bad_arguments_name_themselves(sched):
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="objective"):
        diffusion.model_predictions(sched, x, x, jnp.zeros(2, jnp.int32), "score")
    with pytest.raises(ValueError, match="model_output"):
        diffusion.model_predictions(sched, x, x, jnp.zeros(2, jnp.int32), learned_variance=True)
    with pytest.raises(ValueError, match="fixed_variance"):
        diffusion.model_predictions(sched, x, x, jnp.zeros(2, jnp.int32), fixed_variance="medium")
    with pytest.raises(ValueError, match="dynamic_threshold"):
        diffusion.model_predictions(sched, x, x, jnp.zeros(2, jnp.int32), dynamic_threshold=99.5)
