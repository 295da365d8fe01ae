"""`dalle2-jax demo`: the whole of unCLIP, offline, on the synthetic shapes set.

  run_demo(workdir="runs/demo")              # about 20 minutes on 2 CPU cores
  run_demo(workdir="runs/demo", quick=True)  # a few minutes: every step runs, nothing is learned

Builds the shapes data, trains CLIP, writes its embedding datasets, trains the prior, the
decoder and the upsampler (the `tiny` configs through `training.entry.run_train`, with the
overrides below), exports the pipeline to <workdir>/pipeline and writes into
<workdir>/samples: a grid for every "a {colour} {shape}" caption (one row per caption),
variations of a test image (fresh noise, then from its inverted x_T), an interpolation strip,
a text-diff strip ("a red circle" -> "a blue circle" on a red circle) and an inpainting
example. <workdir>/report.json and report.md hold what was measured: CLIP's zero-shot accuracy
and the prior's cosine similarity against the text-embedding baseline (the stages' last eval
records in metrics.jsonl), the generated images' colour and shape accuracy judged by
`data.shapes.classify_shape_image` (overall and on the unseen pairs purple triangle and orange
circle; grainy images are judged wrong) with their border noise, the same for the decoder's
images resized bicubic instead of upsampled (`generation_bicubic`), the inversion round trip's error, and the time of every stage. A stage whose workdir
already holds its final checkpoint is not trained again.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.console import Console
from rich.table import Table

STAGES = ("data", "clip", "embed", "prior", "decoder", "upsampler", "export", "samples")
CAPTION = "a {colour} {shape}"
DATA_SIZES = {"full": dict(num_train=20_000, num_test=1_000, num_test_unseen=500),
              "quick": dict(num_train=512, num_test=160, num_test_unseen=40)}
IMAGE_SIZE = 64  # of the shapes images; CLIP and the upsampler see 64px, the decoder 32px
ROWS = 6  # images per sampling call (frames, variations, inpaintings; captions per generate call)
CLEAN_BORDER_NOISE = 6.0  # `shapes.border_noise` at or below which a generated image's background is clean
PRIOR_TEXT_LEN = 16  # token positions the prior trains on: the longest shapes caption has 14 of CLIP's 32

# Per stage: (steps, batch size) of the full and the quick run; the rest is the tiny config's.
# The full run spends its 20 minutes where they buy the most. CLIP: 900 steps judge 98.4% of the
# `test` shapes and 79.6% of the unseen pairs' shapes right zero-shot (600: 95.1%, 49.2%; 1200:
# 99.6%, 73.4%, but its prior's samples for "a purple triangle" decode to empty images). The
# decoder judges shapes right only after thousands of updates (its 108 eval samples at batch 16:
# 32% after 900 steps, 45% after 1800, 54% after 2700, 59% after 3600 with DDIM eta 0; 68-70% with eta 1). In the same
# time batch 8 makes 1.6x the updates and learns faster (5400 x 8: 69% where 3300 x 16 judged
# 57-61%; 3150 x 8: 46% where 1800 x 16 judged 41%; batch 4, 7200 steps: 58%). With the
# decoder's cheaper resampling (configs/decoder.py) 6000 x 8 takes the time that 5000 x 8 took
# with residual blocks, and its generated shapes were judged right 78.3% of the time where those
# gave 68.2% (eight seeds). The prior (600-step CLIP, unguided) reaches the same test cosine at 400
# steps as at 600 and 800 (0.980; unseen pairs 0.961-0.964). The upsampler predicts x0 as the
# bicubic-upsampled low-res image plus a residual (configs/upsampler.py): with the v objective its
# 140 steps left the noise of x_t in the images (border noise 36-42, test PSNR 24 dB against 34 for
# bicubic). The residual one gives 34.8 dB after 140 steps and 37.4 after 280 (8 sampling steps;
# 37.4 at 50), border noise 1; docs/measurements.md, "Upsampler grain (issue 31)".
TRAINING = {
    "full": {"clip": (900, 64), "prior": (400, 64), "ar_prior": (400, 64), "decoder": (6000, 8),
             "upsampler": (280, 16)},
    "quick": {"clip": (6, 16), "prior": (6, 16), "ar_prior": (6, 16), "decoder": (4, 8), "upsampler": (4, 8)},
}
# Training and sampling settings of the full run on top of the tiny configs: short runs take a
# larger learning rate; the prior samples at guidance 2 (its config: 4). With the 600-step CLIP
# 4 was best (unguided, samples closer to the true embeddings on average, test cosine 0.976
# against 0.948, but decoded into shapeless blobs more often: shape judged right 52% unguided,
# 59% at 3, 62% at 4, four seeds). CLIP trained longer tells shapes apart (image-image cosine of
# a purple circle and square: 0.99 after 600 steps, 0.96 after 1200) and guidance 4 overshoots:
# with the 900-step CLIP colour was judged right 82% and shape 69% at 4 (seeds 100-300), 97% and
# 83% at 2 (eight seeds, 0-700); at 1 (seed 100) the unseen pairs fell to 38% both right. The
# decoder samples with its config's 12 steps of DDIM eta 1, the upsampler with 4 (DDIM eta 0).
FULL_SETTINGS = {
    "clip": {},
    "prior": {"optimizer.learning_rate": 2e-4, "diffusion.guidance_scale": 2.0},
    "ar_prior": {"optimizer.learning_rate": 1e-3},  # `--prior ar`: docs/measurements.md (issue 34)
    "decoder": {"optimizer.learning_rate": 1e-3},
    "upsampler": {"optimizer.learning_rate": 1e-3, "diffusion.sampling_steps": 4, "eval.sampling_steps": 4},
}
# Sampling steps of the quick run's samples (the full run's come from its stage configs).
QUICK_SAMPLING = dict(prior_steps=4, decoder_steps=4, upsampler_steps=3)
# What the report must show, per mode (`check_floors`): (section, key, "min" or "max", bound), a
# difference when the key is a pair (value of the first minus the second). The full run's bounds
# sit well inside its measured values (README: CLIP zero-shot test acc 98.4%, chance 1/18; prior
# cosine 0.972 against the text-embedding baseline's 0.655; colour judged right 98.6%, chance 1/6;
# shape 83.3%, chance 1/3; inversion round trip through the upsampler 0.107, 2.0 the largest
# possible, ~0.9 for noise) and far outside chance. The quick run learns nothing (seed 0: CLIP test
# acc 0.05, prior cosine 0.03 against the baseline's 0.24, colour 0.17, images pure noise, round
# trip through the untrained upsampler 0.88), so those numbers carry no signal there; the decoder's
# own DDIM round trip does (inversion is exact whatever the network: measured 0.0 in uint8).
FLOORS = {
    "full": (("clip", "test/acc", "min", 0.5),
             ("prior", ("test/prior_cos", "test/baseline_cos"), "min", 0.1),
             ("generation", "colour_acc", "min", 0.6),
             ("generation", "shape_acc", "min", 0.5),
             (None, "inversion_mean_abs_error", "max", 0.3),
             (None, "decoder_inversion_mean_abs_error", "max", 0.3)),
    "quick": ((None, "decoder_inversion_mean_abs_error", "max", 0.02),),
}
QUICK_MODELS = {  # smaller networks in the quick run: less to compile
    "clip": dict(text_depth=1, vision_depth=1),
    "prior": dict(depth=1, width=64),
    "ar_prior": dict(depth=1, width=64),
    "decoder": dict(model_channels=16, channel_mult=(1,), attention_resolutions=(), num_res_blocks=1, head_dim=16),
    "upsampler": dict(model_channels=16, channel_mult=(1,)),
}


def _overrides(values: dict[str, Any]) -> list[str]:
    def text(value):
        return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")" \
            if isinstance(value, tuple) else str(value)

    return [f"--config.{key}={text(value)}" for key, value in values.items()]


def stage_overrides(stage: str, mode: str, seed: int, extra: dict[str, Any] | None = None) -> list[str]:
    """The `--config.KEY=VALUE` overrides of a stage's tiny config in the demo (then `extra`)."""
    steps, batch = TRAINING[mode][stage]
    values: dict[str, Any] = {"seed": seed, "total_steps": steps, "batch_size": batch,
                              "log_every": max(1, min(50, steps)), "eval_every": steps, "checkpoint_every": 0,
                              "keep_checkpoints": 1, "optimizer.warmup_steps": min(100, max(1, steps // 10))}
    if stage in PRIOR_WORKDIRS.values():
        values["data.text_len"] = PRIOR_TEXT_LEN
    else:
        values.update({f"data.{key}": value for key, value in DATA_SIZES[mode].items()})
    if mode == "quick":
        values.update({f"model.{key}": value for key, value in QUICK_MODELS[stage].items()})
        # The report needs CLIP's and the prior's evaluations; the decoder's and upsampler's
        # sample grids would only add compilations.
        values.update({"clip": {"eval.num_examples": 40, "eval.batch_size": 40},
                       "prior": {"eval.num_examples": 16, "eval.batch_size": 16, "diffusion.sampling_steps": 4},
                       "ar_prior": {"eval.num_examples": 16, "eval.batch_size": 16},
                       "decoder": {"eval_every": 0},
                       "upsampler": {"eval_every": 0}}[stage])
    else:
        values.update(FULL_SETTINGS[stage])
    values.update(extra or {})
    return _overrides(values)


PRIOR_WORKDIRS = {"diffusion": "prior", "ar": "ar_prior"}  # run_demo(prior=...) -> the workdir trained


def _prior_sizes(clip_workdir: Path) -> dict[str, int]:
    """The prior's input sizes from the trained CLIP's config.json (its embeddings are the prior's data)."""
    model = json.loads((clip_workdir / "config.json").read_text())["model"]
    return {"model.embed_dim": int(model["embed_dim"]), "model.text_encoding_dim": int(model["text_width"]),
            "model.max_text_len": int(model["context_length"])}


def _last_eval(workdir: Path) -> dict[str, float]:
    """The last record of workdir/metrics.jsonl with eval/ entries, without the prefix."""
    from dalle2_jax.training.metrics import read_metrics

    for record in reversed(read_metrics(workdir)):
        found = {key[len("eval/"):]: value for key, value in record.items() if key.startswith("eval/")}
        if found:
            return found
    return {}


def _finished(workdir: Path, steps: int) -> bool:
    from dalle2_jax import checkpoint

    directory = checkpoint.checkpoint_dir(workdir)
    return directory.is_dir() and any(p.name == str(steps) for p in directory.iterdir())


def judge(images: np.ndarray, colours: list[str], shape_names: list[str]) -> dict[str, float]:
    """The pixel judge's colour / shape / both accuracies, overall and on the unseen pairs (a grainy
    image is judged wrong in both), and the border noise of the images (`shapes.border_noise`,
    0 on the data): its median, its maximum and the fraction of images at most CLEAN_BORDER_NOISE."""
    from dalle2_jax.data import shapes

    seen = [shapes.classify_shape_image(image) for image in images]
    colour_hit = np.array([s[0] == c for s, c in zip(seen, colours)])
    shape_hit = np.array([s[1] == k for s, k in zip(seen, shape_names)])
    unseen = np.array([(c, k) in shapes.HELD_OUT_PAIRS for c, k in zip(colours, shape_names)])
    border = np.array([shapes.border_noise(image) for image in images])
    result = {"num_images": int(len(images)), "num_unseen_images": int(unseen.sum()),
              "border_noise_median": float(np.median(border)), "border_noise_max": float(border.max()),
              "clean_frac": float(np.mean(border <= CLEAN_BORDER_NOISE))}
    for prefix, rows in (("", np.ones_like(unseen)), ("unseen_", unseen)):
        result.update({f"{prefix}colour_acc": float(colour_hit[rows].mean()),
                       f"{prefix}shape_acc": float(shape_hit[rows].mean()),
                       f"{prefix}acc": float((colour_hit & shape_hit)[rows].mean())})
    return result


def generate_judged(pipe, captions: list[str], seed: int, per_caption: int, **sampling) -> dict[str, np.ndarray]:
    """`pipe.generate` of `captions` in chunks of ROWS captions (seed + the chunk's start), split at
    the decoder: {"final": the upsampled images (as `generate` returns them, from the decoder's
    uint8 images), "decoder": the decoder's images, "bicubic": those resized bicubic to the final
    size}, so the learned upsampler is judged against bicubic on the same samples."""
    import jax

    from dalle2_jax.pipeline import UnCLIPPipeline, to_float, to_uint8

    decoder_only = UnCLIPPipeline(pipe.stages[:3], pipe.tokenizer)  # same seeds: the same decoder samples
    decoder_options = {k: v for k, v in sampling.items() if k != "upsampler_steps"}
    upsampler_options = {k: v for k, v in sampling.items() if k == "upsampler_steps"}
    chunks = {"final": [], "decoder": []}
    for start in range(0, len(captions), ROWS):
        low = decoder_only.generate(captions[start:start + ROWS], seed=seed + start,
                                    num_images_per_prompt=per_caption, **decoder_options)
        chunks["decoder"].append(low)
        chunks["final"].append(pipe.upsample(low, seed=seed + start, **upsampler_options) if pipe.upsamplers
                               else low)
    images = {name: np.concatenate(parts) for name, parts in chunks.items()}
    size = pipe.image_size
    low = to_float(images["decoder"])
    images["bicubic"] = to_uint8(np.clip(np.asarray(jax.image.resize(low, (len(low), size, size, 3), "bicubic")),
                                         -1, 1))
    return images


def _test_image(colour: str, shape: str, center=(32.0, 32.0), background: str = "white") -> np.ndarray:
    from dalle2_jax.data import shapes

    return shapes.render_shape(colour, shape, diameter=28.0, center=center, background=background,
                               image_size=IMAGE_SIZE)


def _samples(pipe, out: Path, seed: int, quick: bool) -> dict[str, Any]:
    """Every sample grid; returns the generation and inversion measurements.

    Every call decodes ROWS images (captions go in chunks of ROWS), so that the stages'
    compiled programs are shared between the calls.
    """
    from dalle2_jax.data import shapes
    from dalle2_jax.pipeline import square_image, to_float
    from dalle2_jax.training.metrics import write_image_grid

    sampling = QUICK_SAMPLING if quick else {}
    frame_options = {k: v for k, v in sampling.items() if k != "prior_steps"}
    per_caption = 1 if quick else 4
    pairs = [(colour, shape) for colour in shapes.COLOUR_NAMES for shape in shapes.SHAPES]
    captions = [CAPTION.format(colour=c, shape=s) for c, s in pairs]
    generated = generate_judged(pipe, captions, seed, per_caption, **sampling)
    write_image_grid(out / "captions.png", generated["final"], ncols=per_caption)
    write_image_grid(out / "captions_bicubic.png", generated["bicubic"], ncols=per_caption)
    colours = [c for c, _ in pairs for _ in range(per_caption)]
    shape_names = [s for _, s in pairs for _ in range(per_caption)]
    measured = {"generation": judge(generated["final"], colours, shape_names),
                "generation_bicubic": judge(generated["bicubic"], colours, shape_names)}

    red_circle = _test_image("red", "circle")
    fresh = pipe.variations(red_circle, num_images=ROWS, seed=seed, **frame_options)
    inverted = pipe.variations(red_circle, num_images=ROWS, seed=seed, invert=True, **frame_options)
    write_image_grid(out / "variations.png", np.concatenate([fresh, inverted]), ncols=ROWS)
    blue_square = _test_image("blue", "square")
    strip = pipe.interpolate(red_circle, blue_square, num_frames=ROWS, seed=seed, **frame_options)
    write_image_grid(out / "interpolation.png", strip, ncols=ROWS)
    diff = pipe.text_diff(red_circle, "a red circle", "a blue circle", num_frames=ROWS, seed=seed, **frame_options)
    write_image_grid(out / "text_diff.png", diff, ncols=ROWS)
    measured["text_diff_last_frame"] = dict(zip(("colour", "shape"), shapes.classify_shape_image(diff[-1])))
    if pipe.image_size == IMAGE_SIZE:
        # Frame 0 decodes the image's own embedding from its inverted x_T with DDIM eta 0: the round trip.
        measured["inversion_mean_abs_error"] = float(np.mean(np.abs(to_float(diff[0]) - to_float(red_circle))))
    # The decoder's own round trip, before any upsampler: exact inversion does not need a trained
    # decoder, so unlike the error above (through the upsampler) it carries signal in the quick run too.
    decoder_only = type(pipe)([pipe.clip, pipe.prior, pipe.decoder], pipe.tokenizer)
    size = decoder_only.image_size
    rebuilt = decoder_only.variations(red_circle, num_images=ROWS, seed=seed, invert=True, eta=0.0,
                                      **{k: v for k, v in frame_options.items() if k != "upsampler_steps"})
    measured["decoder_inversion_mean_abs_error"] = float(
        np.mean(np.abs(to_float(rebuilt[0]) - to_float(square_image(red_circle, size)))))

    left_circle = _test_image("red", "circle", center=(18.0, 32.0))
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    mask[:, IMAGE_SIZE // 2:] = True
    inpainted = pipe.inpaint(left_circle, mask, "a blue square", seed=seed, num_images=ROWS, **sampling)
    mask_image = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=-1)
    write_image_grid(out / "inpainting.png", np.concatenate([left_circle[None], mask_image[None], inpainted]),
                     ncols=ROWS + 2)
    return measured


def check_floors(report: dict[str, Any]) -> list[str]:
    """The FLOORS of the report's mode that it misses (a missing value misses), as sentences."""
    missed = []
    for section, key, kind, bound in FLOORS[report["mode"]]:
        values = (report.get(section) or {}) if section else report
        keys = key if isinstance(key, tuple) else (key,)
        name = " - ".join(f"{section}.{k}" if section else k for k in keys)
        if any(not isinstance(values.get(k), (int, float)) for k in keys):
            missed.append(f"{name}: not measured")
            continue
        value = values[keys[0]] - (values[keys[1]] if len(keys) == 2 else 0.0)
        if not (value >= bound if kind == "min" else value <= bound):
            missed.append(f"{name} = {value:.4g}, expected {'>=' if kind == 'min' else '<='} {bound}")
    return missed


def _write_report(workdir: Path, report: dict[str, Any]) -> None:
    from dalle2_jax.training.metrics import atomic_write

    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    atomic_write(workdir / "report.json", lambda f: f.write(text.encode()))
    lines = [f"# dalle2-jax demo ({report['mode']}, seed {report['seed']})", ""]
    for section in ("clip", "prior", "decoder", "upsampler", "generation", "generation_bicubic"):
        values = report.get(section) or {}
        if values:
            lines += [f"## {section}", "", "| metric | value |", "|---|---|"]
            lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
                      for key, value in sorted(values.items())]
            lines.append("")
    if report.get("generation"):
        final, bicubic = report["generation"], report.get("generation_bicubic") or {}
        lines += [f"Generated images (`generation`; `generation_bicubic`: the same decoder samples resized "
                  f"bicubic instead of upsampled): border noise (median RGB distance of a border pixel to the "
                  f"border's median colour, 0-255; the data: 0) at most {CLEAN_BORDER_NOISE:g} on "
                  f"{100 * final['clean_frac']:.1f}% of the images (median {final['border_noise_median']:.1f}, "
                  f"max {final['border_noise_max']:.1f}); shape judged right {100 * final['shape_acc']:.1f}% "
                  f"(bicubic: {100 * bicubic.get('shape_acc', float('nan')):.1f}%).", ""]
    if "inversion_mean_abs_error" in report:
        lines += [f"Inversion round trip (DDIM eta 0), mean abs error in [-1, 1] units: "
                  f"{report['inversion_mean_abs_error']:.4f}", ""]
    if "decoder_inversion_mean_abs_error" in report:
        lines += ["Decoder alone (no upsampler), the same round trip: "
                  f"{report['decoder_inversion_mean_abs_error']:.4f}", ""]
    if "text_diff_last_frame" in report:
        frame = report["text_diff_last_frame"]
        lines += [f"Text diff, last frame judged as: {frame.get('colour')} {frame.get('shape')}", ""]
    missed = report.get("floors_missed", [])
    lines += [f"Floors ({report['mode']} run): " + ("all met" if not missed else "MISSED: " + "; ".join(missed)), ""]
    lines += ["## time per stage", "", "| stage | seconds | CPU seconds |", "|---|---|---|"]
    lines += [f"| {stage} | {seconds:.1f} | {report['cpu_seconds'][stage]:.1f} |"
              for stage, seconds in report["seconds"].items()]
    lines += ["", "Samples: " + ", ".join(sorted(report["samples"])), ""]
    atomic_write(workdir / "report.md", lambda f: f.write("\n".join(lines).encode()))


def run_demo(workdir: str | os.PathLike = "runs/demo", quick: bool = False, seed: int = 0,
             prior: str = "diffusion") -> dict[str, Any]:
    """Run the demo in `workdir` (see the module docstring); returns the report. prior="ar" trains
    the autoregressive prior (configs/ar_prior.py, in <workdir>/ar_prior) for the pipeline instead."""
    if prior not in PRIOR_WORKDIRS:
        raise ValueError(f"prior: expected one of {sorted(PRIOR_WORKDIRS)}, got {prior!r}")
    if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
        raise ValueError(f"workdir: expected a directory path, got {workdir!r}")
    if not isinstance(quick, bool):
        raise ValueError(f"quick: expected a bool, got {quick!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    from dalle2_jax.data import shapes
    from dalle2_jax.pipeline import UnCLIPPipeline, export_pipeline
    from dalle2_jax.tasks.clip import run_embed
    from dalle2_jax.training.entry import run_train

    mode = "quick" if quick else "full"
    root = Path(workdir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    prior_workdir = PRIOR_WORKDIRS[prior]
    report: dict[str, Any] = {"mode": mode, "seed": int(seed), "prior_kind": prior, "workdir": str(root),
                              "seconds": seconds,
                              "cpu_seconds": cpu_seconds}

    def stage(name: str, work: Callable[[], Any]) -> Any:
        console.rule(f"[bold]{STAGES.index(name) + 1}/{len(STAGES)} {name}")
        started, cpu_started = time.perf_counter(), time.process_time()
        result = work()
        seconds[name] = round(time.perf_counter() - started, 2)
        cpu_seconds[name] = round(time.process_time() - cpu_started, 2)
        console.log(f"{name} done in {seconds[name]:.1f}s ({cpu_seconds[name]:.1f} CPU seconds)")
        return result

    def train(name: str) -> None:
        steps = TRAINING[mode][name][0]
        if _finished(root / name, steps):
            console.log(f"{root / name} already holds step {steps}: not training again")
            return
        extra = _prior_sizes(root / "clip") if name == prior_workdir else None
        if name == "decoder":  # the embed stage's rows: CLIP stays off the decoder's training steps
            extra = {"embeddings_dir": str(root / "embeddings" / "train")}
        state = run_train(name, f"configs/{name}.py:tiny", str(root / name),
                          stage_overrides(name, mode, int(seed), extra))
        if int(state.step) < steps:  # stopped by SIGTERM after saving: the later stages need this one whole
            raise SystemExit(f"demo: {name} training stopped at step {int(state.step)} of {steps}; "
                             f"run the demo again with --workdir {root} to resume it")

    stage("data", lambda: shapes.build_shapes(str(root / "data"), image_size=IMAGE_SIZE, seed=0,
                                              **DATA_SIZES[mode]))
    stage("clip", lambda: train("clip"))
    stage("embed", lambda: [run_embed(clip_dir=str(root / "clip"), data="shapes", data_dir=str(root / "data"),
                                      out_dir=str(root / "embeddings" / split), split=split, overwrite=True)
                            for split in shapes.SPLITS])
    stage("prior", lambda: train(prior_workdir))
    for name in ("decoder", "upsampler"):
        stage(name, lambda name=name: train(name))
    stage("export", lambda: export_pipeline(root, root / "pipeline", prior=prior))
    pipe = UnCLIPPipeline.from_pretrained(root / "pipeline")
    samples_dir = root / "samples"
    report.update(stage("samples", lambda: _samples(pipe, samples_dir, int(seed), quick)))
    report["samples"] = sorted(str(p.relative_to(root)) for p in samples_dir.glob("*.png"))
    for name in ("clip", "prior", "decoder", "upsampler"):
        report[name] = _last_eval(root / (prior_workdir if name == "prior" else name))
    report["floors_missed"] = check_floors(report)
    _write_report(root, report)
    _print_summary(console, report)
    return report


def _print_summary(console: Console, report: dict[str, Any]) -> None:
    table = Table(title=f"dalle2-jax demo ({report['mode']})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    picks = [("CLIP zero-shot acc (test)", report["clip"].get("test/acc")),
             ("CLIP zero-shot acc (unseen pairs)", report["clip"].get("test_unseen/acc")),
             ("prior cosine (test)", report["prior"].get("test/prior_cos")),
             ("text-embedding baseline cosine (test)", report["prior"].get("test/baseline_cos")),
             ("generated: colour acc", report["generation"]["colour_acc"]),
             ("generated: shape acc", report["generation"]["shape_acc"]),
             ("generated, unseen pairs: acc", report["generation"]["unseen_acc"]),
             (f"generated: border noise <= {CLEAN_BORDER_NOISE:g} (fraction)", report["generation"]["clean_frac"]),
             ("decoder images resized bicubic: shape acc", report["generation_bicubic"]["shape_acc"])]
    for name, value in picks:
        table.add_row(name, "-" if value is None else f"{value:.3f}")
    table.add_row("total time (s)", f"{sum(report['seconds'].values()):.0f}")
    console.print(table)
    for missed in report["floors_missed"]:
        console.log(f"[bold red]below the {report['mode']} run's floor:[/] {missed}")
    console.log(f"report: {report['workdir']}/report.md")
