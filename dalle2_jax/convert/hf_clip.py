"""transformers-format CLIP directory -> our `CLIP` module and params.

Reads config.json and model.safetensors (sharded or not; no torch needed) or,
when torch is installed, pytorch_model.bin, one tensor at a time
(`convert.state_dict`). Linear weights are transposed (out, in) -> (in, out), the
patch conv (out, in, kh, kw) -> (kh, kw, in, out).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dalle2_jax.convert import state_dict
from dalle2_jax.models.clip import ACTIVATIONS, CLIP, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from dalle2_jax.tokenizer import Tokenizer

# Our module names that differ from transformers' (after the path is joined with dots).
_RENAMES = {
    "vision_model.ln_pre": "vision_model.pre_layrnorm",
    "vision_model.ln_post": "vision_model.post_layernorm",
}
_EMBEDDINGS = ("token_embedding", "position_embedding", "class_embedding", "patch_embedding")


def hf_key(path: tuple[str, ...]) -> str:
    """Our param path, e.g. ('text_model', 'encoder', 'layers_0', 'mlp', 'fc1', 'kernel'),
    -> the transformers state-dict key, e.g. 'text_model.encoder.layers.0.mlp.fc1.weight'."""
    parts = []
    for i, name in enumerate(path):
        if name.startswith("layers_"):
            parts += ["layers", name.removeprefix("layers_")]
        elif name in ("kernel", "scale", "embedding"):
            parts.append("weight")
        elif name in _EMBEDDINGS and i == 1:
            parts += ["embeddings", name]
        else:
            parts.append(name)
    key = ".".join(parts)
    for ours, theirs in _RENAMES.items():
        if key.startswith(ours + "."):
            key = theirs + key[len(ours) :]
    if path[-1] == "position_embedding":  # a bare param here, an nn.Embedding there
        key += ".weight"
    return key


def _to_ours(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if path[-1] == "kernel":
        return value.T
    return value


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_dir(path) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: expected a transformers CLIP directory, {path!r} is not a directory")
    return path


def model_from_hf_config(config: dict, dtype: Any = jnp.float32) -> CLIP:
    """Our `CLIP` with the shapes of a transformers CLIPConfig (the dict of config.json)."""
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    text_get = lambda key, default: text.get(key, default)  # noqa: E731  (CLIPTextConfig defaults)
    vision_get = lambda key, default: vision.get(key, default)  # noqa: E731  (CLIPVisionConfig defaults)
    activation = text_get("hidden_act", "quick_gelu")
    if vision_get("hidden_act", "quick_gelu") != activation:
        raise ValueError(
            f"config.json: text_config.hidden_act {activation!r} and vision_config.hidden_act "
            f"{vision_get('hidden_act', 'quick_gelu')!r} differ; one activation is supported"
        )
    if activation not in ACTIVATIONS:
        raise ValueError(f"config.json: hidden_act must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    eps = text_get("layer_norm_eps", 1e-5)
    if vision_get("layer_norm_eps", 1e-5) != eps:
        raise ValueError("config.json: text_config.layer_norm_eps and vision_config.layer_norm_eps differ")
    eos_token_id = text_get("eos_token_id", 49407)
    if not isinstance(eos_token_id, int):
        raise ValueError(f"config.json: text_config.eos_token_id must be an int, got {eos_token_id!r}")
    if vision_get("num_channels", 3) != 3:
        raise ValueError(f"config.json: vision_config.num_channels must be 3, got {vision['num_channels']}")
    image_size, patch_size = vision_get("image_size", 224), vision_get("patch_size", 32)
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ValueError(f"config.json: square image_size and patch_size expected, got {image_size}, {patch_size}")
    return CLIP(
        embed_dim=config.get("projection_dim", 512),
        vocab_size=text_get("vocab_size", 49408),
        context_length=text_get("max_position_embeddings", 77),
        text_width=text_get("hidden_size", 512),
        text_depth=text_get("num_hidden_layers", 12),
        text_heads=text_get("num_attention_heads", 8),
        text_mlp_dim=text_get("intermediate_size", 2048),
        eos_token_id=eos_token_id,
        # transformers keeps argmax pooling for configs from before its PR #24773.
        text_pooling="argmax" if eos_token_id == 2 else "eos",
        image_size=image_size,
        patch_size=patch_size,
        vision_width=vision_get("hidden_size", 768),
        vision_depth=vision_get("num_hidden_layers", 12),
        vision_heads=vision_get("num_attention_heads", 12),
        vision_mlp_dim=vision_get("intermediate_size", 3072),
        activation=activation,
        layer_norm_eps=eps,
        dtype=dtype,
    )


def read_hf_state_dict(path) -> Mapping[str, np.ndarray]:
    """The tensors of a transformers checkpoint directory (model.safetensors, its sharded index,
    or pytorch_model.bin with torch), each read from the file when it is looked up."""
    return state_dict.read_weights(_check_dir(path), ("model.safetensors",), ("pytorch_model.bin",))[0]


def convert_state_dict(model: CLIP, state: Mapping[str, np.ndarray], dtype: Any = jnp.float32) -> dict:
    """Map a transformers CLIPModel state dict onto `model`'s param tree.

    Raises ValueError naming every missing key and every shape mismatch.
    Keys we have no use for (e.g. the position_ids buffers) are ignored.
    """
    dummy_ids = jax.ShapeDtypeStruct((1, model.context_length), jnp.int32)
    dummy_pixels = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    if len(set(model.towers)) == 2:
        shapes = jax.eval_shape(model.init, jax.random.key(0), dummy_ids, dummy_pixels)["params"]
    elif "text" in model.towers:
        shapes = jax.eval_shape(lambda key, ids: model.init(key, ids, method=CLIP.encode_text),
                                jax.random.key(0), dummy_ids)["params"]
    else:
        shapes = jax.eval_shape(lambda key, pixels: model.init(key, pixels, method=CLIP.encode_image),
                                jax.random.key(0), dummy_pixels)["params"]
    flat_shapes = traverse_util.flatten_dict(shapes)
    missing, mismatched, flat = [], [], {}
    for path, expected in flat_shapes.items():
        key = hf_key(path)
        if key not in state:
            missing.append(key)
            continue
        raw = np.asarray(state[key])
        value = _to_ours(path, raw)
        if value.shape != expected.shape:
            mismatched.append(f"{key}: checkpoint {tuple(raw.shape)}, expected {expected.shape}")
            continue
        flat[path] = state_dict.to_device(value, dtype)
    problems = ([f"missing keys {missing}"] if missing else []) + (
        [f"shape mismatches {mismatched}"] if mismatched else []
    )
    if problems:
        raise ValueError("state dict does not fit the CLIP config: " + "; ".join(problems))
    return {"params": traverse_util.unflatten_dict(flat)}


def load_hf_clip(path, dtype: Any = jnp.float32) -> tuple[CLIP, dict]:
    """Load a transformers CLIPModel directory as (model, params).

    `dtype` is the params' dtype and the model's compute dtype. The model's
    image mean/std come from preprocessor_config.json when present.
    """
    path = _check_dir(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"path: {path!r} has no config.json")
    config = _read_json(config_file)
    if config.get("model_type", "clip") != "clip":
        raise ValueError(f"path: config.json has model_type {config['model_type']!r}, expected 'clip'")
    model = model_from_hf_config(config, dtype)
    preprocessor_file = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(preprocessor_file):
        preprocessor = _read_json(preprocessor_file)
        model = model.clone(
            image_mean=tuple(preprocessor.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(preprocessor.get("image_std", OPENAI_CLIP_STD)),
        )
    try:
        params = convert_state_dict(model, read_hf_state_dict(path), dtype)
    except ValueError as e:
        raise ValueError(f"path: {path!r}: {e}") from None
    return model, params


def load_hf_tokenizer(path, context_length: int | None = None) -> Tokenizer:
    """The CLIP tokenizer saved in a transformers directory, wrapped in our `Tokenizer`."""
    return Tokenizer.from_dir(_check_dir(path), context_length=context_length)
