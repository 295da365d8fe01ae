"""Stages of a pipeline: the Flax module and variables of each, built from a stage config."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle2_jax import diffusion
from dalle2_jax.models import prior as prior_lib
from dalle2_jax.models.ar_prior import ARPrior
from dalle2_jax.models.clip import CLIP
from dalle2_jax.models.unet import UNet

REQUIRED_STAGES = ("clip", "prior", "decoder")
# What a pipeline needs at the least: an imported image-variations model has no prior.
CORE_STAGES = ("clip", "decoder")
STAGE_NAME = re.compile(r"clip|prior|decoder|upsampler(_[1-9][0-9]*)?")

@dataclasses.dataclass
class Stage:
    """One stage: its name, full config, Flax module and variables ({"params": ...})."""

    name: str
    config: ml_collections.ConfigDict
    module: Any
    variables: Any

    @property
    def kind(self) -> str:
        return "upsampler" if self.name.startswith("upsampler") else self.name


def as_tuples(value):
    """JSON lists -> tuples, so modules built from a loaded config stay hashable (jit static args)."""
    if isinstance(value, Mapping):
        return {key: as_tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(as_tuples(item) for item in value)
    return value


def _model_kwargs(config: ml_collections.ConfigDict, name: str) -> dict:
    model = config.get("model")
    if model is None:
        raise ValueError(f"{name}: its config has no 'model' section")
    return as_tuples(model.to_dict() if hasattr(model, "to_dict") else dict(model))


def build_module(name: str, config: ml_collections.ConfigDict):
    """The Flax module of stage `name` from its config."""
    kind = "upsampler" if name.startswith("upsampler") else name
    kwargs = _model_kwargs(config, name)
    try:
        if kind == "clip":
            return CLIP(**kwargs)
        if kind == "prior":
            return ARPrior(**kwargs) if is_ar_prior(config) else prior_lib.DiffusionPrior(**kwargs)
        if kind in ("decoder", "upsampler"):
            return UNet(**kwargs)
    except TypeError as error:
        raise ValueError(f"{name}: config.model does not fit the stage's model ({error})") from None
    raise ValueError(f"name: expected a stage among {REQUIRED_STAGES} or 'upsampler[_N]', got {name!r}")


def config_get(config, path: str, default=None):
    node = config
    for key in path.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(key)
    return default if node is None else node


def is_ar_prior(config) -> bool:
    """A prior stage's config says `kind: "ar"` for the autoregressive prior (configs/ar_prior.py)."""
    return config_get(config, "kind") == "ar"


def prior_uses_text_encodings(config) -> bool:
    return bool(config_get(config, "data.use_text_encodings", True))


def _example_inputs(stage_name: str, module, config) -> tuple[tuple, dict]:
    """Abstract (args, kwargs) for `module.init`: what the stage is called with, batch 1."""
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    kind = "upsampler" if stage_name.startswith("upsampler") else stage_name
    if kind == "clip":
        return (i32(1, module.context_length), f32(1, module.image_size, module.image_size, 3)), {}
    if kind == "prior" and isinstance(module, ARPrior):
        return (i32(1, module.num_components - 1),), dict(
            text_embed=f32(1, module.embed_dim), text_encodings=f32(1, module.max_text_len, module.text_encoding_dim),
            text_mask=jax.ShapeDtypeStruct((1, module.max_text_len), bool), dot_token=i32(1))
    if kind == "prior":
        return (f32(1, module.embed_dim), i32(1)), dict(
            text_embed=f32(1, module.embed_dim), text_encodings=f32(1, module.max_text_len, module.text_encoding_dim),
            text_mask=jax.ShapeDtypeStruct((1, module.max_text_len), bool))
    size = module.image_size
    args = (f32(1, size, size, module.out_channels), i32(1))
    if kind == "upsampler":
        kwargs = {"low_res": f32(1, size, size, 3)}
        if module.use_noise_level:
            kwargs["noise_level"] = i32(1)
        return args, kwargs
    cond = config_get(config, "conditioning")
    if cond is None and (module.use_image_embed or module.use_text_encodings):
        raise ValueError(f"{stage_name}: its config has no 'conditioning' section (image_embed_dim, text_len, "
                         "text_width)")
    kwargs = {}
    if module.use_image_embed:
        kwargs["image_embed"] = f32(1, int(cond.image_embed_dim))
    if module.use_text_encodings:
        kwargs.update(text_encodings=f32(1, int(cond.text_len), int(cond.text_width)),
                      text_mask=jax.ShapeDtypeStruct((1, int(cond.text_len)), bool))
    if module.use_text_embed:
        kwargs["text_embed"] = f32(1, int(cond.image_embed_dim))
    return args, kwargs


def abstract_variables(stage_name: str, module, config):
    """ShapeDtypeStructs of the stage's variables, from `jax.eval_shape` (nothing allocated)."""
    args, kwargs = _example_inputs(stage_name, module, config)
    method = None
    if isinstance(module, CLIP) and len(set(module.towers)) == 1:  # an imported text or image encoder alone
        method, args = (CLIP.encode_text, args[:1]) if "text" in module.towers else (CLIP.encode_image, args[1:])
    return jax.eval_shape(lambda key, args, kwargs: module.init(key, *args, method=method, **kwargs),
                          jax.random.key(0), args, kwargs)


def random_variables(abstract, seed: int, scale: float = 1.0):
    """Host-drawn variables for `abstract`: zero biases, unit norm scales, every other leaf
    ~ N(0, scale^2 / fan_in) (fan_in = the product of all but the last axis).

    Not the models' own initialisers (those compile a random program per parameter shape,
    tens of CPU seconds for a tiny pipeline) and no ADM zero-init: outputs depend on inputs.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['bias']"):
            return np.zeros(leaf.shape, leaf.dtype)
        if name.endswith("['scale']"):
            return np.ones(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        return (scale * rng.standard_normal(leaf.shape) / math.sqrt(fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def place_variables(variables, dtype=None):
    """Variables (NumPy or jax) on the default device, leaf by leaf, floating leaves cast to
    `dtype` there when given. A host leaf is released as soon as it is placed when the caller
    holds no other reference to the tree (pass it straight in), so loading a model needs about
    one copy of it, not two."""
    from dalle2_jax.convert.state_dict import to_device

    leaves, treedef = jax.tree.flatten(variables)
    del variables
    for index, leaf in enumerate(leaves):
        cast = dtype is not None and jnp.issubdtype(leaf.dtype, jnp.floating)
        leaves[index] = to_device(leaf, dtype if cast else None)
    return jax.tree.unflatten(treedef, leaves)


def cast_stage(stage: Stage, dtype) -> Stage:
    """The stage with floating parameters and compute dtype in `dtype` (e.g. "bfloat16"); the
    parameters are cast on the device, those already in `dtype` are kept as they are."""
    name = jnp.dtype(dtype).name
    config = ml_collections.ConfigDict(stage.config.to_dict())
    if "compute_dtype" in config:
        config.compute_dtype = name
    config.model.dtype = name
    return Stage(stage.name, config, build_module(stage.name, config), place_variables(stage.variables, name))


def has_last_step_model(stage: Stage) -> bool:
    """Whether the stage runs its last sampling step with other weights (Karlo's super_res_last)."""
    return bool(config_get(stage.config, "diffusion.last_step_model", False))


def check_variables(stage: Stage) -> None:
    expected = abstract_variables(stage.name, stage.module, stage.config)
    if has_last_step_model(stage):
        expected = {**expected, "last_step_params": expected["params"]}
    got = {jax.tree_util.keystr(path): tuple(np.shape(leaf))
           for path, leaf in jax.tree_util.tree_flatten_with_path(stage.variables)[0]}
    want = {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:3]}")
        if unexpected:
            details.append(f"unexpected {unexpected[:3]}")
        if wrong:
            details.append("wrong shapes " + ", ".join(f"{k}: {got[k]} (expected {want[k]})" for k in wrong[:3]))
        raise ValueError(f"{stage.name}: parameters do not fit the stage's config.model ({'; '.join(details)})")


def stage_schedule(stage: Stage) -> diffusion.DiffusionSchedule:
    return diffusion.make_schedule(config_get(stage.config, "diffusion.schedule", "cosine"),
                                   int(config_get(stage.config, "diffusion.num_timesteps", 1000)))

