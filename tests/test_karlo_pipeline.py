"""A diffusers UnCLIP directory (tiny random Karlo, written with save_pretrained) loaded by
UnCLIPPipeline.from_pretrained: the text encoder's parity and the whole text-to-image and
image-variations pipelines against diffusers' at 3/3/3 steps, the same initial latents and the
same per-step noise replayed into diffusers' schedulers."""
import jax
import numpy as np
import pytest

import torch  # the reference; installed by the dev extra

from diffusers import UnCLIPImageVariationPipeline, UnCLIPPipeline as DiffusersUnCLIPPipeline  # noqa: E402
from diffusers.schedulers import scheduling_unclip  # noqa: E402

import karlo_fixture  # noqa: E402
from dalle2_jax import UnCLIPPipeline, diffusion  # noqa: E402
from dalle2_jax.pipeline.inputs import bucket  # noqa: E402

pytestmark = pytest.mark.parity
PROMPT = "a big red frog on a green leaf"
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def _torch_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    reference = karlo_fixture.Reference(variations=False)
    root = reference.write(tmp_path_factory.mktemp("karlo") / "karlo-tiny")
    return reference, root, UnCLIPPipeline.from_pretrained(root)


@pytest.fixture(scope="module")
def karlo_variations(tmp_path_factory):
    reference = karlo_fixture.Reference(variations=True, seed=20)
    root = reference.write(tmp_path_factory.mktemp("karlo") / "karlo-variations-tiny", text_proj_library="unclip")
    return reference, root, UnCLIPPipeline.from_pretrained(root)


def _float64_schedules(pipe):
    """diffusers' UnCLIPScheduler computes alpha_bar in float32, which loses ~1.5e-3 of 1 - alpha_bar_0
    (test_unclip_scheduler); rebuilt from the same betas in float64 it is the schedule we run."""
    for scheduler in (getattr(pipe, name, None) for name in ("prior_scheduler", "decoder_scheduler",
                                                             "super_res_scheduler")):
        if scheduler is not None:
            scheduler.betas = torch.from_numpy(diffusion.cosine_betas(1000))
            scheduler.alphas = 1.0 - scheduler.betas
            scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _our_step_noise(pipe, seed, batch):
    """The per-step noise our pipeline draws, in the order diffusers' schedulers draw theirs."""
    noises = []
    if pipe.prior is not None:  # sample_image_embeddings: the sampler key is the second half of the split
        _, key = jax.random.split(pipe._key(seed, pipe.prior))
        shape = (bucket(batch), pipe.prior.module.embed_dim)
        noises += [np.asarray(diffusion.step_noise(key, i, shape))[:batch] for i in range(STEPS - 1, 0, -1)]
    for stage in (pipe.decoder, pipe.upsamplers[0]):  # x_T given: the stage key drives the steps
        size = stage.module.image_size
        noises += [np.asarray(diffusion.step_noise(pipe._key(seed, stage), i, (batch, size, size, 3))
                              ).transpose(0, 3, 1, 2) for i in range(STEPS - 1, 0, -1)]
    return noises


def _run_replayed(call, noises):
    replay = iter(noises)
    original = scheduling_unclip.randn_tensor

    def randn_tensor(shape, **kwargs):
        noise = next(replay)
        assert tuple(noise.shape) == tuple(shape)
        return torch.from_numpy(np.ascontiguousarray(noise))

    scheduling_unclip.randn_tensor = randn_tensor
    try:
        with torch.no_grad():
            out = call()
    finally:
        scheduling_unclip.randn_tensor = original
    assert next(replay, None) is None, "diffusers drew fewer noises than our samplers"
    return out


def _latents(seed, batch, embed_dim=None):
    rng = np.random.default_rng(seed)
    out = {}
    if embed_dim is not None:
        out["prior_latents"] = rng.standard_normal((batch, embed_dim)).astype(np.float32)
    out["decoder_latents"] = rng.standard_normal(
        (batch, karlo_fixture.DECODER_SIZE, karlo_fixture.DECODER_SIZE, 3)).astype(np.float32)
    out["super_res_latents"] = rng.standard_normal(
        (batch, karlo_fixture.SUPER_RES_SIZE, karlo_fixture.SUPER_RES_SIZE, 3)).astype(np.float32)
    return out


def test_text_encoder_matches_clip_text_model_with_projection(karlo):
    reference, _, pipe = karlo
    captions = [PROMPT, "", "the blue square"]
    embeds, encodings, mask = (np.asarray(a) for a in pipe._text(captions))
    tokens = reference.tokenizer(captions, padding="max_length", max_length=karlo_fixture.CONTEXT_LEN,
                                 truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference.text_encoder(tokens.input_ids)
    np.testing.assert_array_equal(mask, tokens.attention_mask.numpy().astype(bool))
    np.testing.assert_allclose(embeds, expected.text_embeds.numpy(), atol=1e-4, rtol=0)  # unnormalised z_t
    np.testing.assert_allclose(encodings, expected.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    assert np.abs(np.linalg.norm(embeds, axis=-1) - 1.0).max() > 0.1  # really not unit-normalised
    # The public encode_text is unit-norm, as for trained pipelines.
    np.testing.assert_allclose(np.linalg.norm(pipe.encode_text([PROMPT, "a red circle"]), axis=-1), 1.0, atol=1e-5)


def test_text_to_image_matches_diffusers(karlo):
    reference, _, pipe = karlo
    latents = _latents(1, 1, karlo_fixture.EMBED)
    ours = pipe.generate([PROMPT], seed=0, prior_steps=STEPS, decoder_steps=STEPS, upsampler_steps=STEPS,
                         **latents)
    theirs = DiffusersUnCLIPPipeline(**reference.components())
    _float64_schedules(theirs)
    expected = _run_replayed(lambda: theirs(
        PROMPT, prior_num_inference_steps=STEPS, decoder_num_inference_steps=STEPS,
        super_res_num_inference_steps=STEPS, prior_latents=torch.from_numpy(latents["prior_latents"]),
        decoder_latents=_nchw(latents["decoder_latents"]), super_res_latents=_nchw(latents["super_res_latents"]),
        output_type="np").images, _our_step_noise(pipe, 0, 1))
    assert ours.shape == expected.shape == (1, karlo_fixture.SUPER_RES_SIZE, karlo_fixture.SUPER_RES_SIZE, 3)
    difference = np.abs(ours.astype(np.float64) / 255.0 - expected).max()
    assert difference <= 2 / 255, difference
    assert expected.std() > 0.05  # a real image, not a saturated one


def test_image_variations_match_diffusers(karlo_variations):
    reference, _, pipe = karlo_variations
    rng = np.random.default_rng(4)
    size = karlo_fixture.CLIP_IMAGE  # at the encoder's size: no resampling on either side
    image = (127.5 + 100 * np.sin(np.linspace(0, 6, size))[:, None, None]
             * np.cos(np.linspace(0, 4, size))[None, :, None] + rng.normal(0, 10, (size, size, 3)))
    image = np.clip(image, 0, 255).astype(np.uint8)
    latents = _latents(2, 1)
    ours = pipe.variations(image, num_images=1, seed=0, decoder_steps=STEPS, upsampler_steps=STEPS, **latents)
    theirs = UnCLIPImageVariationPipeline(**reference.components())
    _float64_schedules(theirs)
    from PIL import Image

    expected = _run_replayed(lambda: theirs(
        Image.fromarray(image), decoder_num_inference_steps=STEPS, super_res_num_inference_steps=STEPS,
        decoder_latents=_nchw(latents["decoder_latents"]), super_res_latents=_nchw(latents["super_res_latents"]),
        output_type="np").images, _our_step_noise(pipe, 0, 1))
    difference = np.abs(ours.astype(np.float64) / 255.0 - expected).max()
    assert difference <= 2 / 255, difference
    assert expected.std() > 0.05


def test_variations_model_refuses_what_needs_a_prior(karlo_variations):
    _, _, pipe = karlo_variations
    with pytest.raises(ValueError, match="generate: this pipeline has no prior"):
        pipe.generate([PROMPT])
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="text_diff: this pipeline has no prior"):
        pipe.text_diff(image, "a red circle", "a blue circle")
    with pytest.raises(ValueError, match="inpaint: this pipeline has no prior"):
        pipe.inpaint(image, np.ones((32, 32), bool), "a blue square")


@pytest.mark.heavy
def test_other_operations_run_on_the_imported_variations_model(karlo_variations):
    """encode_image (unit norm), DDIM-inverted variations (deterministic) and interpolation (its
    ends differ) run on an imported model through the same code as on trained ones."""
    _, _, pipe = karlo_variations
    rng = np.random.default_rng(5)
    a, b = (rng.integers(0, 256, (32, 32, 3)).astype(np.uint8) for _ in range(2))
    np.testing.assert_allclose(np.linalg.norm(pipe.encode_image([a, b]), axis=-1), 1.0, atol=1e-5)
    inverted = pipe.variations(a, num_images=1, seed=0, invert=True, eta=0.0, decoder_steps=4, upsampler_steps=2)
    again = pipe.variations(a, num_images=1, seed=0, invert=True, eta=0.0, decoder_steps=4, upsampler_steps=2)
    np.testing.assert_array_equal(inverted, again)
    frames = pipe.interpolate(a, b, num_frames=3, seed=0, decoder_steps=4, upsampler_steps=2)
    assert frames.shape == (3, karlo_fixture.SUPER_RES_SIZE, karlo_fixture.SUPER_RES_SIZE, 3)
    assert np.abs(frames[0].astype(int) - frames[2]).mean() > 1.0  # the ends decode different embeddings
