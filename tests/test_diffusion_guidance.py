"""Classifier-free guidance: one batched call, the right mix, the variance half left alone."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax import diffusion

B, D = 3, 4


def toy_denoiser(calls, learned_variance=False):
    """Output depends on x, t, a class embedding and a drop flag (the null condition)."""

    def denoiser(x, t, *, emb, drop):
        calls.append((x.shape, t.shape, emb.shape, drop.shape))
        signal = jnp.where(drop[:, None], -1.0, emb)
        prediction = 0.5 * x + t[:, None] / 1000.0 + signal
        if learned_variance:
            return jnp.concatenate([prediction, jnp.tanh(signal + x)], axis=-1)
        return prediction

    return denoiser


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, D)), jnp.float32)
    t = jnp.array([0, 500, 999])
    cond = {"emb": jnp.asarray(rng.standard_normal((B, D)), jnp.float32), "drop": jnp.zeros(B, bool)}
    uncond = {"emb": jnp.zeros((B, D)), "drop": jnp.ones((), bool)}  # a scalar flag broadcasts over the batch
    return x, t, cond, uncond


@pytest.mark.parametrize("learned_variance", [False, True])
def test_guidance_mixes_conditional_and_unconditional(inputs, learned_variance):
    x, t, cond, uncond = inputs
    calls = []
    denoiser = toy_denoiser(calls, learned_variance)
    conditional = denoiser(x, t, **cond)
    unconditional = denoiser(x, t, emb=cond["emb"], drop=jnp.ones(B, bool))
    calls.clear()

    @jax.jit
    def guided_output(scale):
        guided = diffusion.classifier_free_guidance(denoiser, scale, uncond=uncond, learned_variance=learned_variance)
        return guided(x, t, **cond)

    half = slice(0, D) if learned_variance else slice(None)
    for scale in (0.0, 1.0, 3.0):  # 0: unconditional, 1: conditional
        got = guided_output(jnp.float32(scale))
        want = unconditional[:, half] + scale * (conditional[:, half] - unconditional[:, half])
        np.testing.assert_allclose(got[:, half], want, rtol=1e-6, atol=1e-6)
        if learned_variance:
            np.testing.assert_allclose(got[:, D:], conditional[:, D:], rtol=1e-6)  # the conditional variance
    # One denoiser call per guided call, on the doubled batch [x; x] with conds [cond; uncond].
    assert calls == [((2 * B, D), (2 * B,), (2 * B, D), (2 * B,))]


def test_guided_sampler_at_scale_one_is_the_conditional_sampler(inputs):
    x, _, cond, uncond = inputs
    sched = diffusion.respace(diffusion.make_schedule("cosine"), 15)
    calls = []
    denoiser = toy_denoiser(calls)
    guided = diffusion.classifier_free_guidance(denoiser, 1.0, uncond=uncond)
    run = lambda den: jax.jit(functools.partial(diffusion.ddim_sample, den, sched=sched, cond=cond))(x)
    np.testing.assert_allclose(run(guided), run(denoiser), rtol=1e-5, atol=1e-6)


def test_uncond_must_match_cond(inputs):
    x, t, cond, _ = inputs
    denoiser = toy_denoiser([])
    with pytest.raises(ValueError, match="uncond"):
        diffusion.classifier_free_guidance(denoiser, 2.0, uncond={"emb": jnp.zeros((B, D))})(x, t, **cond)
    with pytest.raises(ValueError, match="uncond"):
        diffusion.classifier_free_guidance(denoiser, 2.0, uncond={"emb": jnp.zeros((5, D)), "drop": True})(x, t, **cond)
    with pytest.raises(ValueError, match="uncond"):
        diffusion.classifier_free_guidance(denoiser, 2.0, uncond=[0])
