"""diffusers' PriorTransformer (Karlo's prior) -> our `DiffusionPrior` config and params.

The module already follows PriorTransformer's layout and names; Karlo's differences are config
options (`embed_norm="clip_mean_std"`, `normalize_text_embed=False`, `learned_null_text=False`,
`attention_mask_value=-10000`). Linear weights (out, in) become kernels (in, out), the attention
projections split into (heads, head_dim).
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from dalle2_jax.convert.state_dict import to_device
from dalle2_jax.models.prior import NUM_EXTRA_TOKENS

# PriorTransformer options our module expresses only at these values.
_FIXED = {"additional_embeddings": NUM_EXTRA_TOKENS, "time_embed_act_fn": "silu", "norm_in_type": None,
          "embedding_proj_norm_type": None, "encoder_hid_proj_type": "linear", "added_emb_type": "prd"}
_DEFAULTS = {"num_attention_heads": 32, "attention_head_dim": 64, "num_layers": 20, "embedding_dim": 768,
             "num_embeddings": 77, "dropout": 0.0, "time_embed_dim": None, "embedding_proj_dim": None,
             "clip_embed_dim": None, **_FIXED}
# Karlo v1 alpha: its prior is PriorTransformer() with the defaults, its prior_scheduler this.
KARLO_PRIOR_CONFIG = {"_class_name": "PriorTransformer", **{k: v for k, v in _DEFAULTS.items()}}
KARLO_PRIOR_SCHEDULER = {"_class_name": "UnCLIPScheduler", "variance_type": "fixed_small_log",
                         "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 5.0,
                         "num_train_timesteps": 1000}
_RENAMES = {"time_embedding_linear_1": "time_embedding.linear_1", "time_embedding_linear_2": "time_embedding.linear_2",
            "ff_in": "ff.net.0.proj", "ff_out": "ff.net.2", "to_out": "to_out.0"}


def _get(config: Mapping, key: str):
    return config.get(key, _DEFAULTS[key])


def prior_config_from_diffusers(prior_config: Mapping, scheduler_config: Mapping | None = None,
                                file: str = "prior/config.json") -> ml_collections.ConfigDict:
    """A prior stage config (model, diffusion, data sections as configs/prior.py) from a PriorTransformer
    config.json and its UnCLIPScheduler's scheduler_config.json (defaults: Karlo's)."""
    for key, value in _FIXED.items():
        if _get(prior_config, key) != value:
            raise ValueError(f"{file}: {key} {_get(prior_config, key)!r} is not supported (expected {value!r})")
    embed_dim = int(_get(prior_config, "embedding_dim"))
    for key in ("embedding_proj_dim", "clip_embed_dim"):
        if _get(prior_config, key) not in (None, embed_dim):
            raise ValueError(f"{file}: {key} {prior_config[key]!r} is not supported (expected embedding_dim "
                             f"{embed_dim} or null)")
    heads, head_dim = int(_get(prior_config, "num_attention_heads")), int(_get(prior_config, "attention_head_dim"))
    width = heads * head_dim
    scheduler_config = dict(scheduler_config or {})
    prediction = scheduler_config.get("prediction_type", "sample")
    if prediction not in ("sample", "epsilon"):
        raise ValueError(f"prior_scheduler/scheduler_config.json: prediction_type {prediction!r} is not supported "
                         "(expected 'sample' or 'epsilon')")
    if scheduler_config.get("variance_type", "fixed_small_log") != "fixed_small_log":
        raise ValueError("prior_scheduler/scheduler_config.json: variance_type "
                         f"{scheduler_config['variance_type']!r} is not supported (expected 'fixed_small_log')")

    config = ml_collections.ConfigDict()
    config.variant = "karlo"
    config.seed = 0
    config.compute_dtype = "float32"
    config.model = ml_collections.ConfigDict(dict(
        embed_dim=embed_dim, text_encoding_dim=embed_dim, max_text_len=int(_get(prior_config, "num_embeddings")),
        width=width, depth=int(_get(prior_config, "num_layers")), num_heads=heads, mlp_ratio=4.0,
        time_embed_dim=_get(prior_config, "time_embed_dim"), dropout=float(_get(prior_config, "dropout")),
        embed_scale=None, objective="x0" if prediction == "sample" else "eps", embed_norm="clip_mean_std",
        normalize_text_embed=False, learned_null_text=False, attention_mask_value=-10000.0))
    config.model.dtype = config.get_ref("compute_dtype")
    clip_sample = bool(scheduler_config.get("clip_sample", True))
    config.diffusion = ml_collections.ConfigDict(dict(
        schedule="cosine", num_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)),
        sampling_steps=25, sampler="ddpm", eta=0.0, guidance_scale=4.0, num_candidates=1, text_drop_prob=0.1,
        clip_range=float(scheduler_config.get("clip_sample_range", 1.0)) if clip_sample else None,
        null_text="empty_caption", objective=config.model.objective))
    config.data = ml_collections.ConfigDict(dict(train_dir="", eval_dirs=ml_collections.ConfigDict(),
                                                 use_text_encodings=True, text_len=None, worker_count=0))
    return config


def diffusers_key(path: tuple[str, ...]) -> str:
    """Our param path, e.g. ('transformer_blocks_3', 'attn1', 'to_q', 'kernel'), -> the
    PriorTransformer state-dict key 'transformer_blocks.3.attn1.to_q.weight'."""
    parts = []
    for name in path:
        if name.startswith("transformer_blocks_"):
            parts += ["transformer_blocks", name.removeprefix("transformer_blocks_")]
        elif name in ("kernel", "scale"):
            parts.append("weight")
        else:
            parts.append(_RENAMES.get(name, name))
    return ".".join(parts)


def _to_ours(path: tuple[str, ...], value: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The file's array in our layout, or unchanged (so the caller reports the mismatch)."""
    if path[-1] == "kernel":
        value = value.T  # (out, in) -> (in, out)
        if len(shape) == 3 and path[-2] == "to_out" and value.shape == (shape[0] * shape[1], shape[2]):
            return value.reshape(shape)  # (heads * head_dim, width) -> (heads, head_dim, width)
        if len(shape) == 3 and value.shape == (shape[0], shape[1] * shape[2]):
            return value.reshape(shape)  # (width, heads * head_dim) -> (width, heads, head_dim)
        return value
    if path[-1] == "bias" and len(shape) == 2 and value.shape == (shape[0] * shape[1],):
        return value.reshape(shape)  # q/k/v biases (heads * head_dim,) -> (heads, head_dim)
    squeezed = value.reshape(value.shape[value.ndim - len(shape):]) if value.ndim > len(shape) and all(
        d == 1 for d in value.shape[:value.ndim - len(shape)]) else value
    return squeezed  # positional_embedding (1, N, W), prd_embedding (1, 1, W), clip_mean/std (1, D)


def convert_prior(state: Mapping[str, np.ndarray], config: ml_collections.ConfigDict,
                  file: str = "prior", dtype=None) -> dict:
    """{"params": ...} for `build_module("prior", config)` from a PriorTransformer state dict, as
    jax arrays in `dtype` (default: the module's param dtype), each placed as it is converted.

    Raises ValueError naming `file`, every missing key and every shape mismatch.
    """
    from dalle2_jax.pipeline.stages import abstract_variables, build_module

    module = build_module("prior", config)
    shapes = traverse_util.flatten_dict(abstract_variables("prior", module, config)["params"])
    missing, mismatched, flat = [], [], {}
    for path, expected in shapes.items():
        key = diffusers_key(path)
        if key not in state:
            missing.append(key)
            continue
        value = to_device(state[key])  # transposes and reshapes run on the device
        converted = _to_ours(path, value, expected.shape)
        if converted.shape != expected.shape:
            mismatched.append(f"{key}: file {tuple(value.shape)}, expected {tuple(expected.shape)} (ours)")
            continue
        flat[path] = to_device(converted, dtype or expected.dtype)
    if missing or mismatched:
        problems = ([f"missing keys {missing[:5]}"] if missing else []) + (
            [f"shape mismatches {mismatched[:5]}"] if mismatched else [])
        raise ValueError(f"{file}: the weights do not fit its config.json ({'; '.join(problems)})")
    return {"params": traverse_util.unflatten_dict(flat)}
