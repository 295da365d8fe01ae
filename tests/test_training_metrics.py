"""metrics.jsonl / TensorBoard writing, resume truncation, and PNG image grids."""
import json

import numpy as np
import pytest
from PIL import Image

from dalle2_jax.training import metrics


def test_writer_records_and_resume_truncation(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, total_steps=10, progress_bar=False)
    for step in (1, 2, 3):
        writer.write(step, {"loss": np.float32(1.0 / step), "skipped_steps": np.int32(0), "note": "ok"})
    writer.write(4, {"loss": float("nan"), "skipped_steps": 1})
    writer.close()
    records = metrics.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1] == {"step": 2, "loss": 0.5, "skipped_steps": 0, "note": "ok"}
    assert records[3]["loss"] is None  # strict JSON: non-finite values become null
    for line in (tmp_path / metrics.METRICS_FILE).read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    event_files = list((tmp_path / metrics.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert event_files and event_files[0].stat().st_size > 0

    resumed = metrics.MetricsWriter(tmp_path, total_steps=10, start_step=2, progress_bar=False)
    resumed.write(3, {"loss": 0.25})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in metrics.read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(FileNotFoundError, match="workdir"):
        metrics.read_metrics(tmp_path / "nowhere")


def test_image_grid_layout_and_png(tmp_path):
    images = np.stack([np.full((2, 3, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = metrics.image_grid(images, ncols=3)
    assert grid.shape == (4, 9, 3)
    assert grid[0, 0, 0] == 10 and grid[0, 3, 0] == 20 and grid[0, 6, 0] == 30
    assert grid[2, 0, 0] == 40 and grid[2, 3, 0] == 50 and np.all(grid[2:, 6:] == 0)  # empty cell is black
    path = metrics.write_image_grid(tmp_path / "samples" / "grid.png", images, ncols=3)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]  # no temporary file left
    gray = metrics.write_image_grid(tmp_path / "gray.png", images[:2, :, :, 0], ncols=1)
    np.testing.assert_array_equal(np.asarray(Image.open(gray)), np.concatenate(list(images[:2, :, :, 0])))


@pytest.mark.parametrize("images, ncols, message", [
    (np.zeros((2, 4, 4, 3), np.float32), 2, "images_uint8: expected dtype uint8"),
    (np.zeros((4, 4, 3, 2), np.uint8), 2, "images_uint8: expected shape"),
    (np.zeros((0, 4, 4, 3), np.uint8), 2, "images_uint8: expected shape"),
    (np.zeros((2, 4, 4, 3), np.uint8), 0, "ncols"),
])
def test_image_grid_rejects_bad_input(tmp_path, images, ncols, message):
    with pytest.raises(ValueError, match=message):
        metrics.write_image_grid(tmp_path / "bad.png", images, ncols)
    assert not list(tmp_path.iterdir())
