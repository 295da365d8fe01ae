"""Karlo's UNets in diffusers' format -> our `UNet`: the 64px decoder (UNet2DConditionModel with
its UnCLIPTextProjModel) and the 64 -> 256 super-resolution UNets (UNet2DModel; Karlo has two,
`super_res_first` for every step but the last and `super_res_last` for the last).

  config = decoder_config_from_diffusers(unet_config, text_proj_config)   # the dicts of config.json
  variables = convert_decoder(unet_state, text_proj_state, config, empty_prompt=...)   # {"params": ...}
  config = upsampler_config_from_diffusers(unet_config, low_res_size=64)
  variables = convert_upsampler(unet_state, config)

State dicts are numpy arrays keyed as diffusers' `state_dict()`. Linear weights (out, in) become
kernels (in, out), convolutions (out, in, kh, kw) become (kh, kw, in, out). A missing key, a
key the config has no place for, or a wrong shape is a ValueError naming the key.

The converted decoder, `module = dalle2_jax.pipeline.build_module("decoder", config)`, is called

  module.apply(variables, x, t, image_embed=..., text_embed=..., text_encodings=..., text_mask=...,
               drop_image=..., drop_text=...)  -> (B, 64, 64, 6): eps, then the learned-range value v

  x               (B, 64, 64, 3) float, NHWC (diffusers' latents transposed)
  t               (B,) int, the UnCLIPScheduler's timestep (0..999)
  image_embed     (B, 768) the CLIP image embedding exactly as diffusers hands it to text_proj: the
                  prior's output after clip_mean/clip_std, or CLIPVisionModelWithProjection's
                  image_embeds; not unit-normalised
  text_embed      (B, 768) CLIPTextModelWithProjection's text_embeds (the projected EOS state), not
                  unit-normalised: diffusers' prompt_embeds
  text_encodings  (B, 77, 768) the text encoder's last_hidden_state; text_mask (B, 77) the
                  tokenizer's attention mask (1/True = real token)
  drop_image      (B,) bool: True puts text_proj's learned_classifier_free_guidance_embeddings in
                  place of image_embed (in the time embedding and the 4 extra context tokens)
  drop_text       (B,) bool: True puts the empty caption's text_embeds, last_hidden_state and mask
                  in place of text_embed / text_encodings / text_mask (stored in the params at
                  conversion: `empty_prompt`); the arrays passed for that row are ignored

diffusers' unconditional half is (learned null image embedding, the empty caption ""), so its
guided batch [uncond; cond] is ours [cond; uncond] with cond = drop_image=drop_text=False and
uncond = drop_image=drop_text=True: what `dalle2_jax.sampling.decoder_conditioning` builds. Image
variations (UnCLIPImageVariationPipeline: the caption is "" in both halves) set drop_text=True in
both halves (decoder_conditioning(..., drop_text=True), or no text at all). Guidance applies to
the eps half; the variance half comes from the conditional row, as diffusers does.

The converted super-resolution UNet is called `module.apply(variables, x, t, low_res=image_64)`:
x (B, 256, 256, 3), image_64 (B, 64, 64, 3) the decoder's image clamped to [-1, 1]; the UNet
upsamples it with jax.image.resize "bicubic" (what torch's F.interpolate(mode="bicubic",
antialias=True) computes when upscaling) and concatenates [x, upsampled] as diffusers does.
A low_res already at 256px is used as it is. Output (B, 256, 256, 3): eps.
"""
from __future__ import annotations

import functools
import json
import re
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from dalle2_jax.convert.state_dict import to_device

# The public Karlo v1 alpha shapes (diffusers' scripts/convert_kakao_brain_unclip_to_diffusers.py).
KARLO_DECODER_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 64,
    "layers_per_block": 3,
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                         "SimpleCrossAttnDownBlock2D"],
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                       "ResnetUpsampleBlock2D"],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "block_out_channels": [320, 640, 960, 1280],
    "in_channels": 3,
    "out_channels": 6,
    "cross_attention_dim": 1536,
    "class_embed_type": "identity",
    "attention_head_dim": 64,
    "resnet_time_scale_shift": "scale_shift",
}
KARLO_TEXT_PROJ_CONFIG = {
    "_class_name": "UnCLIPTextProjModel",
    "clip_extra_context_tokens": 4,
    "clip_embeddings_dim": 768,
    "time_embed_dim": 1280,
    "cross_attention_dim": 1536,
}
KARLO_SUPER_RES_CONFIG = {
    "_class_name": "UNet2DModel",
    "sample_size": 256,
    "layers_per_block": 3,
    "down_block_types": ["ResnetDownsampleBlock2D"] * 4,
    "up_block_types": ["ResnetUpsampleBlock2D"] * 4,
    "block_out_channels": [320, 640, 960, 1280],
    "in_channels": 6,
    "out_channels": 3,
    "add_attention": False,
}
KARLO_TEXT_LEN = 77  # CLIP's tokenizer pads every caption to 77 tokens
KARLO_EMPTY_CAPTION_TOKENS = 2  # "" is the start and end tokens

# diffusers' defaults (0.42.1) of the options this converter reads.
_CONDITION_DEFAULTS = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280, "encoder_hid_dim": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}
_UNET2D_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "mid_block_type": "UNetMidBlock2D", "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2,
    "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None,
}
_TEXT_PROJ_DEFAULTS = {"clip_extra_context_tokens": 4, "clip_embeddings_dim": 768}
# Options that must keep the value our UNet computes (diffusers' default, or Karlo's).
_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "mid_block_scale_factor": 1, "time_embedding_type": "positional", "time_embedding_dim": None,
}
_CONDITION_FIXED = {
    **_FIXED, "only_cross_attention": False, "encoder_hid_dim": None, "dual_cross_attention": False,
    "class_embed_type": "identity", "addition_embed_type": None, "num_class_embeds": None,
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "class_embeddings_concat": False, "cross_attention_norm": None,
}
_UNET2D_FIXED = {**_FIXED, "class_embed_type": None, "num_class_embeds": None, "add_attention": False}
_TIME_SCALE_SHIFT = {"scale_shift": True, "default": False}

# Our text-conditioning params -> UnCLIPTextProjModel's modules.
_TEXT_PROJ_NAMES = {
    "image_embed_to_time": "clip_image_embeddings_project_to_time_embeddings",
    "text_embed_to_time": "embedding_proj",
    "image_embed_to_tokens": "clip_extra_context_tokens_proj",
    "text_encodings_proj": "encoder_hidden_states_proj",
    "text_encodings_norm": "text_encoder_hidden_states_norm",
}
_EMPTY_PROMPT_PARAMS = {"null_text_embed": "text_embed", "null_text_encodings": "text_encodings"}
_BLOCK = re.compile(r"(down_blocks|up_blocks|mid_block)_(?:(\d+)_)?(resnets|attentions|downsamplers|upsamplers)_(\d+)")


def _options(config: Mapping, defaults: dict, name: str) -> dict:
    if not isinstance(config, Mapping):
        raise ValueError(f"{name}: expected the dict of a diffusers config.json, got {type(config).__name__}")
    return {**defaults, **{key: value for key, value in config.items() if not key.startswith("_")}}


def _check_fixed(options: dict, fixed: dict, name: str) -> None:
    for key, want in fixed.items():
        value = options.get(key)
        if value != want and not (isinstance(want, float) and isinstance(value, (int, float)) and value == want):
            raise ValueError(f"{name}['{key}']: the UNet supports only {want!r}, got {value!r}")


def _check_class(config: Mapping, expected: str, name: str) -> None:
    found = config.get("_class_name", expected)
    if found != expected:
        raise ValueError(f"{name}['_class_name']: expected {expected!r}, got {found!r}")


def _levels(options: dict, name: str) -> tuple[tuple[int, ...], int]:
    channels = tuple(int(c) for c in options["block_out_channels"])
    layers = options["layers_per_block"]
    if not isinstance(layers, int):
        layers = tuple(int(n) for n in layers)
        if len(layers) != len(channels):
            raise ValueError(f"{name}['layers_per_block']: expected an int or one value per level, got {layers}")
    return channels, layers


def _level_attention(options: dict, name: str, down_types: dict, up_types: dict) -> tuple[bool, ...]:
    """Which levels attend, from the block types (the up blocks must mirror the down blocks)."""
    down, up = list(options["down_block_types"]), list(options["up_block_types"])
    if len(down) != len(options["block_out_channels"]) or len(up) != len(down):
        raise ValueError(f"{name}: expected one down and one up block type per block_out_channels entry, got "
                         f"{len(down)} down, {len(up)} up, {len(options['block_out_channels'])} levels")
    for key, types, allowed in (("down_block_types", down, down_types), ("up_block_types", up, up_types)):
        for block in types:
            if block not in allowed:
                raise ValueError(f"{name}['{key}']: the UNet supports {sorted(allowed)}, got {block!r}")
    attention = tuple(down_types[block] for block in down)
    if tuple(up_types[block] for block in reversed(up)) != attention:
        raise ValueError(f"{name}['up_block_types']: expected the mirror of down_block_types {down}, got {up}")
    return attention


def _image_size(options: dict, name: str, fallback: Optional[int] = None) -> int:
    size = options.get("sample_size") or fallback
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{name}['sample_size']: expected a square size, got {size}")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{name}['sample_size']: expected the image size (a positive int), got {size!r}")
    return size


def _model_common(options: dict, channels, layers, image_size: int) -> dict:
    return dict(
        image_size=image_size, channels=channels, model_channels=channels[0], channel_mult=(1,) * len(channels),
        num_res_blocks=layers, num_groups=int(options["norm_num_groups"]), norm_eps=float(options["norm_eps"]),
        resblock_updown=True, dropout=float(options["dropout"]), time_embed_dim=0, num_heads=0,
        low_res_resize="bicubic", use_noise_level=False,
        remat="none")


def _stage_config(model: dict, diffusion: dict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.compute_dtype = "float32"
    config.model = ml_collections.ConfigDict(model)
    config.model.dtype = config.get_ref("compute_dtype")
    config.image_size = config.model.get_ref("image_size")
    config.diffusion = ml_collections.ConfigDict(diffusion)
    config.diffusion.learned_variance = config.model.get_ref("learned_variance")
    return config


def decoder_config_from_diffusers(unet_config: Mapping[str, Any], text_proj_config: Mapping[str, Any], *,
                                  text_len: int = KARLO_TEXT_LEN) -> ml_collections.ConfigDict:
    """The decoder stage config (`model`, `conditioning`, `diffusion`) of a diffusers UnCLIP
    decoder: UNet2DConditionModel's and UnCLIPTextProjModel's config.json dicts. `text_len` is the
    tokenizer's padded length (77 for CLIP)."""
    _check_class(unet_config, "UNet2DConditionModel", "unet_config")
    _check_class(text_proj_config, "UnCLIPTextProjModel", "text_proj_config")
    options = _options(unet_config, _CONDITION_DEFAULTS, "unet_config")
    proj = _options(text_proj_config, _TEXT_PROJ_DEFAULTS, "text_proj_config")
    _check_fixed(options, _CONDITION_FIXED, "unet_config")
    channels, layers = _levels(options, "unet_config")
    attention = _level_attention(
        options, "unet_config", {"ResnetDownsampleBlock2D": False, "SimpleCrossAttnDownBlock2D": True},
        {"ResnetUpsampleBlock2D": False, "SimpleCrossAttnUpBlock2D": True})
    mid = options["mid_block_type"]
    if mid not in ("UNetMidBlock2DSimpleCrossAttn", None):
        raise ValueError(f"unet_config['mid_block_type']: the UNet supports 'UNetMidBlock2DSimpleCrossAttn', got {mid!r}")
    if mid is None:
        raise ValueError("unet_config['mid_block_type']: a UNet without a middle block is not supported")
    if options["mid_block_only_cross_attention"]:
        raise ValueError("unet_config['mid_block_only_cross_attention']: the UNet supports only False/None")
    if options["resnet_time_scale_shift"] not in _TIME_SCALE_SHIFT:
        raise ValueError(f"unet_config['resnet_time_scale_shift']: expected one of {sorted(_TIME_SCALE_SHIFT)}, "
                         f"got {options['resnet_time_scale_shift']!r}")
    head_dims = options["attention_head_dim"]
    head_dims = {int(head_dims)} if isinstance(head_dims, int) else {int(d) for d in head_dims}
    if len(head_dims) != 1:
        raise ValueError(f"unet_config['attention_head_dim']: expected one head width for every level, got "
                         f"{options['attention_head_dim']}")
    in_channels, out_channels = int(options["in_channels"]), int(options["out_channels"])
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"unet_config['out_channels']: expected in_channels ({in_channels}) or twice that "
                         f"(learned variance), got {out_channels}")
    time_embed_dim = 4 * channels[0]
    if int(proj["time_embed_dim"]) != time_embed_dim:
        raise ValueError(f"text_proj_config['time_embed_dim']: expected the UNet's time embedding width "
                         f"{time_embed_dim}, got {proj['time_embed_dim']}")
    if int(proj["cross_attention_dim"]) != int(options["cross_attention_dim"]):
        raise ValueError(f"text_proj_config['cross_attention_dim']: expected the UNet's cross_attention_dim "
                         f"{options['cross_attention_dim']}, got {proj['cross_attention_dim']}")
    if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < KARLO_EMPTY_CAPTION_TOKENS:
        raise ValueError(f"text_len: expected the tokenizer's padded length (>= 2), got {text_len!r}")
    image_size = _image_size(options, "unet_config")
    embed_dim = int(proj["clip_embeddings_dim"])
    model = _model_common(options, channels, layers, image_size)
    model.update(
        out_channels=in_channels, learned_variance=out_channels == 2 * in_channels,
        attention_resolutions=tuple(image_size // 2**i for i, on in enumerate(attention) if on),
        mid_attention=True, head_dim=head_dims.pop(),
        scale_shift_norm=_TIME_SCALE_SHIFT[options["resnet_time_scale_shift"]],
        use_image_embed=True, num_context_tokens=int(proj["clip_extra_context_tokens"]),
        use_text_encodings=True, use_text_embed=True, context_dim=int(options["cross_attention_dim"]),
        null_text_tokens=KARLO_EMPTY_CAPTION_TOKENS, image_embed_mean=(), image_embed_std=0.0, use_low_res=False)
    config = _stage_config(model, dict(
        schedule="cosine", num_timesteps=1000, objective="eps", vlb_weight=1e-3, snr_gamma=0.0,
        sampler="ddpm", sampling_steps=25, eta=0.0, clip_denoised=True, guidance_scale=8.0,
        drop_image_prob=0.1, drop_text_prob=0.5))
    config.conditioning = ml_collections.ConfigDict(dict(
        image_embed_dim=embed_dim, text_len=text_len, text_width=embed_dim))
    return config


def upsampler_config_from_diffusers(unet_config: Mapping[str, Any], low_res_size: int, *,
                                    image_size: Optional[int] = None) -> ml_collections.ConfigDict:
    """The upsampler stage config (`model`, `low_res_size`, `diffusion`) of a diffusers UNet2DModel
    super-resolution UNet whose input is [noisy image; upsampled low-res image]. `image_size`
    stands in for a config without sample_size (Karlo's super_res_last has none: pass
    super_res_first's)."""
    _check_class(unet_config, "UNet2DModel", "unet_config")
    options = _options(unet_config, _UNET2D_DEFAULTS, "unet_config")
    _check_fixed(options, _UNET2D_FIXED, "unet_config")
    channels, layers = _levels(options, "unet_config")
    _level_attention(options, "unet_config", {"ResnetDownsampleBlock2D": False}, {"ResnetUpsampleBlock2D": False})
    if options["mid_block_type"] != "UNetMidBlock2D":
        raise ValueError(f"unet_config['mid_block_type']: the UNet supports 'UNetMidBlock2D', "
                         f"got {options['mid_block_type']!r}")
    if options["resnet_time_scale_shift"] not in _TIME_SCALE_SHIFT:
        raise ValueError(f"unet_config['resnet_time_scale_shift']: expected one of {sorted(_TIME_SCALE_SHIFT)}, "
                         f"got {options['resnet_time_scale_shift']!r}")
    in_channels, out_channels = int(options["in_channels"]), int(options["out_channels"])
    if in_channels != 2 * out_channels:
        raise ValueError(f"unet_config['in_channels']: expected twice out_channels ({2 * out_channels}: the noisy "
                         f"image and the upsampled low-res image), got {in_channels}")
    size = _image_size(options, "unet_config", image_size)
    if isinstance(low_res_size, bool) or not isinstance(low_res_size, int) or not 0 < low_res_size < size:
        raise ValueError(f"low_res_size: expected the low-res side, a positive int below {size}, got {low_res_size!r}")
    model = _model_common(options, channels, layers, size)
    model.update(
        out_channels=out_channels, learned_variance=False, attention_resolutions=(), mid_attention=False,
        head_dim=64, scale_shift_norm=_TIME_SCALE_SHIFT[options["resnet_time_scale_shift"]],
        use_image_embed=False, num_context_tokens=0, use_text_encodings=False, use_text_embed=False,
        context_dim=0, null_text_tokens=0, use_low_res=True)
    config = _stage_config(model, dict(
        schedule="cosine", num_timesteps=1000, objective="eps", vlb_weight=1e-3, snr_gamma=0.0,
        sampler="ddpm", sampling_steps=7, eta=0.0, clip_denoised=True))
    config.low_res_size = low_res_size
    return config


# ---------------------------------------------------------------------------------------------
# Weights.

def diffusers_key(path: tuple[str, ...]) -> str:
    """Our UNet param path, e.g. ('down_blocks_1_attentions_0', 'to_out', 'kernel'), -> the
    diffusers state-dict key, e.g. 'down_blocks.1.attentions.0.to_out.0.weight'."""
    parts = []
    for name in path[:-1]:
        block = _BLOCK.fullmatch(name)
        if block:
            parts += [part for part in block.groups() if part is not None]
        elif name == "to_out":
            parts += ["to_out", "0"]
        else:
            parts.append(name)
    parts.append("bias" if path[-1] == "bias" else "weight")
    return ".".join(parts)


def _to_ours(key: str, value: np.ndarray, want: tuple[int, ...], argument: str, dtype) -> jax.Array:
    """The state dict's array in our layout and `dtype`, on the device."""
    value = np.asarray(value)
    if value.shape != _theirs(want):
        raise ValueError(f"{argument}[{key!r}]: expected shape {_theirs(want)}, got {value.shape}")
    return to_device(value, dtype, axes={4: (2, 3, 1, 0), 2: (1, 0)}.get(value.ndim))


def _theirs(shape: tuple[int, ...]) -> tuple[int, ...]:
    """diffusers' layout of a shape in ours (for error messages)."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


@functools.lru_cache(maxsize=8)
def _abstract_params_of(stage: str, config_json: str) -> dict:
    from dalle2_jax.pipeline.stages import abstract_variables, build_module  # the pipeline imports convert

    config = ml_collections.ConfigDict(json.loads(config_json))
    return abstract_variables(stage, build_module(stage, config), config)["params"]


def _abstract_params(config) -> dict:
    """The param shapes of the stage's UNet (jax.eval_shape; cached per config)."""
    stage = "decoder" if config.model.get("use_image_embed") else "upsampler"
    return _abstract_params_of(stage, config.to_json())


def _model_option(config, name: str):
    model = config.get("model") if hasattr(config, "get") else None
    if model is None:
        raise ValueError("config: expected a stage config with a 'model' section")
    return model.get(name)


def _check_state(state: Mapping, argument: str) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"{argument}: expected a mapping of state-dict keys to arrays, got {type(state).__name__}")


def _fill(state: Mapping, flat_abstract: dict, argument: str, used: set, dtype) -> dict:
    out = {}
    for path, leaf in flat_abstract.items():
        key = diffusers_key(path)
        if key not in state:
            raise ValueError(f"{argument}: missing key {key!r} (expected shape {_theirs(leaf.shape)})")
        out[path] = _to_ours(key, state[key], tuple(leaf.shape), argument, dtype)
        used.add(key)
    return out


def _check_all_used(state: Mapping, used: set, argument: str) -> None:
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"{argument}: unexpected keys {unused[:5]}{' ...' if len(unused) > 5 else ''} "
                         "(the config has no place for them; a different model?)")


def convert_upsampler(unet_state: Mapping[str, np.ndarray], config, *, dtype=np.float32) -> dict:
    """{"params": ...} of our UNet for `config` (`upsampler_config_from_diffusers`) from a
    UNet2DModel state dict, as jax arrays in `dtype`, each placed on the device as it is converted."""
    _check_state(unet_state, "unet_state")
    if not _model_option(config, "use_low_res"):
        raise ValueError("config: expected an upsampler config (upsampler_config_from_diffusers), got one without "
                         "model.use_low_res")
    flat = traverse_util.flatten_dict(_abstract_params(config))
    used: set = set()
    params = _fill(unet_state, flat, "unet_state", used, dtype)
    _check_all_used(unet_state, used, "unet_state")
    return {"params": traverse_util.unflatten_dict(params)}


def convert_decoder(unet_state: Mapping[str, np.ndarray], text_proj_state: Mapping[str, np.ndarray], config, *,
                    empty_prompt: Optional[Mapping[str, np.ndarray]] = None, dtype=np.float32) -> dict:
    """{"params": ...} of our decoder UNet for `config` (`decoder_config_from_diffusers`) from the
    UNet2DConditionModel and UnCLIPTextProjModel state dicts, as jax arrays in `dtype`, each placed
    on the device as it is converted.

    empty_prompt: the text encoder's output on the empty caption "" (diffusers' unconditional
    prompt): {"text_embed": (D,) text_embeds, "text_encodings": (text_len, W) last_hidden_state},
    optionally "text_mask" (text_len,) (checked to be its 2 real tokens). Stored as the null
    caption that `drop_text` selects; required (without it the unconditional half could not be
    diffusers').
    """
    _check_state(unet_state, "unet_state")
    _check_state(text_proj_state, "text_proj_state")
    if not all(_model_option(config, name) for name in ("use_image_embed", "use_text_embed", "null_text_tokens")):
        raise ValueError("config: expected a Karlo decoder config (decoder_config_from_diffusers: use_image_embed, "
                         "use_text_embed, null_text_tokens > 0)")
    flat = traverse_util.flatten_dict(_abstract_params(config))
    unet_paths = {p: leaf for p, leaf in flat.items() if p[0] not in _TEXT_PROJ_NAMES and len(p) > 1}
    used: set = set()
    params = _fill(unet_state, unet_paths, "unet_state", used, dtype)
    _check_all_used(unet_state, used, "unet_state")

    used = set()
    context_dim = int(config.model.context_dim)
    for path, leaf in flat.items():
        if path[0] in _TEXT_PROJ_NAMES:
            key = f"{_TEXT_PROJ_NAMES[path[0]]}.{'bias' if path[-1] == 'bias' else 'weight'}"
            if key not in text_proj_state:
                raise ValueError(f"text_proj_state: missing key {key!r} (expected shape {_theirs(leaf.shape)})")
            value = np.asarray(text_proj_state[key])
            if path[0] == "image_embed_to_tokens":
                value = _token_major(value, context_dim, key)
            params[path] = _to_ours(key, value, tuple(leaf.shape), "text_proj_state", dtype)
            used.add(key)
    key = "learned_classifier_free_guidance_embeddings"
    if key not in text_proj_state:
        raise ValueError(f"text_proj_state: missing key {key!r}")
    params[("null_image_embed",)] = _to_ours(key, text_proj_state[key], tuple(flat[("null_image_embed",)].shape),
                                             "text_proj_state", dtype)
    used.add(key)
    _check_all_used(text_proj_state, used, "text_proj_state")

    if empty_prompt is None or not isinstance(empty_prompt, Mapping):
        raise ValueError("empty_prompt: required, the text encoder's output on the empty caption \"\" "
                         "({'text_embed': (D,), 'text_encodings': (text_len, W)}): diffusers' unconditional "
                         "prompt, which drop_text selects")
    for ours, name in _EMPTY_PROMPT_PARAMS.items():
        if name not in empty_prompt:
            raise ValueError(f"empty_prompt: missing {name!r}")
        value = np.asarray(empty_prompt[name], np.float32)
        if value.ndim == len(flat[(ours,)].shape) + 1 and value.shape[0] == 1:
            value = value[0]
        if value.shape != tuple(flat[(ours,)].shape):
            raise ValueError(f"empty_prompt[{name!r}]: expected shape {tuple(flat[(ours,)].shape)}, got {value.shape}")
        params[(ours,)] = to_device(value, dtype)
    if "text_mask" in empty_prompt:
        mask = np.asarray(empty_prompt["text_mask"]).reshape(-1).astype(bool)
        want = np.arange(mask.size) < int(config.model.null_text_tokens)
        if mask.shape != want.shape or not np.array_equal(mask, want):
            raise ValueError(f"empty_prompt['text_mask']: expected the first {int(config.model.null_text_tokens)} "
                             f"of {want.size} tokens real (the empty caption's start and end), got {mask.astype(int)}")
    missing = sorted("/".join(path) for path in set(flat) - set(params))
    if missing:
        raise ValueError(f"config: the model has parameters no state dict fills: {missing[:5]}")
    return {"params": traverse_util.unflatten_dict(params)}


def _token_major(weight_or_bias: np.ndarray, context_dim: int, key: str) -> np.ndarray:
    """clip_extra_context_tokens_proj's outputs are channel-major (token j = out[..., j::n]);
    our image_embed_to_tokens' are token-major (token j = out[..., j*C:(j+1)*C])."""
    value = np.asarray(weight_or_bias)
    rows = value.shape[0]
    if rows % context_dim:
        raise ValueError(f"text_proj_state[{key!r}]: expected a multiple of cross_attention_dim {context_dim} "
                         f"outputs, got shape {value.shape}")
    tokens = rows // context_dim
    return value.reshape(context_dim, tokens, *value.shape[1:]).swapaxes(0, 1).reshape(value.shape)


def parameter_count(config) -> int:
    """Parameters of the stage's UNet for `config`, from `jax.eval_shape` (nothing allocated)."""
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(_abstract_params(config))))
