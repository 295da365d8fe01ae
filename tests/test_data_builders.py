"""Image-folder and webdataset builders: round trips, conversions, skipped files and their counts."""
import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from dalle2_jax.data import folders, webdataset

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (10, 10), dtype=np.uint8)
RGBA = np.zeros((8, 8, 4), np.uint8)
RGBA[..., :3] = (200, 40, 10)
RGBA[:4, :, 3] = 255  # opaque top half, half-transparent bottom-left, transparent bottom-right
RGBA[4:, :4, 3] = 128
LATIN1_CAPTION = "un café crème".encode("latin-1")


def _encode(array, fmt, mode=None):
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


JPEG = _encode(RGB, "JPEG")
PNG = _encode(RGB, "PNG")
CORRUPT_JPEG = JPEG[:40] + b"\x00" * 20  # a JPEG header, then nothing decodable
PALETTE = _encode(RGB, "PNG", mode="P")
SAMPLES = {  # name -> (image bytes, caption bytes or None)
    "a_rgb": (PNG, b"a random rgb picture"),
    "b_jpeg": (JPEG, "a jpeg with unicode: caf\u00e9".encode()),
    "c_rgba": (_encode(RGBA, "PNG"), b"a red rectangle on transparency"),
    "d_gray": (_encode(GRAY, "PNG"), b"grayscale noise"),
    "e_palette": (PALETTE, LATIN1_CAPTION),
    "f_corrupt": (CORRUPT_JPEG, b"this image is broken"),
    "g_uncaptioned": (PNG, None),
}
EXTENSIONS = {"a_rgb": "png", "b_jpeg": "jpg", "c_rgba": "png", "d_gray": "png", "e_palette": "png",
              "f_corrupt": "jpg", "g_uncaptioned": "png"}
EXPECTED_STATS = {"examples": 5, "converted_images": 3, "non_utf8_captions": 1,
                  "skipped_corrupt_images": 1, "skipped_missing_caption": 1, "skipped_missing_image": 0,
                  "skipped_bad_rows": 0, "skipped_corrupt_shards": 0}


def _expected_pixels(name):
    if name == "a_rgb":
        return RGB
    if name == "b_jpeg":
        return np.asarray(Image.open(io.BytesIO(JPEG)).convert("RGB"))
    if name == "c_rgba":
        alpha = RGBA[..., 3:].astype(np.float64) / 255
        return np.round(RGBA[..., :3] * alpha + 255 * (1 - alpha))
    if name == "d_gray":
        return np.repeat(GRAY[..., None], 3, axis=-1)
    if name == "e_palette":
        return np.asarray(Image.open(io.BytesIO(PALETTE)).convert("RGB"))
    raise KeyError(name)


def _expected_caption(name):
    caption = SAMPLES[name][1]
    return caption.decode("latin-1") if name == "e_palette" else caption.decode("utf-8")


def _check_round_trip(source, names, name_of):
    assert len(source) == len(names)
    seen = set()
    for index in range(len(source)):
        example = source[index]
        name = name_of(example)
        seen.add(name)
        assert example["image"].dtype == np.uint8 and example["image"].shape[-1] == 3
        np.testing.assert_allclose(example["image"], _expected_pixels(name), atol=1)
        assert example["caption"].decode("utf-8") == _expected_caption(name)
    assert seen == set(names)


KEPT = ["a_rgb", "b_jpeg", "c_rgba", "d_gray", "e_palette"]


def test_folder_with_txt_captions(tmp_path):
    source_dir = tmp_path / "images"
    (source_dir / "sub").mkdir(parents=True)
    for name, (image, caption) in SAMPLES.items():
        directory = source_dir / "sub" if name == "d_gray" else source_dir  # nested folders are walked
        (directory / f"{name}.{EXTENSIONS[name]}").write_bytes(image)
        if caption is not None:
            (directory / f"{name}.txt").write_bytes(caption)
    builder = folders.build_image_folder(str(source_dir), str(tmp_path / "tfds"))
    assert builder.build_stats == {"train": EXPECTED_STATS}
    _check_round_trip(builder.as_data_source("train"), KEPT,
                      lambda e: os.path.basename(e["file"].decode()).split(".")[0])
    np.testing.assert_array_equal(builder.as_data_source("train")[0]["image"], RGB)  # exact for PNG
    # A second builder on the same config reuses the prepared data, stats included.
    again = folders.ImageFolder(data_dir=str(tmp_path / "tfds"),
                                config=folders.image_folder_config(str(source_dir)))
    assert again.build_stats == {"train": EXPECTED_STATS}
    assert len(again.as_data_source("train")) == 5


@pytest.mark.parametrize("table", ["captions.csv", "captions.jsonl"])
def test_folder_with_caption_table_and_splits(tmp_path, table):
    source_dir = tmp_path / "images"
    for split, names in (("train", list(SAMPLES)), ("test", ["a_rgb", "d_gray"])):
        split_dir = source_dir / split
        split_dir.mkdir(parents=True)
        rows = []
        for name in names:
            image, caption = SAMPLES[name]
            (split_dir / f"{name}.{EXTENSIONS[name]}").write_bytes(image)
            if caption is not None:
                rows.append((f"{name}.{EXTENSIONS[name]}", caption))
        if split == "train":
            rows.append(("missing.png", b"an image that is not there"))
        if table == "captions.csv":
            text = io.StringIO(newline="")
            writer = csv.writer(text)
            writer.writerow(["file", "caption"])
            for file, caption in rows:
                writer.writerow([file, caption.decode("utf-8", "surrogateescape")])
            (split_dir / table).write_bytes(text.getvalue().encode("utf-8", "surrogateescape"))
        else:
            lines = [json.dumps({"file": file, "caption": "@@"}).encode().replace(
                b"@@", caption.replace(b'"', b'\\"')) for file, caption in rows]
            if split == "train":
                lines.append(b"{not json")
            (split_dir / table).write_bytes(b"\n".join(lines) + b"\n")
    builder = folders.build_image_folder(str(source_dir), str(tmp_path / "tfds"))
    train_stats = dict(EXPECTED_STATS, skipped_missing_image=1,
                       skipped_bad_rows=1 if table.endswith("jsonl") else 0)
    test_stats = dict(EXPECTED_STATS, examples=2, converted_images=1, non_utf8_captions=0,
                      skipped_corrupt_images=0, skipped_missing_caption=0)
    assert builder.build_stats == {"train": train_stats, "test": test_stats}
    name_of = lambda e: e["file"].decode().split(".")[0]  # noqa: E731
    _check_round_trip(builder.as_data_source("train"), KEPT, name_of)
    _check_round_trip(builder.as_data_source("test"), ["a_rgb", "d_gray"], name_of)


def _tar_bytes(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_webdataset_shards(tmp_path):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    first, second = [], []
    for number, (name, (image, caption)) in enumerate(SAMPLES.items()):
        key = f"{number:09d}"
        members = first if number < 4 else second
        members.append((f"{key}.{EXTENSIONS[name]}", image))
        if name == "b_jpeg":  # caption only in the json, as img2dataset also writes it
            members.append((f"{key}.json", json.dumps({"caption": caption.decode(), "key": key}).encode()))
        elif caption is not None:
            members.append((f"{key}.txt", caption))
            members.append((f"{key}.json", json.dumps({"key": key, "url": "http://x"}).encode()))
    (shard_dir / "00000.tar").write_bytes(_tar_bytes(first))
    (shard_dir / "00001.tar").write_bytes(_tar_bytes(second))
    # A truncated shard: its first sample survives, the damaged rest is dropped and counted.
    truncated = _tar_bytes([("000000100.png", PNG), ("000000100.txt", b"a random rgb picture"),
                            ("000000101.png", PNG), ("000000101.txt", b"lost")])
    cut = truncated.index(b"000000101.png") + 512 + 100  # inside that image's data
    (shard_dir / "00002.tar").write_bytes(truncated[:cut])
    builder = webdataset.build_webdataset(str(shard_dir), str(tmp_path / "tfds"))
    names = list(SAMPLES)
    assert builder.build_stats == {"train": dict(EXPECTED_STATS, examples=6, skipped_corrupt_shards=1)}
    source = builder.as_data_source("train")
    keys = [source[i]["key"].decode() for i in range(len(source))]
    assert keys == ["000000000", "000000001", "000000002", "000000003", "000000004", "000000100"]
    name_of = lambda e: "a_rgb" if e["key"] == b"000000100" else names[int(e["key"])]  # noqa: E731
    _check_round_trip(source, KEPT + ["a_rgb"], name_of)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="source_dir"):
        folders.image_folder_config(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="shards"):
        webdataset.webdataset_config(str(tmp_path))
    (tmp_path / "only_broken").mkdir()
    (tmp_path / "only_broken" / "x.jpg").write_bytes(CORRUPT_JPEG)
    (tmp_path / "only_broken" / "x.txt").write_bytes(b"caption")
    with pytest.raises(ValueError, match="no usable examples"):
        folders.build_image_folder(str(tmp_path / "only_broken"), str(tmp_path / "tfds"))
