"""`--config.init_from=DIR`: start a stage's training from imported or exported weights.

DIR is a pipeline directory (`save_pretrained`, `dalle2-jax export`, `dalle2-jax convert unclip`)
or a diffusers UnCLIP directory (converted on the fly). The stage's parameters replace the fresh
ones (and the EMA copy) before the first step; shapes must match the config's exactly, so the
config must describe the same network (e.g. configs/prior.py:karlo for Karlo's prior). A run
that resumes from its own checkpoint ignores init_from.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np


def read_stages(directory):
    """(stages, tokenizer) of a pipeline or diffusers UnCLIP directory, named as the config key."""
    from dalle2_jax.convert import unclip as unclip_import
    from dalle2_jax.pipeline.storage import read_pipeline_dir

    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise ValueError(f"config.init_from: expected a pipeline or diffusers UnCLIP directory, got {directory!r}")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"config.init_from: no directory at {os.fspath(directory)!r}")
    try:
        if unclip_import.is_unclip_dir(directory):
            return unclip_import.read_unclip_dir(directory)
        return read_pipeline_dir(directory)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"config.init_from: {error}") from None


def stage_params(directory, stage: str) -> Any:
    """The params (the "params" collection) of `stage` ("prior", "decoder", "upsampler", "clip")."""
    stages, _ = read_stages(directory)
    for candidate in stages:
        if candidate.kind == stage:
            return candidate.variables["params"]
    raise ValueError(f"config.init_from: {os.fspath(directory)!r} has no {stage} stage (it has "
                     f"{[s.name for s in stages]})")


def empty_caption_text(directory) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(text_embed, text_encodings, text_mask) of "" from the directory's CLIP: the unconditional
    text of a prior without learned null text (Karlo's)."""
    from dalle2_jax.convert.unclip import empty_caption

    stages, tokenizer = read_stages(directory)
    clip = next(stage for stage in stages if stage.kind == "clip")
    text = empty_caption(clip, tokenizer)
    return text["text_embed"], text["text_encodings"], text["text_mask"]


def replace_params(abstract_params: Any, loaded: Any, directory) -> Any:
    """`loaded` checked against the fresh params' structure and shapes, as float32 host arrays."""
    want = {jax.tree_util.keystr(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(
        abstract_params)[0]}
    got = {jax.tree_util.keystr(p): tuple(np.shape(leaf)) for p, leaf in jax.tree_util.tree_flatten_with_path(
        loaded)[0]}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or wrong:
        details = ([f"missing {missing[:3]}"] if missing else []) + (
            [f"unexpected {unexpected[:3]}"] if unexpected else []) + (
            ["wrong shapes " + ", ".join(f"{k}: {got[k]} (config: {want[k]})" for k in wrong[:3])] if wrong else [])
        raise ValueError(f"config.init_from: the weights in {os.fspath(directory)!r} do not fit config.model "
                         f"({'; '.join(details)})")
    return jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), loaded)
