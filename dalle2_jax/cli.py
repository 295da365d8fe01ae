"""The `dalle2-jax` command: argument parsing only; the work lives in the library."""
from __future__ import annotations

import argparse
import logging
import os
import sys

STAGES = ("clip", "prior", "ar_prior", "decoder", "upsampler")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="pipeline directory (from `dalle2-jax export` or the demo)")
    parser.add_argument("--out", required=True, help="output PNG; the single images are written beside it")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
    parser.add_argument("--decoder-steps", type=int, default=None, help="decoder sampling steps (default: the model's config)")
    parser.add_argument("--upsampler-steps", type=int, default=None, help="sampling steps of each upsampler")
    parser.add_argument("--decoder-guidance", type=float, default=None, help="decoder classifier-free guidance scale")
    parser.add_argument("--sampler", default=None,
                        help="sampler of every stage: dpm++2m, dpm++2m-sde, dpm++3m, unipc, ddim, ddpm "
                             "(default: each stage's config)")
    parser.add_argument("--decoder-sampler", default=None, help="the decoder's sampler (overrides --sampler)")
    parser.add_argument("--upsampler-sampler", default=None, help="the upsamplers' sampler (overrides --sampler)")


def _add_prior_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prior-steps", type=int, default=None, help="prior sampling steps (paper: 64)")
    parser.add_argument("--prior-guidance", type=float, default=None, help="prior classifier-free guidance scale")
    parser.add_argument("--prior-sampler", default=None, help="the prior's sampler (overrides --sampler)")


def _add_cache_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cache-dir", default=None,
                       help="JAX compilation cache, so that a second run with the same model and shapes does not "
                            "compile again (default: $DALLE2_JAX_CACHE_DIR, else ~/.cache/dalle2-jax/xla)")
    group.add_argument("--no-cache", action="store_true", help="compile without the persistent compilation cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalle2-jax",
        description="DALL-E 2 (unCLIP) in JAX: train the stages, export a pipeline, generate images.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    # --debug is accepted after the command too (`dalle2-jax train ... --debug`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    p = command("demo", help="offline end-to-end demo: data, every stage, samples and a report")
    p.add_argument("--workdir", default="runs/demo", help="where data, checkpoints, the pipeline and outputs go")
    p.add_argument("--quick", action="store_true", help="a few-minute run with tiny step counts (what CI runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prior", choices=("diffusion", "ar"), default="diffusion",
                   help="the pipeline's prior: the diffusion prior or the autoregressive one (paper, 2.2)")

    p = command("train", help="train one stage through the shared loop",
                description="Extra `--config.KEY=VALUE` arguments override config fields, "
                            "e.g. --config.total_steps=12 --config.optimizer.learning_rate=3e-4")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--config", required=True, help="configs/FILE.py[:variant]")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard logs and samples")

    p = command("plan", help="compile a stage's train step for a TPU pod topology here: memory, FLOPs, fits or not",
                description="Compiles the train step of `dalle2-jax train` for a TPU topology with libtpu on this "
                            "host (the tpu extra) and reports bytes per device, FLOPs per step and the step time "
                            "at the chip's peak. Exit status 1 when it does not fit. Extra `--config.KEY=VALUE` "
                            "arguments override config fields.")
    p.add_argument("--stage", required=True, choices=("clip", "prior", "decoder", "upsampler"))
    p.add_argument("--config", required=True, help="configs/FILE.py[:variant]")
    p.add_argument("--topology", required=True,
                   help="GENERATION:SHAPE: v4:4x4x4, v5e:16x16, v5p:8x8x8 (v5:8x8x8), v6e:16x16, tpu7x:2x2x2")
    p.add_argument("--slices", type=int, default=1, help="number of such slices joined over the data-centre network")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's batch_size)")
    p.add_argument("--mesh", default=None, help="data=N,fsdp=M (-1: the rest; default: the config's mesh)")
    p.add_argument("--accum", type=int, default=None,
                   help="gradient accumulation steps (default: the config's optimizer.grad_accum_steps)")
    p.add_argument("--search", action="store_true",
                   help="try mesh shapes and accumulation steps; print the table and the fastest plan that fits")
    p.add_argument("--json", default=None, help="also write the plan (or the --search result) as JSON here")
    p.add_argument("--hbm-gib", type=float, default=None,
                   help="plan against this much HBM per device instead of the chip's (keep a reserve)")

    p = command("embed", help="write a CLIP embedding dataset for prior/decoder training")
    p.add_argument("--clip", required=True, help="CLIP training workdir or exported CLIP directory")
    p.add_argument("--data", required=True,
                   help="dataset: 'shapes' (the built-in set), an image folder, or a webdataset shard directory")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--data-dir", default=None, help="tfds data_dir for built datasets (default: <out>/../data)")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=256)

    p = command("export", help="turn training workdirs into one pipeline directory")
    p.add_argument("--workdir", required=True, help="directory holding clip/, prior/, decoder/, upsampler*/ workdirs")
    p.add_argument("--out", required=True, help="pipeline directory to write")
    p.add_argument("--prior", choices=("diffusion", "ar"), default="diffusion",
                   help="which prior workdir becomes the pipeline's prior: prior/ or ar_prior/")

    p = command("generate", help="text -> image")
    p.add_argument("prompt", nargs="+", help="one or more captions")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    _add_model_args(p)
    _add_cache_args(p)
    _add_prior_args(p)

    p = command("variations", help="variations of an image (CLIP image embedding -> decoder)")
    p.add_argument("image")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--invert", action="store_true", help="start from the image's own DDIM-inverted x_T")
    _add_model_args(p)
    _add_cache_args(p)

    p = command("interpolate", help="slerp between two images' CLIP embeddings")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--num-frames", type=int, default=5)
    _add_model_args(p)
    _add_cache_args(p)

    p = command("text-diff", help="move an image along the text diff of two captions")
    p.add_argument("image")
    p.add_argument("source_caption")
    p.add_argument("target_caption")
    p.add_argument("--num-frames", type=int, default=5)
    _add_model_args(p)
    _add_cache_args(p)

    p = command("inpaint", help="resample the masked region, conditioned on a caption")
    p.add_argument("image")
    p.add_argument("mask", help="mask image: white (or nonzero) where the image is replaced")
    p.add_argument("prompt")
    _add_model_args(p)
    _add_cache_args(p)
    _add_prior_args(p)

    p = command("serve", help="web UI (gradio) over a pipeline directory",
                description="One page with a tab per pipeline method; requests run one at a time.")
    p.add_argument("--model", required=True, help="pipeline directory (from `dalle2-jax export` or the demo)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: this machine only; 0.0.0.0 serves the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true",
                   help="also open a public *.gradio.live link through gradio's servers")
    _add_cache_args(p)

    p = command("checkpoints", help="list a training workdir's checkpoints (step, size, time)")
    p.add_argument("workdir", help="training workdir or its checkpoints/ directory")
    p.add_argument("--verify", action="store_true",
                   help="read every step back completely (metadata, every array, the iterator state)")

    p = command("convert", help="import public weights into this project's pipeline format")
    p.add_argument("format", choices=("unclip",), help="unclip: a diffusers UnCLIP directory (Karlo)")
    p.add_argument("src", help="the directory to import (with model_index.json)")
    p.add_argument("--out", required=True, help="pipeline directory to write (atomically)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="parameter and compute dtype of the written pipeline (default float32)")

    sub.add_parser("bench", help="benchmarks; `dalle2-jax bench --help` for modes", add_help=False)
    sub.add_parser("launch", help="run a command as N local processes forming one JAX run: "
                                  "launch --processes N -- train ...", add_help=False)
    return parser


def _format_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}"


def run_checkpoints(workdir: str, verify: bool) -> int:
    """Print the checkpoints table; 1 when --verify found a damaged step, else 0."""
    from dalle2_jax import checkpoint

    infos = checkpoint.list_checkpoints(workdir, verify=verify)
    print(f"checkpoints in {checkpoint.checkpoint_dir(workdir).absolute()}")
    if not infos:
        print("  (none)")
    print(f"{'step':>8}  {'size':>10}  {'saved (UTC)':<19}  status")
    for info in infos:
        saved = info.saved.strftime("%Y-%m-%d %H:%M:%S") if info.saved else "?"
        if info.kind == "damaged":
            status = f"set aside as damaged: {info.name}"
        elif info.kind == "unfinished":
            status = f"unfinished save, ignored (removed at the next training run): {info.name}"
        elif info.problem is not None:
            status = f"DAMAGED: {info.problem.file}: {info.problem.reason}"
        else:
            status = "ok (read back completely)" if info.verified else "finalized (not read back)"
        print(f"{info.step:>8}  {_format_size(info.size_bytes):>10}  {saved:<19}  {status}")
    damaged = [info for info in infos if info.problem is not None]
    if damaged:
        print(f"{len(damaged)} damaged step(s): {[info.step for info in damaged]}; training resumes from the "
              "newest readable one and renames newer damaged ones aside", file=sys.stderr)
    return 1 if damaged else 0


class _NoTracebacks(logging.Filter):
    """Libraries (Orbax) log the exceptions they re-raise with their tracebacks; without
    --debug the error is reported once, as one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.exc_info, record.exc_text = None, None
        return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from dalle2_jax.bench import main as bench_main

        return bench_main(argv[1:]) or 0
    if argv and argv[0] == "launch":
        from dalle2_jax.launch import main as launch_main

        return launch_main(argv[1:])

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "plan"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.debug:
        return _run_command(parser, args, extra)
    quiet = _NoTracebacks()
    for name in ("absl", "orbax"):
        logging.getLogger(name).addFilter(quiet)
    try:
        return _run_command(parser, args, extra)
    except (ValueError, OSError) as error:  # FileNotFoundError and checkpoint errors included
        raise SystemExit(f"dalle2-jax {args.command}: error: {error}\n(--debug shows the traceback)") from None
    finally:
        for name in ("absl", "orbax"):
            logging.getLogger(name).removeFilter(quiet)


def _run_command(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> int:
    if hasattr(args, "no_cache"):  # the commands that sample: before anything compiles
        from dalle2_jax import compile_cache

        try:
            compile_cache.cache_from_args(args.cache_dir, args.no_cache)
        except ValueError as error:
            parser.error(str(error))
    if args.command == "checkpoints":
        return run_checkpoints(args.workdir, args.verify)
    if args.command in ("train", "plan"):
        bad = [a for a in extra if not a.startswith("--config.")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --config.KEY=VALUE)")
    if args.command == "plan":
        # The CPU backend for everything but the TPU compiler, also on a TPU VM (whose chips may be busy).
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from dalle2_jax.plan import run_plan

        return run_plan(args, extra)
    if args.command == "train":
        from dalle2_jax.training.entry import run_train

        run_train(args.stage, args.config, args.workdir, extra)
    elif args.command == "embed":
        from dalle2_jax.tasks.clip import run_embed

        run_embed(clip_dir=args.clip, data=args.data, out_dir=args.out, data_dir=args.data_dir,
                  split=args.split, batch_size=args.batch_size)
    elif args.command == "demo":
        from dalle2_jax.demo import run_demo

        run_demo(workdir=args.workdir, quick=args.quick, seed=args.seed, prior=args.prior)
    elif args.command == "export":
        from dalle2_jax.pipeline import export_pipeline

        export_pipeline(args.workdir, args.out, prior=args.prior)
    elif args.command == "serve":
        from dalle2_jax.serve import serve

        try:
            serve(args.model, host=args.host, port=args.port, share=args.share)
        except (ValueError, FileNotFoundError) as error:
            raise SystemExit(f"dalle2-jax serve: error: {error}") from None
    elif args.command == "convert":
        from dalle2_jax.convert.unclip import is_unclip_dir
        from dalle2_jax.pipeline import UnCLIPPipeline

        if not is_unclip_dir(args.src):
            parser.error(f"src: {args.src!r} is not a diffusers UnCLIP directory (no model_index.json)")
        UnCLIPPipeline.from_pretrained(args.src, dtype=args.dtype).save_pretrained(args.out)
        print(f"wrote {args.out}")
    else:
        from dalle2_jax.pipeline_cli import run_pipeline_command

        run_pipeline_command(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
