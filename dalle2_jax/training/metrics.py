"""Training logs (process 0 only): workdir/metrics.jsonl, TensorBoard events in
workdir/tensorboard, a progress bar; and PNG image grids other stages write."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(binary_file)` on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_value(value):
    value = np.asarray(value).item() if not isinstance(value, (str, bool, int, float)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf; a non-finite step is also visible via skipped_steps
    return value


def _summary_writer():
    """tensorboardX.SummaryWriter, imported without pulling in torch.

    tensorboardX imports torch when it is installed (only to accept torch
    tensors, which this project never passes); that costs seconds per process.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX tolerates
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """All records of workdir/metrics.jsonl, in order."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"workdir: no {METRICS_FILE} in {workdir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Writes metric records on process 0; a no-op elsewhere.

    On resume (`start_step` > 0) records newer than `start_step` left by the
    interrupted run are dropped first, so the file reads as one clean run.
    """

    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, start_step: int = 0,
                 progress_bar: bool = True):
        self.enabled = jax.process_index() == 0
        self._bar = self._tensorboard = self._file = None
        if not self.enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / METRICS_FILE
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            atomic_write(self.path, lambda f: f.write("".join(l + "\n" for l in kept).encode()))
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = _summary_writer()(logdir=str(workdir / TENSORBOARD_DIR), purge_step=start_step or None)
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             smoothing=0.1)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """One record: {"step": step, **metrics} to the jsonl file and TensorBoard."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tensorboard.add_scalar(name, value, global_step=int(step))
        self._tensorboard.flush()

    def progress(self, step: int, **postfix: float) -> None:
        if self._bar is None:
            return
        self._bar.update(int(step) - self._bar.n)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        for resource in (self._bar, self._tensorboard, self._file):
            if resource is not None:
                resource.close()
        self._bar = self._tensorboard = self._file = None


def image_grid(images_uint8: np.ndarray, ncols: int, padding: int = 0) -> np.ndarray:
    """(N, H, W[, C]) uint8 -> one (rows*H, ncols*W, C) uint8 image, row-major, black where empty."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise ValueError(f"images_uint8: expected dtype uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images_uint8: expected shape (N, H, W[, 1|3|4]) with N >= 1, "
                         f"got {np.asarray(images_uint8).shape}")
    if not isinstance(ncols, (int, np.integer)) or ncols < 1:
        raise ValueError(f"ncols: expected a positive int, got {ncols!r}")
    n, h, w, c = images.shape
    ncols = min(int(ncols), n)
    nrows = -(-n // ncols)
    grid = np.zeros((nrows * (h + padding) - padding, ncols * (w + padding) - padding, c), np.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, ncols)
        grid[row * (h + padding):row * (h + padding) + h, col * (w + padding):col * (w + padding) + w] = image
    return grid


def write_image_grid(path: str | os.PathLike, images_uint8: np.ndarray, ncols: int) -> Path:
    """Write `image_grid(images_uint8, ncols)` as a PNG at `path`, atomically."""
    from PIL import Image

    grid = image_grid(images_uint8, ncols)
    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    path = Path(path)
    atomic_write(path, lambda f: image.save(f, format="PNG"))
    return path
