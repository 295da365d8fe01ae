"""The `dalle2-jax` command: argument parsing only; the work lives in the library."""
from __future__ import annotations

import argparse
import sys

STAGES = ("clip", "prior", "ar_prior", "decoder", "upsampler")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="pipeline directory (from `dalle2-jax export` or the demo)")
    parser.add_argument("--out", required=True, help="output PNG; the single images are written beside it")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
    parser.add_argument("--decoder-steps", type=int, default=None, help="decoder sampling steps (default: the model's config)")
    parser.add_argument("--upsampler-steps", type=int, default=None, help="sampling steps of each upsampler")
    parser.add_argument("--decoder-guidance", type=float, default=None, help="decoder classifier-free guidance scale")


def _add_prior_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prior-steps", type=int, default=None, help="prior sampling steps (paper: 64)")
    parser.add_argument("--prior-guidance", type=float, default=None, help="prior classifier-free guidance scale")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dalle2-jax",
        description="DALL-E 2 (unCLIP) in JAX: train the stages, export a pipeline, generate images.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="offline end-to-end demo: data, every stage, samples and a report")
    p.add_argument("--workdir", default="runs/demo", help="where data, checkpoints, the pipeline and outputs go")
    p.add_argument("--quick", action="store_true", help="a few-minute run with tiny step counts (what CI runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prior", choices=("diffusion", "ar"), default="diffusion",
                   help="the pipeline's prior: the diffusion prior or the autoregressive one (paper, 2.2)")

    p = sub.add_parser("train", help="train one stage through the shared loop",
                       description="Extra `--config.KEY=VALUE` arguments override config fields, "
                                   "e.g. --config.total_steps=12 --config.optimizer.learning_rate=3e-4")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--config", required=True, help="configs/FILE.py[:variant]")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard logs and samples")

    p = sub.add_parser("embed", help="write a CLIP embedding dataset for prior/decoder training")
    p.add_argument("--clip", required=True, help="CLIP training workdir or exported CLIP directory")
    p.add_argument("--data", required=True,
                   help="dataset: 'shapes' (the built-in set), an image folder, or a webdataset shard directory")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--data-dir", default=None, help="tfds data_dir for built datasets (default: <out>/../data)")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=256)

    p = sub.add_parser("export", help="turn training workdirs into one pipeline directory")
    p.add_argument("--workdir", required=True, help="directory holding clip/, prior/, decoder/, upsampler*/ workdirs")
    p.add_argument("--out", required=True, help="pipeline directory to write")
    p.add_argument("--prior", choices=("diffusion", "ar"), default="diffusion",
                   help="which prior workdir becomes the pipeline's prior: prior/ or ar_prior/")

    p = sub.add_parser("generate", help="text -> image")
    p.add_argument("prompt", nargs="+", help="one or more captions")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    _add_model_args(p)
    _add_prior_args(p)

    p = sub.add_parser("variations", help="variations of an image (CLIP image embedding -> decoder)")
    p.add_argument("image")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--invert", action="store_true", help="start from the image's own DDIM-inverted x_T")
    _add_model_args(p)

    p = sub.add_parser("interpolate", help="slerp between two images' CLIP embeddings")
    p.add_argument("image_a")
    p.add_argument("image_b")
    p.add_argument("--num-frames", type=int, default=5)
    _add_model_args(p)

    p = sub.add_parser("text-diff", help="move an image along the text diff of two captions")
    p.add_argument("image")
    p.add_argument("source_caption")
    p.add_argument("target_caption")
    p.add_argument("--num-frames", type=int, default=5)
    _add_model_args(p)

    p = sub.add_parser("inpaint", help="resample the masked region, conditioned on a caption")
    p.add_argument("image")
    p.add_argument("mask", help="mask image: white (or nonzero) where the image is replaced")
    p.add_argument("prompt")
    _add_model_args(p)
    _add_prior_args(p)

    sub.add_parser("bench", help="benchmarks; `dalle2-jax bench --help` for modes", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from dalle2_jax.bench import main as bench_main

        return bench_main(argv[1:]) or 0

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command == "train":
        bad = [a for a in extra if not a.startswith("--config.")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --config.KEY=VALUE)")
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
    else:
        from dalle2_jax.pipeline_cli import run_pipeline_command

        run_pipeline_command(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
