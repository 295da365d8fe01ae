"""The pipeline directory on disk: pipeline.json, and per stage config.json and params/ (Orbax).

Reading checks every file and reports a missing or corrupt one by name (FileNotFoundError /
ValueError naming the argument `path`); writing goes to a temporary directory beside the
target, renamed into place when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import jax
import ml_collections
import numpy as np

from dalle2_jax.pipeline.stages import (CORE_STAGES, STAGE_NAME, Stage, as_tuples, build_module, cast_stage,
                                        place_variables)
from dalle2_jax.tokenizer import Tokenizer

PIPELINE_FILE = "pipeline.json"
CONFIG_FILE = "config.json"
PARAMS_SUBDIR = "params"
TOKENIZER_SUBDIR = "tokenizer"
FORMAT = "dalle2-jax-unclip"
VERSION = 1


def read_pipeline_dir(path, dtype=None) -> tuple[list[Stage], Tokenizer]:
    """The stages and tokenizer of a pipeline directory written by `write_pipeline_dir`, their
    parameters on the default device (cast to `dtype` and computing in it when given)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"path: expected a pipeline directory path, got {path!r}")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"path: no pipeline directory at {os.fspath(path)!r}")
    manifest_file = root / PIPELINE_FILE
    if not manifest_file.is_file():
        raise FileNotFoundError(f"path: {os.fspath(path)!r} has no {PIPELINE_FILE} (not a pipeline directory)")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"path: {manifest_file} is corrupt ({error})") from None
    names = manifest.get("stages") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(names, list)
            or not all(isinstance(n, str) for n in names)):
        raise ValueError(f"path: {manifest_file} is corrupt (expected format {FORMAT!r} and a list of stages)")
    if manifest.get("version") != VERSION:
        raise ValueError(f"path: {manifest_file} has version {manifest.get('version')!r}; this code reads "
                         f"version {VERSION}")
    unknown = [name for name in names if not STAGE_NAME.fullmatch(name)]
    missing = [name for name in CORE_STAGES if name not in names]
    if unknown or missing or len(set(names)) != len(names):
        raise ValueError(f"path: {manifest_file} is corrupt (stages {names}: expected {list(CORE_STAGES)}, "
                         "an optional 'prior' "
                         "and upsamplers 'upsampler', 'upsampler_1', ...)")
    stages = [_load_stage(root / name, name, dtype) for name in names]
    tokenizer_dir = root / "clip" / TOKENIZER_SUBDIR
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"path: {os.fspath(path)!r} has no clip/{TOKENIZER_SUBDIR}/ directory")
    clip_stages = [stage for stage in stages if stage.name == "clip"]
    context_length = clip_stages[0].module.context_length if clip_stages else None
    try:
        tokenizer = Tokenizer.from_dir(tokenizer_dir, context_length=context_length)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"path: {error}") from None
    except Exception as error:  # the tokenizers library raises plain Exceptions on bad files
        raise ValueError(f"path: the tokenizer in {tokenizer_dir} is corrupt ({error})") from None
    return stages, tokenizer


def write_pipeline_dir(path, stages: Sequence[Stage], tokenizer: Tokenizer, image_size: int) -> None:
    """Write the pipeline directory `path` atomically (a temporary directory beside it, then
    renamed); an existing pipeline directory there is replaced."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"path: expected a directory path, got {path!r}")
    target = Path(path).absolute()
    if target.exists() and not (target.is_dir() and ((target / PIPELINE_FILE).is_file()
                                                     or not any(target.iterdir()))):
        raise ValueError(f"path: {os.fspath(path)!r} exists and is not a pipeline directory; "
                         "not overwriting it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        for stage in stages:
            _save_stage(staging / stage.name, stage)
        tokenizer.save(staging / "clip" / TOKENIZER_SUBDIR)
        manifest = {"format": FORMAT, "version": VERSION, "stages": [stage.name for stage in stages],
                    "image_size": int(image_size)}
        (staging / PIPELINE_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _replace_directory(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _save_params(directory: Path, variables) -> None:
    import orbax.checkpoint as ocp

    from dalle2_jax.convert.state_dict import release_free_host_memory

    host = jax.tree.map(np.asarray, variables)  # views of CPU arrays, not copies
    ocp.PyTreeCheckpointer().save(directory.absolute(), args=ocp.args.PyTreeSave(host))
    # Orbax's writers peak at about twice the tree and leave the freed buffers in glibc's heap
    # (Karlo's prior: +6.9 GiB while saving, +3.4 GiB kept after); give them back before the next stage.
    release_free_host_memory()


def _load_params(directory: Path, stage_name: str):
    from dalle2_jax import checkpoint

    if not directory.is_dir():
        raise FileNotFoundError(f"path: stage {stage_name!r} has no {PARAMS_SUBDIR}/ directory at {directory}")
    try:
        return checkpoint.read_tree(directory)
    except checkpoint.DamagedCheckpointError as error:
        raise ValueError(f"path: the parameters of stage {stage_name!r} are corrupt: {error.file}: "
                         f"{error.reason}") from None


def read_config(file: Path, argument: str) -> ml_collections.ConfigDict:
    if not file.is_file():
        raise FileNotFoundError(f"{argument}: no {file.name} at {file}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{argument}: {file} is corrupt ({error})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ValueError(f"{argument}: {file} is corrupt (expected a stage config with a 'model' section)")
    return ml_collections.ConfigDict(as_tuples(raw))


def _load_stage(directory: Path, name: str, dtype=None) -> Stage:
    if not directory.is_dir():
        raise FileNotFoundError(f"path: stage {name!r} listed in {PIPELINE_FILE} has no directory {directory}")
    config = read_config(directory / CONFIG_FILE, "path")
    module = build_module(name, config)
    stage = Stage(name, config, module, place_variables(_load_params(directory / PARAMS_SUBDIR, name), dtype))
    return stage if dtype is None else cast_stage(stage, dtype)


def _save_stage(directory: Path, stage: Stage) -> None:
    directory.mkdir(parents=True)
    text = stage.config.to_json_best_effort(indent=2)
    (directory / CONFIG_FILE).write_text(text + "\n", encoding="utf-8")
    _save_params(directory / PARAMS_SUBDIR, stage.variables)


def _replace_directory(staging: Path, target: Path) -> None:
    """Move the complete `staging` to `target`; an old `target` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
