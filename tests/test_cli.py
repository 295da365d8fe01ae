"""The pipeline commands of `dalle2-jax`, run in-process on a saved tiny random pipeline."""
import numpy as np
import pytest
from PIL import Image

from dalle2_jax import cli
from test_pipeline import OUT, sample_image, tiny_pipeline


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_pipeline().save_pretrained(root / "model")
    Image.fromarray(sample_image()).save(root / "red.png")
    Image.fromarray(sample_image((40, 80, 220))).save(root / "blue.png")
    mask = np.zeros(sample_image().shape[:2], np.uint8)
    mask[4:12, 6:14] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root


def run(files, *argv):
    """cli.main with the shared options; returns the grid and the single images it wrote."""
    out = files / f"{argv[0]}.png"
    assert cli.main([*argv, "--model", str(files / "model"), "--out", str(out), "--seed", "1"]) == 0
    grid = np.asarray(Image.open(out))
    singles = sorted(files.glob(f"{argv[0]}_*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return grid, [np.asarray(Image.open(p)) for p in singles]


@pytest.mark.parametrize("argv, rows, cols", [
    (["generate", "a red circle", "a blue square", "--num-images", "1"], 2, 1),
    (["variations", "{red}", "--num-images", "2"], 1, 2),
    (["interpolate", "{red}", "{blue}", "--num-frames", "2"], 1, 2),
    (["text-diff", "{red}", "a red circle", "a blue circle", "--num-frames", "2"], 1, 2),
    (["inpaint", "{red}", "{mask}", "a blue square", "--decoder-steps", "3"], 1, 1),
])
def test_commands_write_the_grid_and_the_single_images(files, argv, rows, cols):
    argv = [a.format(red=files / "red.png", blue=files / "blue.png", mask=files / "mask.png") for a in argv]
    grid, singles = run(files, *argv)
    assert grid.shape == (rows * OUT, cols * OUT, 3) and grid.dtype == np.uint8
    assert len(singles) == rows * cols
    for index, single in enumerate(singles):
        row, col = divmod(index, cols)
        np.testing.assert_array_equal(single, grid[row * OUT:(row + 1) * OUT, col * OUT:(col + 1) * OUT])


def test_errors_end_the_command_with_the_argument_named(files):
    with pytest.raises(SystemExit, match="image"):
        run(files, "variations", str(files / "missing.png"))
    with pytest.raises(SystemExit, match="num_frames"):
        run(files, "interpolate", str(files / "red.png"), str(files / "blue.png"), "--num-frames", "1")
    with pytest.raises(SystemExit, match="--out"):
        cli.main(["generate", "a red circle", "--model", str(files / "model"), "--out", str(files / "x.jpg")])
    with pytest.raises(SystemExit, match="path"):
        cli.main(["generate", "a red circle", "--model", str(files / "nowhere"), "--out", str(files / "x.png")])
