"""Classifier-free guidance as each stage wires it: one sampling step at scale s is u + s (c - u).

u and c come from two unguided calls of the stage's own network, u with ALL conditioning dropped
the way the stage's training drops it (decoder: image embedding and caption, tasks/decoder.py;
prior: the text, models/prior.py::prior_loss), so a guided loop that builds its unconditional half
wrong (a caption kept, halves swapped) fails here. A one-step schedule makes the sample an affine
function of the model output, so the mix carries over to the samples exactly. The upsamplers are
not guided (`sampling.upsample_images` takes no guidance scale): nothing to check there.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax import diffusion, sampling
from dalle2_jax.models import prior as prior_lib
from dalle2_jax.models.prior import DiffusionPrior
from test_prior import TINY as TINY_PRIOR, numpy_params, text_inputs
from test_sampling import BATCH, SIZE, decoder  # noqa: F401  (module fixture: tiny learned-variance decoder)

ONE_STEP = diffusion.make_schedule(np.array([0.05]))  # alpha_bar 0.95: x_0 = (x - sqrt(0.05) eps) / sqrt(0.95)
SCALES = (0.0, 3.0)


@functools.partial(jax.jit, static_argnames="unet")
def one_step_unguided(unet, params, x_T, cond):
    """The stage's sampler step (DDIM eta 0, no clipping) with the bare network: no guidance."""
    return diffusion.ddim_sample(functools.partial(unet.apply, params), x_T, ONE_STEP, cond=cond,
                                 learned_variance=unet.learned_variance, clip_denoised=False)


@pytest.mark.parametrize("caption", [True, False], ids=["captioned", "variations"])
def test_decoder_guidance_mixes_the_fully_unconditional_sample(decoder, caption):  # noqa: F811
    unet, params, cond = decoder
    x_T = 0.2 * jax.random.normal(jax.random.key(21), (BATCH, SIZE, SIZE, 3))
    flags = lambda drop_image, drop_text: dict(  # noqa: E731
        cond, drop_image=jnp.full((BATCH,), drop_image), drop_text=jnp.full((BATCH,), drop_text))
    # Without a caption (image variations) the caption is dropped in both halves.
    conditional = one_step_unguided(unet, params, x_T, flags(False, not caption))
    unconditional = one_step_unguided(unet, params, x_T, flags(True, True))
    # An unconditional half that kept the caption would be off by |1 - s| (caption_only - unconditional):
    # measured 1.2e-3 max (a random UNet hardly reads its text), against float32 errors of 3e-7.
    caption_only = one_step_unguided(unet, params, x_T, flags(True, False))
    assert float(jnp.max(jnp.abs(caption_only - unconditional))) > 5e-4
    assert float(jnp.mean(jnp.abs(conditional - unconditional))) > 1e-2
    for scale in SCALES:
        guided = sampling.decode_images(unet, params, None, **cond, drop_text=not caption, schedule=ONE_STEP,
                                        steps=1, guidance_scale=scale, x_T=x_T, image_size=SIZE,
                                        clip_denoised=False)
        expected = unconditional + scale * (conditional - unconditional)
        assert float(jnp.max(jnp.abs(expected))) < 1.0  # decode_images clips to [-1, 1]: keep the mix linear
        np.testing.assert_allclose(np.asarray(guided), np.asarray(expected), atol=1e-5)


@pytest.fixture(scope="module")
def prior():
    model = DiffusionPrior(**TINY_PRIOR)
    return model, numpy_params(model, seed=3)


def test_prior_guidance_mixes_the_text_dropped_sample(prior):
    model, params = prior
    batch, rng = 3, jax.random.key(5)
    text = text_inputs(22, batch)
    # The x_T sample_image_embeddings draws: normal(split(rng)[0], (B * k, D)).
    x_T = jax.random.normal(jax.random.split(rng)[0], (batch, model.embed_dim))

    @jax.jit
    def raw(drop_text):  # one unguided step of the full forward (not the text cache the sampler uses)
        return diffusion.ddim_sample(functools.partial(model.apply, params), x_T, ONE_STEP,
                                     cond=dict(text, drop_text=drop_text), objective=model.objective,
                                     clip_denoised=False)

    conditional, unconditional = (np.asarray(raw(jnp.full((batch,), drop)), np.float64) for drop in (False, True))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731  (samples are unit CLIP embeddings)
    assert np.min(np.linalg.norm(unit(conditional) - unit(unconditional), axis=-1)) > 0.1
    for scale in SCALES:
        sampled = prior_lib.sample_image_embeddings_jit(model, params, rng, **text, schedule=ONE_STEP, steps=1,
                                                        guidance_scale=scale, num_candidates=1)
        expected = unit(unconditional + scale * (conditional - unconditional))
        np.testing.assert_allclose(np.asarray(sampled), expected, atol=1e-5)  # measured: 3e-7
