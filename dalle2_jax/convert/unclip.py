"""A diffusers UnCLIP directory (Karlo) -> this project's pipeline stages.

  stages, tokenizer = read_unclip_dir("/data/karlo-v1-alpha")     # UnCLIPPipeline.from_pretrained calls this

The directory is recognised by its model_index.json: `_class_name` UnCLIPPipeline (text to
image: prior, text_proj, decoder, super_res_first/last, three UnCLIPSchedulers, text_encoder,
tokenizer) or UnCLIPImageVariationPipeline (no prior; image_encoder and feature_extractor).
Components are listed as [library, class]; text_proj is accepted both as diffusers writes it
(["diffusers", ...], which diffusers itself cannot load back) and as Karlo ships it (["unclip",
"UnCLIPTextProjModel"]). Weights come from *.safetensors without torch, or from *.bin through
torch.load(weights_only=True) when torch is installed. The library never imports diffusers.
Tensors are read, converted and put on the device in the requested dtype one at a time
(`convert.state_dict`), so loading holds little more host memory than the converted model.

The stages: "clip" (the text encoder and, for variations, the image encoder as one CLIP
with those towers), "prior" (when present), "decoder" (UNet + text_proj), "upsampler"
(super_res_first, with super_res_last's weights as `last_step_params`, used for the last step).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle2_jax.convert import hf_clip, karlo_prior, state_dict
from dalle2_jax.models.clip import CLIP
from dalle2_jax.pipeline.stages import Stage, build_module, cast_stage
from dalle2_jax.tokenizer import Tokenizer

INDEX_FILE = "model_index.json"
PIPELINE_CLASSES = ("UnCLIPPipeline", "UnCLIPImageVariationPipeline")
# component -> the classes accepted for it (the library half of the entry is not checked: Karlo
# writes "unclip" where diffusers writes "diffusers" for text_proj).
COMPONENT_CLASSES = {
    "prior": ("PriorTransformer",),
    "text_proj": ("UnCLIPTextProjModel",),
    "decoder": ("UNet2DConditionModel",),
    "super_res_first": ("UNet2DModel",),
    "super_res_last": ("UNet2DModel",),
    "prior_scheduler": ("UnCLIPScheduler",),
    "decoder_scheduler": ("UnCLIPScheduler",),
    "super_res_scheduler": ("UnCLIPScheduler",),
    "text_encoder": ("CLIPTextModelWithProjection",),
    "image_encoder": ("CLIPVisionModelWithProjection",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "feature_extractor": ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil", "CLIPFeatureExtractor"),
}
_COMMON = ("text_encoder", "tokenizer", "text_proj", "decoder", "super_res_first", "super_res_last",
           "decoder_scheduler", "super_res_scheduler")
REQUIRED = {
    "UnCLIPPipeline": _COMMON + ("prior", "prior_scheduler"),
    "UnCLIPImageVariationPipeline": _COMMON + ("image_encoder", "feature_extractor"),
}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
TORCH_FILES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


def is_unclip_dir(path) -> bool:
    """Whether `path` is a directory with a diffusers model_index.json."""
    try:
        return (Path(path) / INDEX_FILE).is_file()
    except TypeError:
        return False


def _read_json(file: Path, what: str) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"path: no {file.name} at {file} ({what})")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"path: {file} is corrupt ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"path: {file} is corrupt (expected a JSON object)")
    return value


def read_model_index(root: Path) -> tuple[str, dict[str, str]]:
    """(pipeline class, {component: class}) from model_index.json, every entry checked."""
    file = root / INDEX_FILE
    index = _read_json(file, "a diffusers pipeline directory")
    class_name = index.get("_class_name")
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(f"path: {file} has _class_name {class_name!r}; expected one of {PIPELINE_CLASSES}")
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or entry is None or (isinstance(entry, list) and None in entry):
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise ValueError(f"path: {file}: component {name!r} is {entry!r}; expected [library, class]")
        if name not in COMPONENT_CLASSES:
            raise ValueError(f"path: {file}: unknown component {name!r} (expected some of "
                             f"{sorted(COMPONENT_CLASSES)})")
        if entry[1] not in COMPONENT_CLASSES[name]:
            raise ValueError(f"path: {file}: component {name!r} has class {entry[1]!r}; expected one of "
                             f"{COMPONENT_CLASSES[name]}")
        components[name] = entry[1]
    missing = [name for name in REQUIRED[class_name] if name not in components]
    if missing:
        raise ValueError(f"path: {file} ({class_name}) lacks the components {missing}")
    return class_name, components


def read_weights(directory: Path) -> tuple[Mapping[str, np.ndarray], str]:
    """(state dict that reads each tensor when it is looked up, the file it reads) of one component
    directory; tensors come in the file's dtype."""
    return state_dict.read_weights(directory, WEIGHT_FILES, TORCH_FILES)


def _clip_stage(root: Path, components: Mapping[str, str]) -> Stage:
    text_config = _read_json(root / "text_encoder" / "config.json", "the text encoder's config")
    towers = ("text",)
    vision_config = {"hidden_act": text_config.get("hidden_act", "quick_gelu"),
                     "layer_norm_eps": text_config.get("layer_norm_eps", 1e-5)}
    if "image_encoder" in components:
        vision_config = _read_json(root / "image_encoder" / "config.json", "the image encoder's config")
        towers = ("text", "vision")
        if vision_config.get("projection_dim", 512) != text_config.get("projection_dim", 512):
            raise ValueError(f"path: image_encoder/config.json projection_dim {vision_config.get('projection_dim')} "
                             f"differs from text_encoder/config.json's {text_config.get('projection_dim')}")
    try:
        model = hf_clip.model_from_hf_config({"projection_dim": text_config.get("projection_dim", 512),
                                              "text_config": text_config, "vision_config": vision_config})
    except ValueError as error:
        raise ValueError(f"path: {root}: {error}") from None
    model = model.clone(towers=towers, text_padding_mask=False)  # diffusers passes no attention_mask
    load_size = model.image_size
    if "feature_extractor" in components:
        processor = _read_json(root / "feature_extractor" / "preprocessor_config.json", "the feature extractor")
        model = model.clone(image_mean=tuple(processor.get("image_mean", model.image_mean)),
                            image_std=tuple(processor.get("image_std", model.image_std)))
        crop = processor.get("crop_size", model.image_size)
        crop = crop.get("height", model.image_size) if isinstance(crop, dict) else crop
        if crop != model.image_size:
            raise ValueError(f"path: feature_extractor/preprocessor_config.json crop_size {crop} differs from the "
                             f"image encoder's image_size {model.image_size}")
    state, file = read_weights(root / "text_encoder")
    if "image_encoder" in components:
        vision_state, _ = read_weights(root / "image_encoder")
        # a lazy union of both files; logit_scale (unused by inference) only where neither has one
        state = collections.ChainMap(vision_state, state, {"logit_scale": np.asarray(np.log(100.0), np.float32)})
    try:
        variables = hf_clip.convert_state_dict(model, state)
    except ValueError as error:
        raise ValueError(f"path: {file}: {error}") from None
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ("parent", "name")}
    fields["dtype"] = "float32"
    config = ml_collections.ConfigDict({"model": fields, "data": {"image_size": load_size},
                                        "embeddings": "unnormalized"})
    return Stage("clip", config, model, variables)


def _scheduler(root: Path, name: str) -> dict:
    return _read_json(root / name / "scheduler_config.json", f"the {name}'s config")


def _prior_stage(root: Path, dtype) -> Stage:
    config = karlo_prior.prior_config_from_diffusers(_read_json(root / "prior" / "config.json", "the prior's config"),
                                                     _scheduler(root, "prior_scheduler"))
    state, file = read_weights(root / "prior")
    variables = karlo_prior.convert_prior(state, config, file, dtype=dtype)
    return Stage("prior", config, build_module("prior", config), variables)


def _scheduler_options(scheduler: Mapping, file: str) -> dict:
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"path: {file} prediction_type {prediction!r} is not supported here (expected 'epsilon')")
    clip = bool(scheduler.get("clip_sample", True))
    return dict(schedule="cosine", num_timesteps=int(scheduler.get("num_train_timesteps", 1000)), sampler="ddpm",
                eta=0.0, objective="eps", clip_denoised=clip, clip_range=float(scheduler.get("clip_sample_range", 1.0)))


def empty_caption(clip: Stage, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
    """The text encoder's output on "" (the unconditional caption of diffusers' UnCLIP pipelines)."""
    tokens = tokenizer([""], allow_empty=True)
    text = clip.module.apply(clip.variables, tokens["input_ids"], tokens["attention_mask"], method=CLIP.encode_text)
    return {"text_embed": np.asarray(text.embeds[0], np.float32),
            "text_encodings": np.asarray(text.encodings[0], np.float32),
            "text_mask": np.asarray(tokens["attention_mask"][0]).astype(bool)}


def _decoder_stage(root: Path, clip: Stage, tokenizer: Tokenizer, dtype) -> Stage:
    from dalle2_jax.convert import karlo_unet

    unet_config = _read_json(root / "decoder" / "config.json", "the decoder's config")
    proj_config = _read_json(root / "text_proj" / "config.json", "text_proj's config")
    try:
        config = karlo_unet.decoder_config_from_diffusers(unet_config, proj_config,
                                                          text_len=int(clip.module.context_length))
    except ValueError as error:
        raise ValueError(f"path: decoder/config.json, text_proj/config.json: {error}") from None
    config.diffusion.update(_scheduler_options(_scheduler(root, "decoder_scheduler"),
                                               "decoder_scheduler/scheduler_config.json"))
    config.diffusion.update(sampling_steps=25, guidance_scale=8.0)
    unet_state, unet_file = read_weights(root / "decoder")
    proj_state, proj_file = read_weights(root / "text_proj")
    try:
        variables = karlo_unet.convert_decoder(unet_state, proj_state, config,
                                               empty_prompt=empty_caption(clip, tokenizer), dtype=dtype)
    except ValueError as error:
        raise ValueError(f"path: {unet_file} / {proj_file}: {error}") from None
    return Stage("decoder", config, build_module("decoder", config), variables)


def _upsampler_stage(root: Path, low_res_size: int, dtype) -> Stage:
    from dalle2_jax.convert import karlo_unet

    first_config = _read_json(root / "super_res_first" / "config.json", "super_res_first's config")
    last_config = _read_json(root / "super_res_last" / "config.json", "super_res_last's config")
    try:
        config = karlo_unet.upsampler_config_from_diffusers(first_config, low_res_size)
        last = karlo_unet.upsampler_config_from_diffusers(last_config, low_res_size,
                                                          image_size=int(config.model.image_size))
    except ValueError as error:
        raise ValueError(f"path: super_res_first/config.json, super_res_last/config.json: {error}") from None
    if last.model.to_dict() != config.model.to_dict():
        raise ValueError("path: super_res_last/config.json describes a different network from super_res_first's; "
                         "this project runs both through one upsampler module")
    config.diffusion.update(_scheduler_options(_scheduler(root, "super_res_scheduler"),
                                               "super_res_scheduler/scheduler_config.json"))
    config.diffusion.update(sampling_steps=7, guidance_scale=1.0, last_step_model=True)
    config.low_res_size = int(low_res_size)
    variables = {}
    for name, key in (("super_res_first", "params"), ("super_res_last", "last_step_params")):
        state, file = read_weights(root / name)
        try:
            variables[key] = karlo_unet.convert_upsampler(state, config, dtype=dtype)["params"]
        except ValueError as error:
            raise ValueError(f"path: {file}: {error}") from None
    return Stage("upsampler", config, build_module("upsampler", config), variables)


def read_unclip_dir(path, dtype: Any = None) -> tuple[list[Stage], Tokenizer]:
    """The stages and tokenizer of a diffusers UnCLIP directory; see the module docstring.

    dtype: the parameters' dtype (and compute dtype), e.g. "bfloat16"; None keeps float32.
    Each tensor is read, converted and put on the default device in `dtype` one at a time, so the
    host holds little more than the converted model.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"path: expected a diffusers UnCLIP directory, got {path!r}")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"path: no directory at {os.fspath(path)!r}")
    _, components = read_model_index(root)
    clip = _clip_stage(root, components)
    try:
        tokenizer = Tokenizer.from_dir(root / "tokenizer", context_length=clip.module.context_length)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"path: {error}") from None
    except Exception as error:  # the tokenizers library raises plain Exceptions on bad files
        raise ValueError(f"path: the tokenizer in {root / 'tokenizer'} is corrupt ({error})") from None
    weights_dtype = jnp.dtype(dtype if dtype is not None else "float32")
    stages = [clip]
    if "prior" in components:
        stages.append(_prior_stage(root, weights_dtype))
        state_dict.release_free_host_memory()
    stages.append(_decoder_stage(root, clip, tokenizer, weights_dtype))
    state_dict.release_free_host_memory()
    stages.append(_upsampler_stage(root, int(stages[-1].module.image_size), weights_dtype))
    if dtype is not None:
        stages = [cast_stage(stage, dtype) for stage in stages]
    state_dict.release_free_host_memory()
    return stages, tokenizer
