"""Stage sampling (dalle2_jax.sampling) on tiny randomly initialised UNets.

Parameters are drawn on the host from the shapes `jax.eval_shape` gives (the models' own
initialisers compile one random program per shape, tens of CPU seconds here; and ADM
zero-initialises the output convolutions, so a freshly initialised UNet predicts exactly zero).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax import diffusion, sampling
from dalle2_jax.models.unet import UNet
from dalle2_jax.pipeline import random_variables

BATCH, SIZE, EMBED_DIM, TEXT_LEN, TEXT_WIDTH = 2, 8, 8, 5, 12


def random_params(unet, seed: int, *args, scale: float = 0.5, **kwargs):
    """The pipeline's host-drawn random variables (no init program to compile), at `scale`."""
    return random_variables(jax.eval_shape(unet.init, jax.random.key(0), *args, **kwargs), seed, scale)


@pytest.fixture(scope="module")
def decoder():
    unet = UNet(image_size=SIZE, channels=(8,), num_res_blocks=1, attention_resolutions=(), head_dim=8,
                num_groups=4, use_image_embed=True, num_context_tokens=2, use_text_encodings=True, context_dim=16,
                learned_variance=True)
    params = random_params(unet, 1, jnp.zeros((BATCH, SIZE, SIZE, 3)), jnp.zeros((BATCH,), jnp.int32),
                           image_embed=jnp.zeros((BATCH, EMBED_DIM)), text_mask=jnp.ones((BATCH, TEXT_LEN)),
                           text_encodings=jnp.zeros((BATCH, TEXT_LEN, TEXT_WIDTH)))
    cond = dict(image_embed=jax.random.normal(jax.random.key(2), (BATCH, EMBED_DIM)),
                text_encodings=jax.random.normal(jax.random.key(3), (BATCH, TEXT_LEN, TEXT_WIDTH)),
                text_mask=jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool))
    return unet, params, cond


@pytest.fixture(scope="module")
def upsampler():
    unet = UNet(image_size=SIZE, channels=(8,), num_res_blocks=1, attention_resolutions=(), mid_attention=False,
                num_groups=4, use_low_res=True, low_res_resize="bilinear")
    return unet, random_params(unet, 2, jnp.zeros((BATCH, SIZE, SIZE, 3)), jnp.zeros((BATCH,), jnp.int32),
                               low_res=jnp.zeros((BATCH, SIZE // 2, SIZE // 2, 3)))


@pytest.fixture(scope="module")
def cosine():
    return diffusion.make_schedule("cosine", 1000)


@pytest.fixture(scope="module")
def guided_ddpm(decoder, cosine):
    """Guided DDPM with the learned variance: one compiled program, the scale traced."""
    unet, params, cond = decoder

    def run(seed, guidance_scale):
        return sampling.decode_images(unet, params, jax.random.key(seed), **cond, schedule=cosine, steps=4,
                                      sampler="ddpm", guidance_scale=guidance_scale, image_size=SIZE)

    return run


def test_decode_is_deterministic_for_a_seed(guided_ddpm):
    first, again, other = guided_ddpm(0, 3.0), guided_ddpm(0, 3.0), guided_ddpm(1, 3.0)
    assert first.shape == (BATCH, SIZE, SIZE, 3) and first.dtype == jnp.float32
    assert float(jnp.min(first)) >= -1.0 and float(jnp.max(first)) <= 1.0
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert float(jnp.mean(jnp.abs(first - other))) > 0.1


def test_guidance_scale_one_is_the_conditional_model(decoder, cosine, guided_ddpm):
    unet, params, cond = decoder
    # An array scale runs the [cond; uncond] batch; a Python 1.0 runs the conditional model alone.
    through_guidance = guided_ddpm(0, jnp.float32(1.0))
    conditional = sampling.decode_images(unet, params, jax.random.key(0), **cond, schedule=cosine, steps=4,
                                         sampler="ddpm", guidance_scale=1.0, image_size=SIZE)
    np.testing.assert_allclose(np.asarray(through_guidance), np.asarray(conditional), atol=1e-5)
    assert float(jnp.mean(jnp.abs(guided_ddpm(0, 3.0) - conditional))) > 1e-2


def test_ddim_inversion_then_decoding_reconstructs(decoder):
    unet, params, cond = decoder
    # An untrained UNet is no denoiser: through the last steps of a cosine schedule (alpha_bar ~ 1e-9)
    # its eps errors are amplified ~1e4x, so the round trip is checked on betas that keep alpha_bar >= 0.08.
    mild = diffusion.make_schedule(np.linspace(1e-4, 5e-3, 1000))
    images = 0.8 * jnp.tanh(jax.random.normal(jax.random.key(5), (BATCH, SIZE, SIZE, 3)))
    x_T = sampling.invert_images(unet, params, images, **cond, schedule=mild, steps=50, fixed_point_iters=2)
    assert x_T.shape == images.shape

    def decode(x_T, image_embed):
        return sampling.decode_images(unet, params, None, **dict(cond, image_embed=image_embed), schedule=mild,
                                      steps=50, x_T=x_T, image_size=SIZE, clip_denoised=False)

    # Measured: 3.5e-3 max abs error (float32; 0.039 at 25 steps); with another image embedding
    # the mean error is 0.24.
    assert float(jnp.max(jnp.abs(decode(x_T, cond["image_embed"]) - images))) < 0.01
    other = jax.random.normal(jax.random.key(11), cond["image_embed"].shape)
    assert float(jnp.mean(jnp.abs(decode(x_T, other) - images))) > 0.1


def test_upsample_shapes_determinism_and_conditioning(upsampler, cosine):
    unet, params = upsampler
    low_res = jnp.tanh(jax.random.normal(jax.random.key(7), (BATCH, SIZE // 2, SIZE // 2, 3)))

    def run(low_res, seed):
        return sampling.upsample_images(unet, params, jax.random.key(seed), low_res, schedule=cosine, steps=3)

    first = run(low_res, 0)
    assert first.shape == (BATCH, SIZE, SIZE, 3)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(run(low_res, 0)))
    assert float(jnp.mean(jnp.abs(run(-low_res, 0) - first))) > 1e-2


def test_inpaint_keeps_the_known_pixels(decoder, cosine):
    unet, params, cond = decoder
    images = 0.8 * jnp.tanh(jax.random.normal(jax.random.key(8), (BATCH, SIZE, SIZE, 3)))
    mask = np.zeros((BATCH, SIZE, SIZE), bool)
    mask[:, 2:6, 1:5] = True

    def run(seed):
        return sampling.inpaint_images(unet, params, jax.random.key(seed), images, mask, **cond, schedule=cosine,
                                       steps=4, guidance_scale=2.0, jump_length=2, jump_n_sample=2)

    out = np.asarray(run(0))
    assert out.shape == images.shape
    np.testing.assert_array_equal(out[~mask], np.asarray(images)[~mask])
    assert np.mean(np.abs(out[mask] - np.asarray(images)[mask])) > 0.1
    np.testing.assert_array_equal(out, np.asarray(run(0)))


def test_bad_arguments_name_the_argument(decoder, upsampler, cosine):
    unet, params, cond = decoder
    decode = lambda **kw: sampling.decode_images(  # noqa: E731
        unet, params, jax.random.key(0), **{**cond, "schedule": cosine, "steps": 4, "image_size": SIZE, **kw})
    with pytest.raises(ValueError, match="image_embed"):
        decode(image_embed=jnp.zeros((BATCH, EMBED_DIM + 1)))
    with pytest.raises(ValueError, match="text_encodings"):
        decode(text_encodings=jnp.zeros((BATCH, TEXT_LEN, TEXT_WIDTH + 1)))
    with pytest.raises(ValueError, match="text_mask"):
        decode(text_mask=jnp.ones((BATCH, TEXT_LEN + 1)))
    with pytest.raises(ValueError, match="steps"):
        decode(steps=0)
    with pytest.raises(ValueError, match="steps"):
        decode(steps=2000)
    with pytest.raises(ValueError, match="sampler"):
        decode(sampler="euler")
    with pytest.raises(ValueError, match="x_T"):
        decode(x_T=jnp.zeros((BATCH, SIZE, SIZE, 6)))
    with pytest.raises(ValueError, match="image_size"):
        decode(image_size=(SIZE,))
    with pytest.raises(ValueError, match="mask"):
        sampling.inpaint_images(unet, params, jax.random.key(0), jnp.zeros((BATCH, SIZE, SIZE, 3)),
                                np.zeros((BATCH, SIZE, SIZE - 1), bool), **cond, schedule=cosine, steps=4)
    with pytest.raises(ValueError, match="images"):
        sampling.invert_images(unet, params, jnp.zeros((SIZE, SIZE, 3)), **cond, schedule=cosine, steps=4)
    up_unet, up_params = upsampler
    with pytest.raises(ValueError, match="low_res"):
        sampling.upsample_images(up_unet, up_params, jax.random.key(0), jnp.zeros((BATCH, 4, 4)), schedule=cosine,
                                 steps=3)
    with pytest.raises(ValueError, match="unet"):
        sampling.upsample_images(unet, params, jax.random.key(0), jnp.zeros((BATCH, 4, 4, 3)), schedule=cosine,
                                 steps=3)


def _point_mass_denoiser(sched, x_star, objective):
    """The exact denoiser of data that is always the image x_star: from x_t the noise is known."""
    def denoiser(x, t, **_):
        index = jnp.searchsorted(sched.timesteps, t)  # original timesteps -> indices of `sched`
        abar = sched.alphas_cumprod[index][:, None, None, None]
        eps = (x - jnp.sqrt(abar) * x_star) / jnp.sqrt(1.0 - abar)
        return {"eps": eps, "x0": jnp.broadcast_to(x_star, x.shape),
                "v": jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x_star}[objective]

    return denoiser


@pytest.mark.parametrize("objective", ["eps", "v", "x0"])
def test_more_sampling_steps_add_no_noise_with_an_exact_denoiser(cosine, objective):
    from dalle2_jax.data import shapes

    # A flat background and fill: any noise left by the sampler's last steps shows on the border.
    image = shapes.render_shape("red", "circle", diameter=14.0, center=(16.0, 16.0), background="light_gray",
                                image_size=32)
    x_star = jnp.asarray(image, jnp.float32)[None] / 127.5 - 1.0
    x_T = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    for steps in (8, 50):
        sched = sampling.respaced(cosine, steps)
        denoiser = _point_mass_denoiser(sched, x_star, objective)
        for name, run in (("ddim eta 0", lambda: diffusion.ddim_sample(denoiser, x_T, sched, objective=objective)),
                          ("ddim eta 1", lambda: diffusion.ddim_sample(denoiser, x_T, sched, jax.random.key(1),
                                                                       eta=1.0, objective=objective))):
            samples = np.asarray(run())
            assert np.abs(samples - np.asarray(x_star)).max() < 2e-3, (steps, name)
            as_uint8 = np.clip(np.round((samples + 1) * 127.5), 0, 255).astype(np.uint8)
            assert [shapes.border_noise(s) for s in as_uint8] == [0.0, 0.0], (steps, name)


def test_an_untrained_residual_upsampler_returns_the_resized_low_res_image(upsampler, cosine):
    # The output convolution is zero-initialised (as ADM's): the network predicts a zero residual,
    # so x0 is the resized low-res image at every step, and so is the sample, whatever the steps.
    unet, params = upsampler
    params = jax.tree_util.tree_map(lambda p: p, params)
    params["params"]["conv_out"] = jax.tree_util.tree_map(jnp.zeros_like, params["params"]["conv_out"])
    low_res = jnp.tanh(jax.random.normal(jax.random.key(7), (BATCH, SIZE // 2, SIZE // 2, 3)))
    resized = np.clip(np.asarray(jax.image.resize(low_res, (BATCH, SIZE, SIZE, 3), unet.low_res_resize)), -1, 1)
    for steps in (8, 50):
        for eta in (0.0, 1.0):
            samples = sampling.upsample_images(unet, params, jax.random.key(steps), low_res, schedule=cosine,
                                               steps=steps, eta=eta, objective="x0", residual=True)
            np.testing.assert_allclose(np.asarray(samples), resized, atol=1e-4, err_msg=f"{steps} steps, eta {eta}")
    # The plain x0 objective from the same network predicts zero instead: the residual is what adds it.
    plain = sampling.upsample_images(unet, params, jax.random.key(0), low_res, schedule=cosine, steps=8,
                                     objective="x0")
    assert float(jnp.abs(plain).max()) < 1e-2
    with pytest.raises(ValueError, match="objective"):
        sampling.upsample_images(unet, params, jax.random.key(0), low_res, schedule=cosine, steps=8,
                                 objective="v", residual=True)
