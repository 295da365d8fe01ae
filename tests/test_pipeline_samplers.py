"""The `sampler=` argument of every pipeline operation and the CLI flags that set it (tiny random pipeline)."""
import argparse

import numpy as np
import pytest

from dalle2_jax.pipeline_cli import sampler_option
from test_pipeline import check_images, sample_image, tiny_pipeline

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_generate_with_solvers_by_name_and_per_stage(pipe):
    fast = pipe.generate(PROMPTS, seed=0, sampler="dpm++2m")
    check_images(fast, 2)
    np.testing.assert_array_equal(fast, pipe.generate(PROMPTS, seed=0, sampler="dpm++2m"))
    every_stage = {"prior": "dpm++2m", "decoder": "dpm++2m", "upsampler": "dpm++2m"}
    np.testing.assert_array_equal(fast, pipe.generate(PROMPTS, seed=0, sampler=every_stage))
    stochastic_decoder = pipe.generate(PROMPTS, seed=0, sampler={**every_stage, "decoder": "dpm++2m-sde"})
    check_images(stochastic_decoder, 2)
    assert np.abs(fast.astype(int) - stochastic_decoder).mean() > 1.0


def test_frames_fall_back_to_ddim_for_stochastic_samplers(pipe):
    a, b = sample_image(), sample_image((40, 40, 220))
    sde = pipe.interpolate(a, b, num_frames=2, seed=0, sampler="dpm++2m-sde")
    np.testing.assert_array_equal(sde, pipe.interpolate(a, b, num_frames=2, seed=0, sampler="ddim"))


def test_inpaint_with_a_solver_keeps_the_known_pixels(pipe):
    from dalle2_jax.pipeline.inputs import square_image

    image = sample_image()
    mask = np.zeros(image.shape[:2], bool)
    mask[:, 12:] = True
    out = pipe.inpaint(image, mask, "a blue square", seed=0, num_images=2, sampler="dpm++2m")
    check_images(out, 2)
    known = square_image(image, out.shape[1])
    np.testing.assert_array_equal(out[:, :, :6], np.broadcast_to(known[:, :6], out[:, :, :6].shape))
    assert np.abs(out[:, :, 10:].astype(int) - known[None, :, 10:]).mean() > 1.0  # the masked part is redrawn


def test_upsample_alone_takes_the_sampler_by_name_and_by_stage(pipe):
    low = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)  # the decoder's 8px
    default = pipe.upsample(low, seed=0)
    check_images(default, 2)
    np.testing.assert_array_equal(default, pipe.upsample(list(low), seed=0))
    np.testing.assert_array_equal(default, pipe.upsample(low, seed=0, sampler={"upsampler": "ddim"}))
    ancestral = pipe.upsample(low, seed=0, sampler="ddpm")
    np.testing.assert_array_equal(ancestral, pipe.upsample(low, seed=0, sampler={"upsampler": "ddpm"}))
    # the sampler reached the upsampler: ancestral noise moves a random 2-step x0 upsampler by ~0.7 levels
    assert np.abs(ancestral.astype(int) - default).mean() > 0.3
    with pytest.raises(ValueError, match=r"images: expected \(8, 8, 3\) images, the decoder's resolution"):
        pipe.upsample(low[:, :4], seed=0)

@pytest.mark.parametrize("sampler,message", [
    ("dpm", "sampler: expected one of"),
    ({"decoder": "euler"}, "sampler['decoder']: expected one of"),
    ({"clip": "ddim"}, "sampler: expected stage names"),
    (3, "sampler: expected one of"),
])
def test_bad_samplers_name_the_argument(pipe, sampler, message):
    with pytest.raises(ValueError) as error:
        pipe.generate(PROMPTS, seed=0, sampler=sampler)
    assert message in str(error.value)


def test_cli_flags_make_the_sampler_argument():
    def args(**flags):
        values = dict(sampler=None, prior_sampler=None, decoder_sampler=None, upsampler_sampler=None)
        return argparse.Namespace(**{**values, **flags})

    assert sampler_option(args(), with_prior=True) is None
    assert sampler_option(args(sampler="unipc"), with_prior=True) == "unipc"
    assert sampler_option(args(sampler="unipc", decoder_sampler="ddim"), with_prior=True) == {
        "decoder": "ddim", "upsampler": "unipc", "prior": "unipc"}
    assert sampler_option(args(decoder_sampler="dpm++2m"), with_prior=False) == {"decoder": "dpm++2m"}
    from dalle2_jax.cli import build_parser

    parsed = build_parser().parse_args(["generate", "a red circle", "--model", "m", "--out", "o.png",
                                        "--sampler", "unipc", "--prior-sampler", "ddim"])
    assert sampler_option(parsed, with_prior=True) == {"decoder": "unipc", "upsampler": "unipc", "prior": "ddim"}
