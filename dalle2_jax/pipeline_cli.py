"""The work behind `dalle2-jax generate | variations | interpolate | text-diff | inpaint`.

`run_pipeline_command(args)` takes the namespace `dalle2_jax.cli` parsed: it loads the
pipeline (--model), runs the command with a progress display on stderr, and writes a PNG
grid to --out and the single images beside it (<out stem>_0.png, _1.png, ...), each
atomically. Bad arguments and unreadable files end the command with a one-line error.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from dalle2_jax.pipeline import UnCLIPPipeline
from dalle2_jax.training.metrics import write_image_grid

COMMANDS = ("generate", "variations", "interpolate", "text-diff", "inpaint")


def sampler_option(args: argparse.Namespace, with_prior: bool):
    """The pipeline's `sampler` argument from --sampler and the per-stage --STAGE-sampler flags."""
    per_stage = {"decoder": getattr(args, "decoder_sampler", None),
                 "upsampler": getattr(args, "upsampler_sampler", None)}
    if with_prior:
        per_stage["prior"] = getattr(args, "prior_sampler", None)
    every = getattr(args, "sampler", None)
    if all(value is None for value in per_stage.values()):
        return every
    return {stage: value or every for stage, value in per_stage.items() if value or every}


def _stage_options(args: argparse.Namespace, with_prior: bool) -> dict:
    options = {"decoder_steps": args.decoder_steps, "upsampler_steps": args.upsampler_steps,
               "decoder_guidance_scale": args.decoder_guidance, "sampler": sampler_option(args, with_prior)}
    if with_prior:
        options.update(prior_steps=args.prior_steps, prior_guidance_scale=args.prior_guidance)
    return options


def _run(pipe: UnCLIPPipeline, args: argparse.Namespace) -> tuple[np.ndarray, int]:
    """(uint8 images, grid columns) of the command."""
    command = args.command
    if command == "generate":
        images = pipe.generate(args.prompt, seed=args.seed, num_images_per_prompt=args.num_images,
                               **_stage_options(args, with_prior=True))
        return images, args.num_images
    if command == "variations":
        images = pipe.variations(args.image, num_images=args.num_images, seed=args.seed, invert=args.invert,
                                 **_stage_options(args, with_prior=False))
        return images, len(images)
    if command == "interpolate":
        images = pipe.interpolate(args.image_a, args.image_b, num_frames=args.num_frames, seed=args.seed,
                                  **_stage_options(args, with_prior=False))
        return images, len(images)
    if command == "text-diff":
        images = pipe.text_diff(args.image, args.source_caption, args.target_caption, num_frames=args.num_frames,
                                seed=args.seed, **_stage_options(args, with_prior=False))
        return images, len(images)
    if command == "inpaint":
        images = pipe.inpaint(args.image, args.mask, args.prompt, seed=args.seed,
                              **_stage_options(args, with_prior=True))
        return images, len(images)
    raise ValueError(f"command: expected one of {COMMANDS}, got {command!r}")


def write_outputs(out, images: np.ndarray, ncols: int) -> list[Path]:
    """The grid at `out` (PNG) and each image beside it as <stem>_<i>.png; returns the paths, grid first."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out: expected a .png path, got {str(out)!r}")
    paths = [write_image_grid(out, images, ncols)]
    for index, image in enumerate(images):
        paths.append(write_image_grid(out.with_name(f"{out.stem}_{index}.png"), image[None], 1))
    return paths


def run_pipeline_command(args: argparse.Namespace) -> list[Path]:
    """Run one pipeline command from parsed CLI arguments; returns the written paths."""
    console = Console(stderr=True)
    try:
        if Path(args.out).suffix.lower() != ".png":
            raise ValueError(f"--out: expected a .png path, got {args.out!r}")
        with console.status(f"loading {args.model}") as status:
            started = time.perf_counter()
            pipe = UnCLIPPipeline.from_pretrained(args.model)
            console.log(f"loaded the pipeline ({', '.join(s.name for s in pipe.stages)}) "
                        f"in {time.perf_counter() - started:.1f}s")
            current = {"name": None, "start": time.perf_counter()}

            def on_stage(name: str) -> None:
                now = time.perf_counter()
                if current["name"] is not None:
                    console.log(f"{current['name']}: {now - current['start']:.1f}s")
                current.update(name=name, start=now)
                status.update(f"{args.command}: {name}")

            pipe.stage_callback = on_stage
            images, ncols = _run(pipe, args)
            on_stage("writing")
            paths = write_outputs(args.out, images, ncols)
    except (ValueError, FileNotFoundError) as error:
        if getattr(args, "debug", False):
            raise
        raise SystemExit(f"dalle2-jax {args.command}: error: {error}") from None
    console.log(f"wrote {paths[0]} ({len(images)} images of {images.shape[1]}x{images.shape[2]}) "
                f"and {paths[1].name} ... {paths[-1].name}")
    return paths
