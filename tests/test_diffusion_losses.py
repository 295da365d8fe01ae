"""training_losses: targets, the variational bound against closed forms, finiteness at every t."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from dalle2_jax import diffusion

T = 1000
IMAGE = (2, 2, 3)


@pytest.fixture(scope="module")
def sched():
    return diffusion.make_schedule("cosine", num_timesteps=T)


@pytest.fixture(scope="module")
def ref():
    betas = diffusion.cosine_betas(T)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    return dict(betas=betas, abar=abar, abar_prev=abar_prev, post_var=post_var,
                log_small=np.log(np.append(post_var[1], post_var[1:])),
                coef1=betas * np.sqrt(abar_prev) / (1 - abar))


@functools.partial(jax.jit, static_argnames=("objective", "learned_variance", "data_likelihood"))
def losses(sched, model_output, x_start, x_t, t, noise, objective="eps", learned_variance=True,
           data_likelihood="discretized"):
    return diffusion.training_losses(
        sched, model_output, x_start=x_start, x_t=x_t, t=t, noise=noise, objective=objective,
        learned_variance=learned_variance, data_likelihood=data_likelihood,
    )


def every_step_batch(sched, seed, shape=IMAGE):
    """One example per t in [0, T): images on the 256-level grid in [-1, 1], with their x_t."""
    rng = np.random.default_rng(seed)
    x_start = jnp.asarray(rng.integers(0, 256, (T,) + shape) / 127.5 - 1.0, jnp.float32)
    noise = jnp.asarray(rng.standard_normal((T,) + shape), jnp.float32)
    t = jnp.arange(T)
    return x_start, diffusion.q_sample(sched, x_start, t, noise), t, noise


def with_variance(prediction, v):
    return jnp.concatenate([prediction, jnp.broadcast_to(v, prediction.shape).astype(prediction.dtype)], axis=-1)


@pytest.mark.parity_numpy
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_mse_targets(sched, objective):
    x_start, x_t, t, noise = every_step_batch(sched, 0)
    output = jnp.asarray(np.random.default_rng(1).standard_normal(x_t.shape), jnp.float32)
    got = losses(sched, output, x_start, x_t, t, noise, objective=objective, learned_variance=False)
    a = np.asarray(sched.alphas_cumprod, np.float64)[:, None, None, None]
    target = {"eps": noise, "x0": x_start, "v": np.sqrt(a) * noise - np.sqrt(1 - a) * x_start}[objective]
    want = np.mean((np.asarray(output, np.float64) - target) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(got["mse"], want, rtol=1e-5)
    np.testing.assert_array_equal(got["loss"], got["mse"])
    assert set(got) == {"loss", "mse"}


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_vlb_vanishes_for_the_true_posterior(sched, objective):
    """Model output = the true target and v = -1 (variance beta_tilde): p = q, so L_t = 0 for t > 0."""
    x_start, x_t, t, noise = every_step_batch(sched, 2)
    target = {"eps": noise, "x0": x_start, "v": diffusion.v_from_x0_eps(sched, x_start, t, noise)}[objective]
    got = losses(sched, with_variance(target, -1.0), x_start, x_t, t, noise, objective=objective)
    # float32 rounding only: the target is recomputed inside the jitted loss, fused differently
    assert np.asarray(got["mse"]).max() < 1e-12, np.asarray(got["mse"]).max()
    vlb = np.asarray(got["vlb"])
    assert np.abs(vlb[1:]).max() < 1e-4, np.abs(vlb[1:]).max()
    assert vlb[0] > 0.1  # t = 0 is the decoder NLL of a Gaussian as wide as a pixel bin, not a KL


@pytest.mark.parity_numpy
@pytest.mark.parametrize("v", [-1.0, 1.0, 0.3])
def test_vlb_equals_closed_form_kl(sched, ref, v):
    """eps prediction off by delta: the model mean moves by -coef1 * sqrt(1/abar - 1) * delta."""
    steps = np.array([1, 10, 300, 700, 999])
    delta = np.array([0.5, -0.2, 1.0, 0.05, -0.3])
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((len(steps),) + IMAGE)
    x_start = np.clip(rng.standard_normal((len(steps),) + IMAGE) * 0.5, -1, 1)
    a = ref["abar"][steps][:, None, None, None]
    x_t = np.sqrt(a) * x_start + np.sqrt(1 - a) * noise
    output = with_variance(jnp.asarray(noise + delta[:, None, None, None], jnp.float32), v)
    got = losses(sched, output, *(jnp.asarray(z, jnp.float32) for z in (x_start, x_t)), jnp.asarray(steps),
                 jnp.asarray(noise, jnp.float32))

    frac = (v + 1) / 2
    log_true = ref["log_small"][steps]
    log_model = frac * np.log(ref["betas"][steps]) + (1 - frac) * log_true
    mean_shift = ref["coef1"][steps] * np.sqrt(1 / ref["abar"][steps] - 1) * delta
    kl = 0.5 * (log_model - log_true - 1 + np.exp(log_true - log_model) + mean_shift**2 / np.exp(log_model))
    np.testing.assert_allclose(got["vlb"], kl / math.log(2), rtol=2e-3)


@pytest.mark.parity_numpy
@pytest.mark.parametrize("v", [-1.0, 1.0])
def test_decoder_nll_at_step_zero_matches_scipy(sched, ref, v):
    levels = np.array([-1.0, -1 + 2 / 255, -0.5 - 1 / 255, 0.0 + 1 / 255, 0.6 + 1 / 255, 1 - 2 / 255, 1.0])
    offsets = np.array([0.004, -0.01, 0.0, 0.007, -0.003, 0.012, -0.006])
    x_start = np.tile(levels, (4, 1))[..., None]  # 4 examples of shape (7, 1)
    prediction = x_start + offsets[None, :, None] * np.arange(1, 5)[:, None, None] / 2
    # At t = 0, alpha_bar_prev = 1: the model mean is exactly the x0 prediction, whatever x_t is.
    x_t = np.zeros_like(x_start)
    t = np.zeros(4, np.int32)
    got = losses(sched, with_variance(jnp.asarray(prediction, jnp.float32), v), jnp.asarray(x_start, jnp.float32),
                 jnp.asarray(x_t, jnp.float32), jnp.asarray(t), jnp.zeros(x_start.shape), objective="x0")
    log_var = np.log(ref["betas"][0]) if v == 1.0 else ref["log_small"][0]
    std = np.exp(0.5 * log_var)
    upper = norm.cdf((x_start + 1 / 255 - prediction) / std)
    lower = norm.cdf((x_start - 1 / 255 - prediction) / std)
    prob = np.where(x_start < -0.999, upper, np.where(x_start > 0.999, 1 - lower, upper - lower))
    want = -np.log(prob).mean(axis=(1, 2)) / math.log(2)
    np.testing.assert_allclose(got["vlb"], want, rtol=1e-4)


@pytest.mark.parity_numpy
def test_gaussian_decoder_nll_for_vectors(sched, ref):
    rng = np.random.default_rng(4)
    x_start = rng.standard_normal((3, 8)) * 2.0  # embeddings: continuous and not in [-1, 1]
    prediction = x_start + rng.standard_normal((3, 8)) * 0.01
    got = losses(sched, with_variance(jnp.asarray(prediction, jnp.float32), 0.0), jnp.asarray(x_start, jnp.float32),
                 jnp.zeros((3, 8)), jnp.zeros(3, jnp.int32), jnp.zeros((3, 8)), objective="x0",
                 data_likelihood="gaussian")
    log_var = 0.5 * np.log(ref["betas"][0]) + 0.5 * ref["log_small"][0]
    want = -norm.logpdf(x_start, loc=prediction, scale=np.exp(0.5 * log_var)).mean(axis=1) / math.log(2)
    np.testing.assert_allclose(got["vlb"], want, rtol=1e-4)


@pytest.mark.parametrize(
    "objective, dtype", [("eps", jnp.bfloat16), ("x0", jnp.bfloat16), ("v", jnp.bfloat16), ("eps", jnp.float32)]
)
def test_hybrid_loss_and_gradient_are_finite_at_every_step(sched, objective, dtype):
    x_start, x_t, t, noise = every_step_batch(sched, 5)
    rng = np.random.default_rng(6)
    prediction = rng.standard_normal(x_t.shape) * 1.5
    v = rng.uniform(-1, 1, x_t.shape)
    v[1::7], v[5::13] = 1.0, -1.0  # the ends of the learned range, at many t
    v[3::11] = -3.0  # and outside it
    output = jnp.asarray(np.concatenate([prediction, v], axis=-1), dtype)

    def mean_loss(output, x_start, x_t, t, noise):
        return diffusion.training_losses(sched, output, x_start=x_start, x_t=x_t, t=t, noise=noise,
                                         objective=objective, learned_variance=True)["loss"].mean()

    # Separate forward and gradient programs: XLA compiles value_and_grad of this ~3x slower.
    grad = jax.jit(jax.grad(mean_loss))(output, x_start, x_t, t, noise)
    terms = losses(sched, output, x_start, x_t, t, noise, objective=objective)
    assert grad.dtype == dtype and terms["loss"].dtype == jnp.float32
    for name, array in [("loss", terms["loss"]), ("vlb", terms["vlb"]), ("grad", grad.astype(jnp.float32))]:
        bad = np.flatnonzero(~np.isfinite(np.asarray(array).reshape(T, -1)).all(axis=1))
        assert bad.size == 0, f"{name} not finite at t = {bad[:10]}"
    # T * vlb_weight = 1: the hybrid loss is improved-diffusion's mse + vb.
    np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vlb"], rtol=1e-6)


def test_vlb_trains_only_the_variance(sched):
    """Stop-gradient on the mean inside L_vlb: d loss / d prediction = d mse / d prediction."""
    x_start, x_t, t, noise = (z[::50] for z in every_step_batch(sched, 7))
    rng = np.random.default_rng(8)
    prediction = rng.standard_normal(x_t.shape)
    output = jnp.asarray(np.concatenate([prediction, rng.uniform(-1, 1, x_t.shape)], -1), jnp.float32)

    def total(output, x_start, x_t, t, noise, key):
        terms = diffusion.training_losses(sched, output, x_start=x_start, x_t=x_t, t=t, noise=noise,
                                          learned_variance=True, vlb_weight=0.01)
        return terms[key].sum()

    grad = jax.jit(jax.grad(total), static_argnums=5)
    loss_pred_grad, loss_var_grad = jnp.split(grad(output, x_start, x_t, t, noise, "loss"), 2, axis=-1)
    vlb_pred_grad, vlb_var_grad = jnp.split(grad(output, x_start, x_t, t, noise, "vlb"), 2, axis=-1)
    mse_grad = 2 * (prediction - np.asarray(noise, np.float64)) / np.prod(IMAGE)
    np.testing.assert_allclose(loss_pred_grad, mse_grad, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(vlb_pred_grad) == 0.0)
    np.testing.assert_allclose(loss_var_grad, 0.01 * T * vlb_var_grad, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(loss_var_grad)).max() > 1e-3


@pytest.mark.parity_numpy
def test_min_snr_weighting_is_the_clipped_snr_times_the_x0_error(sched):
    """Min-SNR-gamma: whatever the objective, "loss" = min(SNR_t, gamma) * |x0 - x0_hat|^2 for the
    output that implies the same x0_hat; "mse" stays the objective's unweighted error."""
    x_start, x_t, t, noise = every_step_batch(sched, 0)
    x0_hat = x_start + 0.1 * jnp.asarray(np.random.default_rng(2).standard_normal(x_t.shape), jnp.float32)
    eps_hat = diffusion.predict_eps_from_x0(sched, x_t, t, x0_hat)
    outputs = {"x0": x0_hat, "eps": eps_hat, "v": diffusion.v_from_x0_eps(sched, x0_hat, t, eps_hat)}
    a = np.asarray(sched.alphas_cumprod, np.float64)
    snr = a / (1 - a)
    x0_error = np.mean((np.asarray(x0_hat, np.float64) - np.asarray(x_start, np.float64)) ** 2, axis=(1, 2, 3))
    gamma = 5.0
    for objective, output in outputs.items():
        got = diffusion.training_losses(sched, output, x_start=x_start, x_t=x_t, t=t, noise=noise,
                                        objective=objective, snr_gamma=gamma)
        unweighted = diffusion.training_losses(sched, output, x_start=x_start, x_t=x_t, t=t, noise=noise,
                                               objective=objective)
        np.testing.assert_array_equal(got["mse"], unweighted["mse"])
        assert np.all(np.isfinite(np.asarray(got["loss"])))
        # The last steps' x_t carries almost no x0, where eps and v reconstructions lose precision.
        keep = slice(0, 990) if objective != "x0" else slice(None)
        np.testing.assert_allclose(got["loss"][keep], (np.minimum(snr, gamma) * x0_error)[keep], rtol=2e-3)
    # gamma above every SNR: the x0 objective's weights are the SNR itself; below, a constant.
    weights = diffusion.min_snr_weights(sched, t, "x0", 1e9)
    np.testing.assert_allclose(weights, snr, rtol=1e-4)
    np.testing.assert_allclose(diffusion.min_snr_weights(sched, t[:500], "v", 1e-3),
                               1e-3 * (1 - a[:500]), rtol=1e-4)


def test_bad_arguments_name_themselves(sched):
    x = jnp.zeros((2, 3))
    t = jnp.zeros(2, jnp.int32)
    with pytest.raises(ValueError, match="objective"):
        diffusion.training_losses(sched, x, x_start=x, x_t=x, t=t, noise=x, objective="score")
    with pytest.raises(ValueError, match="snr_gamma"):
        diffusion.training_losses(sched, x, x_start=x, x_t=x, t=t, noise=x, snr_gamma=-1.0)
    with pytest.raises(ValueError, match="data_likelihood"):
        diffusion.training_losses(sched, jnp.zeros((2, 6)), x_start=x, x_t=x, t=t, noise=x, learned_variance=True,
                                  data_likelihood="laplace")
    with pytest.raises(ValueError, match="model_output"):
        diffusion.training_losses(sched, x, x_start=x, x_t=x, t=t, noise=x, learned_variance=True)
    with pytest.raises(ValueError, match="x_start"):
        diffusion.training_losses(sched, x, x_start=jnp.zeros((2, 4)), x_t=x, t=t, noise=x)
