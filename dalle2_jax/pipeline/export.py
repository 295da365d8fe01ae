"""Training workdirs -> a pipeline directory (`dalle2-jax export`)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import ml_collections

from dalle2_jax.pipeline.stages import REQUIRED_STAGES, Stage, as_tuples, build_module, is_ar_prior
from dalle2_jax.pipeline.storage import CONFIG_FILE, read_config
from dalle2_jax.pipeline.unclip import UnCLIPPipeline


def _workdir_stage(workdir: Path, name: str) -> Stage:
    from dalle2_jax import checkpoint

    config = read_config(workdir / CONFIG_FILE, "root_workdir")
    module = build_module(name, config)
    variables = {"params": checkpoint.load_params(workdir, which="ema_params")}
    if name == "prior" and is_ar_prior(config):  # its PCA + quantizer, fitted before training
        from dalle2_jax.models.pca_quantizer import FILE_NAME, PCAQuantizer

        variables["quantizer"] = PCAQuantizer.load(workdir / FILE_NAME, "root_workdir").as_variables()
    return Stage(name, config, module, variables)


def _module_config(module) -> dict:
    return {field.name: getattr(module, field.name) for field in dataclasses.fields(module)
            if field.name not in ("parent", "name")}


PRIORS = {"diffusion": "prior", "ar": "ar_prior"}  # --prior -> the workdir its stage is trained in


def export_pipeline(root_workdir, out, prior: str = "diffusion") -> Path:
    """Build the pipeline directory `out` from the training workdirs root_workdir/clip, /prior
    (or /ar_prior with prior="ar"), /decoder and /upsampler* (their config.json and latest
    checkpoint's EMA parameters; CLIP's tokenizer from clip/tokenizer/); returns `out`."""
    if prior not in PRIORS:
        raise ValueError(f"prior: expected one of {sorted(PRIORS)}, got {prior!r}")
    if not isinstance(root_workdir, (str, os.PathLike)) or not os.fspath(root_workdir):
        raise ValueError(f"root_workdir: expected a directory path, got {root_workdir!r}")
    root = Path(root_workdir)
    if not root.is_dir():
        raise FileNotFoundError(f"root_workdir: no directory {os.fspath(root_workdir)!r}")
    workdirs = {name: root / (PRIORS[prior] if name == "prior" else name) for name in REQUIRED_STAGES}
    for directory in workdirs.values():
        if not directory.is_dir():
            raise FileNotFoundError(f"root_workdir: no {directory.name}/ training workdir in "
                                    f"{os.fspath(root_workdir)!r}")
    from dalle2_jax.tasks.clip import load_clip

    clip_model, clip_variables, tokenizer, clip_config = load_clip(root / "clip")
    clip_config = ml_collections.ConfigDict(as_tuples(clip_config.to_dict()))
    clip_config.model = ml_collections.ConfigDict(as_tuples(_module_config(clip_model)))
    stages = [Stage("clip", clip_config, clip_model, clip_variables),
              _workdir_stage(workdirs["prior"], "prior"), _workdir_stage(root / "decoder", "decoder")]
    upsampler_dirs = [d for d in sorted(root.glob("upsampler*")) if (d / CONFIG_FILE).is_file()]
    upsamplers = [_workdir_stage(d, "upsampler") for d in upsampler_dirs]
    upsamplers.sort(key=lambda stage: stage.module.image_size)
    for index, stage in enumerate(upsamplers):
        stage.name = "upsampler" if index == 0 else f"upsampler_{index}"
    pipeline = UnCLIPPipeline([*stages, *upsamplers], tokenizer)
    pipeline.save_pretrained(out)
    return Path(out)
