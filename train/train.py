"""Train one stage.

    python train/train.py STAGE --config configs/FILE.py[:variant] --workdir DIR [--config.KEY=VALUE ...]
"""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stage", help="clip, prior, decoder or upsampler")
    parser.add_argument("--config", required=True, help="configs/FILE.py[:variant]")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and samples go here")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if not o.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)} (overrides look like --config.KEY=VALUE)")
    from dalle2_jax.training.entry import run_train

    run_train(args.stage, args.config, args.workdir, overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
