"""Karlo's UNets (diffusers UnCLIP format) converted into our UNet: parity with diffusers on tiny
random models, the full-size shapes' parameter counts, and the converter's errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # the reference; installed by the dev extra

from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel  # noqa: E402

from dalle2_jax import sampling  # noqa: E402
from dalle2_jax.convert import karlo_unet  # noqa: E402
from dalle2_jax.pipeline import abstract_variables, build_module  # noqa: E402

B, SIZE, EMBED, TEXT_LEN, CONTEXT = 3, 16, 12, 8, 24
TINY_DECODER = dict(
    sample_size=SIZE, layers_per_block=1, block_out_channels=[32, 64], in_channels=3, out_channels=6,
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=CONTEXT, class_embed_type="identity",
    attention_head_dim=16, resnet_time_scale_shift="scale_shift", norm_num_groups=8)
TINY_TEXT_PROJ = dict(clip_extra_context_tokens=4, clip_embeddings_dim=EMBED, time_embed_dim=128,
                      cross_attention_dim=CONTEXT)
TINY_SUPER_RES = dict(sample_size=32, layers_per_block=1, block_out_channels=[32, 64], in_channels=6, out_channels=3,
                      down_block_types=["ResnetDownsampleBlock2D"] * 2, up_block_types=["ResnetUpsampleBlock2D"] * 2,
                      add_attention=False, norm_num_groups=8)
TOLERANCE = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _torch_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def _randomize(module, seed):
    """Every parameter random (zero-initialised ones, e.g. the null image embedding, would hide a
    wrong mapping): weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:]) if p.ndim > 1 else 1.0))
    return module.eval()


def _state(module):
    return {key: value.detach().numpy() for key, value in module.state_dict().items()}


def _config(module):
    return {key: value for key, value in dict(module.config).items()}


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(x):
    return x.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny_decoder():
    unet = _randomize(UNet2DConditionModel(**TINY_DECODER), 0)
    text_proj = _randomize(UnCLIPTextProjModel(**TINY_TEXT_PROJ), 1)
    rng = np.random.default_rng(2)
    empty = {"text_embed": rng.standard_normal(EMBED).astype(np.float32),
             "text_encodings": rng.standard_normal((TEXT_LEN, EMBED)).astype(np.float32),
             "text_mask": np.arange(TEXT_LEN) < 2}
    config = karlo_unet.decoder_config_from_diffusers(_config(unet), _config(text_proj), text_len=TEXT_LEN)
    variables = karlo_unet.convert_decoder(_state(unet), _state(text_proj), config, empty_prompt=empty)
    return unet, text_proj, empty, config, variables, jax.jit(build_module("decoder", config).apply)


def _decoder_inputs(seed=3):
    rng = np.random.default_rng(seed)
    lengths = np.array([TEXT_LEN, 3, 5])
    return dict(x=rng.standard_normal((B, SIZE, SIZE, 3)).astype(np.float32),
                t=np.array([999, 500, 17]),
                image_embed=rng.standard_normal((B, EMBED)).astype(np.float32),
                text_embed=rng.standard_normal((B, EMBED)).astype(np.float32),
                text_encodings=rng.standard_normal((B, TEXT_LEN, EMBED)).astype(np.float32),
                text_mask=np.arange(TEXT_LEN)[None] < lengths[:, None])


def _diffusers_guided_batch(unet, text_proj, empty, inputs):
    """diffusers' UnCLIPPipeline decoder call: [uncond; cond], uncond = (learned null image
    embedding, the empty caption)."""
    repeat = lambda a: np.repeat(np.asarray(a)[None], B, axis=0)  # noqa: E731
    prompt_embeds = torch.from_numpy(np.concatenate([repeat(empty["text_embed"]), inputs["text_embed"]]))
    hidden = torch.from_numpy(np.concatenate([repeat(empty["text_encodings"]), inputs["text_encodings"]]))
    mask = torch.from_numpy(np.concatenate([repeat(empty["text_mask"]), inputs["text_mask"]]))
    with torch.no_grad():
        context, time_embeds = text_proj(image_embeddings=torch.from_numpy(inputs["image_embed"]),
                                         prompt_embeds=prompt_embeds, text_encoder_hidden_states=hidden,
                                         do_classifier_free_guidance=True)
        mask = torch.nn.functional.pad(mask, (text_proj.clip_extra_context_tokens, 0), value=True)
        x = _nchw(np.concatenate([inputs["x"], inputs["x"]]))
        t = torch.from_numpy(np.concatenate([inputs["t"], inputs["t"]]))
        out = unet(x, t, encoder_hidden_states=context, class_labels=time_embeds, attention_mask=mask).sample
    return _nhwc(out)


def test_decoder_matches_diffusers_conditional_and_unconditional(tiny_decoder):
    unet, text_proj, empty, config, variables, apply = tiny_decoder
    inputs = _decoder_inputs()
    expected = _diffusers_guided_batch(unet, text_proj, empty, inputs)
    uncond_expected, cond_expected = expected[:B], expected[B:]

    both = lambda a: np.concatenate([a, a])  # noqa: E731
    # Our guided batch is [cond; uncond]; the unconditional rows get the caption's arrays, which
    # drop_text must replace by the stored empty caption.
    ours = np.asarray(apply(
        variables, both(inputs["x"]), both(inputs["t"]), image_embed=both(inputs["image_embed"]),
        text_embed=both(inputs["text_embed"]), text_encodings=both(inputs["text_encodings"]),
        text_mask=both(inputs["text_mask"]), drop_image=np.repeat([False, True], B),
        drop_text=np.repeat([False, True], B)))
    assert ours.shape == (2 * B, SIZE, SIZE, 6)
    assert np.abs(cond_expected - uncond_expected).max() > 0.1  # the halves differ: the test can fail
    np.testing.assert_allclose(ours[:B], cond_expected, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(ours[B:], uncond_expected, rtol=0, atol=TOLERANCE)


def test_decoder_image_variations_halves_match_diffusers(tiny_decoder):
    """UnCLIPImageVariationPipeline: the caption is "" in both halves = drop_text in both."""
    unet, text_proj, empty, config, variables, apply = tiny_decoder
    inputs = _decoder_inputs(seed=4)
    repeat = lambda a: np.repeat(np.asarray(a)[None], B, axis=0)  # noqa: E731
    inputs_empty = dict(inputs, text_embed=repeat(empty["text_embed"]),
                        text_encodings=repeat(empty["text_encodings"]), text_mask=repeat(empty["text_mask"]))
    expected = _diffusers_guided_batch(unet, text_proj, empty, inputs_empty)
    both = lambda a: np.concatenate([a, a])  # noqa: E731
    ours = np.asarray(apply(
        variables, both(inputs["x"]), both(inputs["t"]), image_embed=both(inputs["image_embed"]),
        text_embed=both(inputs["text_embed"]), text_encodings=both(inputs["text_encodings"]),
        text_mask=both(inputs["text_mask"]), drop_image=np.repeat([False, True], B),
        drop_text=np.ones((2 * B,), bool)))
    np.testing.assert_allclose(ours[:B], expected[B:], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(ours[B:], expected[:B], rtol=0, atol=TOLERANCE)
    # sampling.decoder_conditioning without any text (what the pipeline's variations pass): the
    # stand-in text has the stored empty caption's length and is dropped
    cond, uncond = sampling.decoder_conditioning(build_module("decoder", config), variables, 2 * B,
                                                 image_embed=both(inputs["image_embed"]))
    assert cond["text_encodings"].shape == (2 * B, TEXT_LEN, EMBED) and bool(cond["drop_text"].all())
    cond["drop_image"] = uncond["drop_image"].at[:B].set(False)
    standin = np.asarray(apply(variables, both(inputs["x"]), both(inputs["t"]), **cond))
    np.testing.assert_allclose(standin, ours, rtol=0, atol=1e-6)


def test_torch_antialiased_bicubic_upscaling_is_jax_bicubic():
    low = np.random.default_rng(5).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    theirs = _nhwc(torch.nn.functional.interpolate(_nchw(low), size=[32, 32], mode="bicubic", align_corners=False,
                                                   antialias=True))
    ours = np.asarray(jax.image.resize(jnp.asarray(low), (2, 32, 32, 3), "bicubic"))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=5e-7)
    plain = _nhwc(torch.nn.functional.interpolate(_nchw(low), size=[32, 32], mode="bicubic", align_corners=False))
    assert np.abs(plain - theirs).max() > 1e-2  # antialias=True is a different kernel when upscaling too


_APPLY = {}


def _jitted_apply(stage, config):
    """One compiled program per stage config (super_res_first and _last share theirs)."""
    key = (stage, config.to_json())
    if key not in _APPLY:
        _APPLY[key] = jax.jit(build_module(stage, config).apply)
    return _APPLY[key]


@pytest.mark.parametrize("name, seed, options", [
    ("super_res_first", 10, {}),
    ("super_res_last", 11, {"sample_size": None}),  # Karlo's super_res_last config has no sample_size
])
def test_super_res_unets_match_diffusers(name, seed, options):
    reference = _randomize(UNet2DModel(**{**TINY_SUPER_RES, **options}), seed)
    config = karlo_unet.upsampler_config_from_diffusers(_config(reference), 8, image_size=32)
    variables = karlo_unet.convert_upsampler(_state(reference), config)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, 32, 32, 3)).astype(np.float32)
    low = rng.uniform(-1, 1, (B, 8, 8, 3)).astype(np.float32)
    t = np.array([999, 427, 0])
    with torch.no_grad():  # UnCLIPPipeline's super-resolution step
        upscaled = torch.nn.functional.interpolate(_nchw(low), size=[32, 32], mode="bicubic", align_corners=False,
                                                   antialias=True)
        expected = _nhwc(reference(torch.cat([_nchw(x), upscaled], dim=1), torch.from_numpy(t)).sample)
    ours = np.asarray(_jitted_apply("upsampler", config)(variables, x, t, low_res=low))
    assert config.model.scale_shift_norm is False and config.low_res_size == 8
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCE)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _public(config):
    return {key: value for key, value in config.items() if not key.startswith("_")}


@pytest.mark.parametrize("config_name, stage", [("configs/decoder.py:karlo", "decoder"),
                                                ("configs/upsampler.py:karlo_256", "upsampler")])
def test_karlo_config_shapes_and_parameter_counts_equal_diffusers(config_name, stage):
    """configs/*:karlo = the converter's config of Karlo's public config.json, and its
    `jax.eval_shape` parameter count = diffusers' models built on the meta device (the decoder's
    plus the stored empty caption that drop_text selects: 77 x 768 + 768)."""
    from dalle2_jax import config_util

    config = config_util.load_config(config_name)
    if stage == "decoder":
        converted = karlo_unet.decoder_config_from_diffusers(karlo_unet.KARLO_DECODER_UNET_CONFIG,
                                                             karlo_unet.KARLO_TEXT_PROJ_CONFIG)
        with torch.device("meta"):
            expected = (_count(UNet2DConditionModel(**_public(karlo_unet.KARLO_DECODER_UNET_CONFIG)))
                        + _count(UnCLIPTextProjModel(**_public(karlo_unet.KARLO_TEXT_PROJ_CONFIG))))
        expected += 77 * 768 + 768
        assert config.conditioning.to_dict() == converted.conditioning.to_dict()
    else:
        converted = karlo_unet.upsampler_config_from_diffusers(karlo_unet.KARLO_SUPER_RES_CONFIG, 64)
        with torch.device("meta"):
            expected = _count(UNet2DModel(**_public(karlo_unet.KARLO_SUPER_RES_CONFIG)))
        assert config.low_res_size == 64
    model = {key: value for key, value in config.model.to_dict().items() if key != "dtype"}
    want = {key: value for key, value in converted.model.to_dict().items() if key != "dtype"}
    differing = {key: (model.get(key), want.get(key)) for key in set(model) | set(want)
                 if key not in ("remat", "model_channels", "channel_mult") and model.get(key) != want.get(key)}
    assert not differing
    abstract = abstract_variables(stage, build_module(stage, config), config)
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))
    assert count == expected, f"{config_name}: {count:,} parameters, diffusers {expected:,}"


# -- errors ---------------------------------------------------------------------------------

def test_missing_and_misshapen_keys_are_named(tiny_decoder):
    unet, text_proj, empty, config, _, _ = tiny_decoder
    unet_state, proj_state = _state(unet), _state(text_proj)
    key = "down_blocks.1.attentions.0.add_k_proj.weight"
    with pytest.raises(ValueError, match=rf"unet_state: missing key '{key}'"):
        karlo_unet.convert_decoder({k: v for k, v in unet_state.items() if k != key}, proj_state, config,
                                   empty_prompt=empty)
    wrong = dict(unet_state, **{"mid_block.resnets.1.conv1.weight": np.zeros((64, 64, 3, 1), np.float32)})
    with pytest.raises(ValueError, match=r"unet_state\['mid_block.resnets.1.conv1.weight'\]: expected shape "
                                         r"\(64, 64, 3, 3\), got \(64, 64, 3, 1\)"):
        karlo_unet.convert_decoder(wrong, proj_state, config, empty_prompt=empty)
    with pytest.raises(ValueError, match=r"unet_state: unexpected keys \['extra.weight'\]"):
        karlo_unet.convert_decoder(dict(unet_state, **{"extra.weight": np.zeros(3)}), proj_state, config,
                                   empty_prompt=empty)
    key = "learned_classifier_free_guidance_embeddings"
    with pytest.raises(ValueError, match=rf"text_proj_state: missing key '{key}'"):
        karlo_unet.convert_decoder(unet_state, {k: v for k, v in proj_state.items() if k != key}, config,
                                   empty_prompt=empty)
    wrong = dict(proj_state, **{"clip_extra_context_tokens_proj.bias": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match=r"clip_extra_context_tokens_proj.bias'\]: expected a multiple"):
        karlo_unet.convert_decoder(unet_state, wrong, config, empty_prompt=empty)
    with pytest.raises(ValueError, match=r"empty_prompt: required"):
        karlo_unet.convert_decoder(unet_state, proj_state, config)
    with pytest.raises(ValueError, match=r"empty_prompt\['text_encodings'\]: expected shape \(8, 12\)"):
        karlo_unet.convert_decoder(unet_state, proj_state, config,
                                   empty_prompt=dict(empty, text_encodings=np.zeros((77, 12))))
    with pytest.raises(ValueError, match=r"empty_prompt\['text_mask'\]: expected the first 2"):
        karlo_unet.convert_decoder(unet_state, proj_state, config,
                                   empty_prompt=dict(empty, text_mask=np.arange(TEXT_LEN) < 3))
    reference = _randomize(UNet2DModel(**TINY_SUPER_RES), 0)
    up_config = karlo_unet.upsampler_config_from_diffusers(_config(reference), 8)
    with pytest.raises(ValueError, match=r"config: expected a Karlo decoder config"):
        karlo_unet.convert_decoder(unet_state, proj_state, up_config, empty_prompt=empty)
    with pytest.raises(ValueError, match=r"config: expected an upsampler config"):
        karlo_unet.convert_upsampler(unet_state, config)
    state = _state(reference)
    del state["conv_in.bias"]
    with pytest.raises(ValueError, match=r"unet_state: missing key 'conv_in.bias'"):
        karlo_unet.convert_upsampler(state, up_config)


@pytest.mark.parametrize("change, message", [
    ({"only_cross_attention": True}, r"unet_config\['only_cross_attention'\]: the UNet supports only False"),
    ({"class_embed_type": None}, r"unet_config\['class_embed_type'\]: the UNet supports only 'identity'"),
    ({"down_block_types": ["DownBlock2D", "SimpleCrossAttnDownBlock2D"]}, r"unet_config\['down_block_types'\]"),
    ({"up_block_types": ["ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"]},
     r"unet_config\['up_block_types'\]: expected the mirror"),
    ({"attention_head_dim": [16, 32]}, r"unet_config\['attention_head_dim'\]: expected one head width"),
    ({"out_channels": 5}, r"unet_config\['out_channels'\]"),
    ({"_class_name": "UNet2DModel"}, r"unet_config\['_class_name'\]: expected 'UNet2DConditionModel'"),
])
def test_unsupported_decoder_configs_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        karlo_unet.decoder_config_from_diffusers({**TINY_DECODER, **change}, TINY_TEXT_PROJ, text_len=TEXT_LEN)


def test_bad_upsampler_and_text_proj_configs_are_named():
    with pytest.raises(ValueError, match=r"text_proj_config\['time_embed_dim'\]: expected the UNet's time "
                                         r"embedding width 128"):
        karlo_unet.decoder_config_from_diffusers(TINY_DECODER, dict(TINY_TEXT_PROJ, time_embed_dim=64))
    with pytest.raises(ValueError, match=r"unet_config\['sample_size'\]: expected the image size"):
        karlo_unet.upsampler_config_from_diffusers(dict(TINY_SUPER_RES, sample_size=None), 8)
    with pytest.raises(ValueError, match=r"unet_config\['add_attention'\]: the UNet supports only False"):
        karlo_unet.upsampler_config_from_diffusers(dict(TINY_SUPER_RES, add_attention=True), 8)
    with pytest.raises(ValueError, match=r"unet_config\['in_channels'\]: expected twice out_channels"):
        karlo_unet.upsampler_config_from_diffusers(dict(TINY_SUPER_RES, in_channels=3), 8)
    with pytest.raises(ValueError, match=r"low_res_size: expected the low-res side"):
        karlo_unet.upsampler_config_from_diffusers(TINY_SUPER_RES, 32)


def test_wrong_text_length_for_the_stored_empty_caption_is_named(tiny_decoder):
    _, _, _, config, variables, _ = tiny_decoder
    inputs = _decoder_inputs()
    with pytest.raises(ValueError, match=r"text_encodings: expected \(batch, 8, 12\)"):
        build_module("decoder", config).apply(
            variables, inputs["x"], inputs["t"], image_embed=inputs["image_embed"], text_embed=inputs["text_embed"],
            text_encodings=np.zeros((B, 5, EMBED), np.float32), text_mask=np.ones((B, 5), bool))
