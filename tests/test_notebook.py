"""notebooks/quickstart.ipynb executed headlessly (nbclient) on a tiny random pipeline directory.

What runs: every cell of the notebook, top to bottom, in a fresh kernel, with the parameters a
papermill-style cell sets after the PARAMS cell: a local install (no pip) and SOURCE="directory"
(the tiny pipeline made here) instead of training the quick demo, which tests/test_demo.py runs
already. Every figure cell (text-to-image grid, variations, interpolation strip, text diff,
inpainting) must show one PNG of the size its grid has. What does not run: the pip install from
the repository, Google Drive and the Colab upload widget (Colab-only branches).
"""
import base64
import io
import os
import time
from pathlib import Path

import nbformat
import numpy as np
from nbclient import NotebookClient
from PIL import Image

from test_pipeline import OUT, tiny_pipeline

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
PADDING, ZOOM = 2, 3  # show()'s padding between images; the zoom the test asks for


def grid_size(count: int, ncols: int) -> tuple[int, int]:
    """(width, height) of show(images, ncols) for `count` images of OUT px."""
    ncols = min(ncols, count)
    rows = -(-count // ncols)
    return (ncols * (OUT + PADDING) - PADDING) * ZOOM, (rows * (OUT + PADDING) - PADDING) * ZOOM


# (the cell's title, its grid) with the notebook's default form values.
FIGURES = [("Text to image", grid_size(3 * 4, 4)), ("Variations", grid_size(1 + 4, 5)),
           ("Interpolation", grid_size(2 + 5, 7)), ("Text diff", grid_size(1 + 5, 6)),
           ("Inpainting", grid_size(2 + 2, 4))]


def test_the_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert [cell for cell in code if "parameters" in cell.metadata.get("tags", [])][0] is code[0]


def test_every_cell_runs_and_every_figure_has_its_size(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "model")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
        f'SOURCE = "directory"\nMODEL_DIR = {str(tmp_path / "model")!r}\nINSTALL = "local"\nZOOM = {ZOOM}',
        metadata={"tags": ["injected-parameters"]}))
    env = {**os.environ, "DALLE2_JAX_CACHE_DIR": str(tmp_path / "xla")}
    started = time.perf_counter()
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute(env=env)
    print(f"notebook executed in {time.perf_counter() - started:.1f} s")

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
    figures = [cell for cell in code if "figure" in cell.metadata.get("tags", [])]
    titles = [cell.source.splitlines()[0].removeprefix("# @title ").split(" {")[0] for cell in figures]
    assert titles == [title for title, _ in FIGURES]
    for cell, (title, size) in zip(figures, FIGURES):
        pngs = [out["data"]["image/png"] for out in cell.outputs if "image/png" in out.get("data", {})]
        assert len(pngs) == 1, f"{title}: {len(pngs)} images"
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(pngs[0]))).convert("RGB"))
        assert (image.shape[1], image.shape[0]) == size, title
        assert image.std() > 5.0, f"{title}: a flat image"
    assert any((tmp_path / "xla").iterdir())  # the notebook turned the compilation cache on
