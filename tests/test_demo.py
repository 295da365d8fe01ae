"""`dalle2-jax demo --quick` end to end: every stage trains, the pipeline is exported and sampled."""
import json

import numpy as np
import pytest
from PIL import Image

from dalle2_jax import UnCLIPPipeline, cli
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
    for key in ("colour_acc", "shape_acc", "acc", "unseen_colour_acc", "unseen_shape_acc", "unseen_acc"):
        assert 0.0 <= generation[key] <= 1.0
    # The stages' evaluations ran and were read back from their metrics.jsonl.
    for key in ("test/colour_acc", "test/shape_acc", "test_unseen/acc"):
        assert 0.0 <= report["clip"][key] <= 1.0
    for key in ("test/prior_cos", "test/baseline_cos", "test_unseen/prior_cos"):
        assert -1.0 <= report["prior"][key] <= 1.0
    assert 0.0 <= report["inversion_mean_abs_error"] <= 2.0
    assert "report.md" in {p.name for p in workdir.iterdir()}

    pipe = UnCLIPPipeline.from_pretrained(workdir / "pipeline")
    size = pipe.image_size
    assert size == 64 and [stage.name for stage in pipe.stages] == ["clip", "prior", "decoder", "upsampler"]
    expected = {"captions.png": (18 * size, size), "variations.png": (2 * size, ROWS * size),
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
