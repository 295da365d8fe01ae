"""`dalle2-jax demo --quick` end to end: every stage trains, the pipeline is exported and sampled."""
import json

import numpy as np
import pytest
from PIL import Image

from dalle2_jax import UnCLIPPipeline, cli, demo
from dalle2_jax.demo import ROWS


@pytest.mark.heavy
def test_quick_demo_runs_end_to_end(tmp_path):
    # The quick run's step counts are already the smallest that exercise every stage; `scale`
    # has nothing left to shrink here.
    workdir = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--workdir", str(workdir), "--seed", "0"]) == 0

    report = json.loads((workdir / "report.json").read_text())
    assert report["mode"] == "quick"
    stages = {"data", "clip", "embed", "prior", "decoder", "upsampler", "export", "samples"}
    assert set(report["seconds"]) == set(report["cpu_seconds"]) == stages
    generation = report["generation"]
    assert generation["num_images"] == 18 and generation["num_unseen_images"] == 2
    for section in ("generation", "generation_bicubic"):
        for key in ("colour_acc", "shape_acc", "acc", "unseen_colour_acc", "unseen_shape_acc", "unseen_acc",
                    "clean_frac"):
            assert 0.0 <= report[section][key] <= 1.0
        assert 0.0 <= report[section]["border_noise_median"] <= report[section]["border_noise_max"] <= 443.5
    assert "border noise" in (workdir / "report.md").read_text()
    # The stages' evaluations ran and were read back from their metrics.jsonl.
    for key in ("test/colour_acc", "test/shape_acc", "test_unseen/acc"):
        assert 0.0 <= report["clip"][key] <= 1.0
    for key in ("test/prior_cos", "test/baseline_cos", "test_unseen/prior_cos"):
        assert -1.0 <= report["prior"][key] <= 1.0
    assert 0.0 <= report["inversion_mean_abs_error"] <= 2.0
    # What carries signal in a run that learns nothing (demo.FLOORS): the decoder's exact DDIM round trip.
    assert report["floors_missed"] == [] and demo.check_floors(report) == []
    assert report["decoder_inversion_mean_abs_error"] <= 0.02  # measured 0.0 (seed 0)
    assert "report.md" in {p.name for p in workdir.iterdir()}

    pipe = UnCLIPPipeline.from_pretrained(workdir / "pipeline")
    size = pipe.image_size
    assert size == 64 and [stage.name for stage in pipe.stages] == ["clip", "prior", "decoder", "upsampler"]
    expected = {"captions.png": (18 * size, size), "captions_bicubic.png": (18 * size, size),
                "variations.png": (2 * size, ROWS * size),
                "interpolation.png": (size, ROWS * size), "text_diff.png": (size, ROWS * size),
                "inpainting.png": (size, (ROWS + 2) * size)}
    assert sorted(report["samples"]) == sorted(f"samples/{name}" for name in expected)
    for name, shape in expected.items():
        image = np.asarray(Image.open(workdir / "samples" / name))
        assert image.shape == (*shape, 3), name
    # The inpainting grid: input, mask, then samples that keep the unmasked left half.
    grid = np.asarray(Image.open(workdir / "samples" / "inpainting.png"))
    original = grid[:, :size]
    for k in range(ROWS):
        sample = grid[:, (k + 2) * size:(k + 3) * size]
        np.testing.assert_array_equal(sample[:, :size // 2], original[:, :size // 2])


FULL_RUN = {  # the full run's measurements (README, seed 0), the decoder's own round trip not yet measured
    "mode": "full", "clip": {"test/acc": 0.984}, "prior": {"test/prior_cos": 0.972, "test/baseline_cos": 0.655},
    "generation": {"colour_acc": 0.986, "shape_acc": 0.833}, "inversion_mean_abs_error": 0.107,
    "decoder_inversion_mean_abs_error": 0.107}
QUICK_RUN = {  # what `demo --quick --seed 0` measured: every stage at chance, images pure noise
    "mode": "quick", "clip": {"test/acc": 0.05}, "prior": {"test/prior_cos": 0.030, "test/baseline_cos": 0.239},
    "generation": {"colour_acc": 0.167, "shape_acc": 0.389}, "inversion_mean_abs_error": 0.879,
    "decoder_inversion_mean_abs_error": 0.0}


def test_floors_pass_the_measured_runs_and_fail_chance():
    assert demo.check_floors(FULL_RUN) == [] and demo.check_floors(QUICK_RUN) == []
    at_chance = dict(QUICK_RUN, mode="full")  # a full run that learned nothing
    missed = demo.check_floors(at_chance)
    assert [line.split(" ")[0] for line in missed] == [
        "clip.test/acc", "prior.test/prior_cos", "generation.colour_acc", "generation.shape_acc",
        "inversion_mean_abs_error"], missed
    assert "-0.2" in missed[1] and ">= 0.1" in missed[1]  # the prior's margin over its baseline
    # A round trip that decodes from the wrong x_T: noise-level error (0.88 through the untrained upsampler).
    assert demo.check_floors(dict(QUICK_RUN, decoder_inversion_mean_abs_error=0.5)) == [
        "decoder_inversion_mean_abs_error = 0.5, expected <= 0.02"]
    assert demo.check_floors({"mode": "quick"}) == ["decoder_inversion_mean_abs_error: not measured"]


def test_judge_and_report_give_the_border_noise_and_judge_grainy_images_wrong(tmp_path):
    from dalle2_jax.data import shapes
    from dalle2_jax.demo import CLEAN_BORDER_NOISE, _write_report, judge

    rng = np.random.default_rng(0)
    clean = [shapes.render_shape(c, k, diameter=28.0, center=(32.0, 32.0), background="white")
             for c, k in (("red", "circle"), ("blue", "square"), ("purple", "triangle"), ("green", "square"))]
    grainy = np.clip(clean[3] + rng.normal(0, 10, clean[3].shape), 0, 255).round().astype(np.uint8)
    images = np.stack(clean[:3] + [grainy])
    result = judge(images, ["red", "blue", "purple", "green"], ["circle", "square", "triangle", "square"])
    # The grainy square (border noise ~15 units) is neither clean nor judged right.
    assert result["clean_frac"] == 0.75 and result["border_noise_median"] == 0.0
    assert result["border_noise_max"] > 2 * CLEAN_BORDER_NOISE
    assert result["colour_acc"] == result["shape_acc"] == result["acc"] == 0.75
    assert result["num_unseen_images"] == 1 and result["unseen_acc"] == 1.0

    report = {"mode": "full", "seed": 0, "seconds": {"data": 1.0}, "cpu_seconds": {"data": 1.0}, "samples": [],
              "generation": result, "generation_bicubic": dict(result, shape_acc=0.5)}
    _write_report(tmp_path, report)
    text = (tmp_path / "report.md").read_text()
    assert "## generation_bicubic" in text and "| clean_frac | 0.75 |" in text
    assert "at most 6 on 75.0% of the images" in text and "(bicubic: 50.0%)" in text
