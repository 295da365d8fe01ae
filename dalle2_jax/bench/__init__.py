"""`python -m dalle2_jax.bench MODE [options] [--config.KEY=VALUE ...]`: prints one JSON object.

Modes: unet-train, unet-sample (dalle2_jax.bench.unet), prior-train,
prior-sample (dalle2_jax.bench.prior), karlo-generate (dalle2_jax.bench.karlo: Karlo end to end
against diffusers' UnCLIPPipeline, each in its own process). Timings are medians after warm-up
calls; FLOPs come from XLA's cost analysis of the compiled step; the 2048 x
2048 float32 matmul measured in the same run is the machine's ceiling.
`--reference` times diffusers' UNet of the same layout in the same run
(dalle2_jax.bench.reference), so the ratios compare like with like on
whatever machine runs it.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Any, Sequence

MODES = {
    "unet-train": ("dalle2_jax.bench.unet", "unet_train", "configs/unet.py:bench"),
    "unet-sample": ("dalle2_jax.bench.unet", "unet_sample", "configs/unet.py:bench"),
    "prior-train": ("dalle2_jax.bench.prior", "prior_train", "configs/prior.py:bench"),
    "prior-sample": ("dalle2_jax.bench.prior", "prior_sample", "configs/prior.py:bench"),
    "karlo-generate": ("dalle2_jax.bench.karlo", "karlo_generate", "configs/prior.py:karlo"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dalle2_jax.bench", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--config", default=None, help="FILE.py[:variant]; default depends on the mode")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: mode/config dependent)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (the median is reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", action="store_true",
                        help="unet-train/unet-sample: also time diffusers' UNet2DConditionModel of the same layout "
                             "in this run and report the ratios (needs torch and diffusers)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="karlo-generate: parameter and compute dtype of both sides (default float32)")
    parser.add_argument("--size", default=None, choices=("full", "small"),
                        help="karlo-generate: Karlo v1 alpha's shapes (default) or a scaled-down copy")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="unet-train: one device's bf16 peak TFLOP/s for ratio_to_peak (default: looked up "
                             "from the device kind; none on CPU)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the options; `--config.a.b=value` arguments are collected into `args.overrides`."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    overrides = []
    for item in unknown:
        if not item.startswith("--config.") or "=" not in item:
            parser.error(f"unrecognized argument {item!r} (config overrides look like --config.a.b=value)")
        overrides.append(item)
    args.overrides = overrides
    if args.config is None:
        args.config = MODES[args.mode][2]
    for name in ("batch", "steps", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}: expected a positive integer, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup: expected >= 0, got {args.warmup}")
    return args


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs one benchmark and returns its result dict (what `main` prints)."""
    args = parse_args(argv)
    module_name, function_name, _ = MODES[args.mode]
    benchmark = getattr(importlib.import_module(module_name), function_name)
    return benchmark(args)


def main(argv: Sequence[str] | None = None) -> None:
    from dalle2_jax.bench import common

    common.emit(run(argv))
