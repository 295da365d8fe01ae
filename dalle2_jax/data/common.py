"""Shared helpers of the dataset builders: offline preparation, image and caption cleaning.

Storage format (all builders): tfds `array_record` files written without
TensorFlow. Images go into `tfds.features.Image` as already-encoded bytes
(PNG, or the original JPEG when it is a plain RGB JPEG), which tfds stores
verbatim; TF is only needed when tfds has to encode a numpy array itself, so we
never hand it one. Reading with `builder.as_data_source(split)` decodes with
PIL into uint8 (H, W, 3).
"""
from __future__ import annotations

import collections
import io
import logging
import os
from typing import Callable, Iterable

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A generator builder that writes array_record by default and has no download step.

    tfds looks for a checksums file next to the builder's code through
    `code_path`, which fails for editable installs without `importlib_resources`;
    nothing here is downloaded, so there is nothing to look for.
    """

    code_path = None

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)


def prepare(make_builder: Callable[[], tfds.core.DatasetBuilder]) -> tfds.core.DatasetBuilder:
    """`make_builder()` prepared with `download_and_prepare`, never touching the network. In a
    multi-process run process 0 builds first and the others then open and reuse its files (a
    builder reads what is on disk when it is made, so the others make theirs afterwards)."""
    from dalle2_jax.sharding import process_zero_first

    with process_zero_first("prepare dataset"):
        builder = make_builder()
        builder.download_and_prepare(
            download_dir=os.path.join(os.fspath(builder.data_dir_root), "downloads"),
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    return builder


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of any PIL image; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit / int / float grayscale: PIL's direct convert clips, so rescale to 8 bit first.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(np.round(scaled).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def clean_image_bytes(data: bytes, *, max_size: int | None = None) -> tuple[bytes, str]:
    """Decode, convert to RGB and re-encode one image.

    Returns (bytes to store, what was done: "ok" | "converted"). Plain RGB JPEG
    and PNG files that need no resizing are stored as they are. Raises
    `ValueError` when the bytes are not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image_format = image.format
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            converted = image.mode != "RGB"
            rgb = to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"undecodable image ({type(e).__name__}: {e})") from e
    resized = False
    if max_size is not None and min(rgb.size) > max_size:
        ratio = max_size / min(rgb.size)
        new_size = (max(1, round(rgb.width * ratio)), max(1, round(rgb.height * ratio)))
        rgb = rgb.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        resized = True
    if not converted and not resized and image_format in ("JPEG", "PNG"):
        return data, "ok"
    return encode_png(rgb), ("converted" if converted else "ok")


def decode_caption(data: bytes | str) -> tuple[str, bool]:
    """(caption, was it valid UTF-8); invalid bytes fall back to latin-1, which never fails."""
    if isinstance(data, str):
        return data.strip(), True
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8").strip(), True
    except UnicodeDecodeError:
        return data.decode("latin-1").strip(), False


class BuildStats:
    """Per-split counters of what a build kept, converted or skipped."""

    FIELDS = ("examples", "converted_images", "non_utf8_captions", "skipped_corrupt_images",
              "skipped_missing_caption", "skipped_missing_image", "skipped_bad_rows",
              "skipped_corrupt_shards")

    def __init__(self):
        self.counts: dict[str, collections.Counter] = {}

    def add(self, split: str, field: str, amount: int = 1) -> None:
        if field not in self.FIELDS:
            raise ValueError(f"field must be one of {self.FIELDS}, got {field!r}")
        self.counts.setdefault(split, collections.Counter())[field] += amount

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {split: {field: int(counter[field]) for field in self.FIELDS}
                for split, counter in self.counts.items()}


def make_image_text_example(image_bytes: bytes | None, caption: bytes | str | None, *, split: str,
                            stats: BuildStats, name: str, max_size: int | None = None) -> dict | None:
    """The stored example for one (image, caption) pair, or None (counted in `stats`) to skip it."""
    if image_bytes is None:
        stats.add(split, "skipped_missing_image")
        log.warning("%s: no image, skipped", name)
        return None
    if caption is None:
        stats.add(split, "skipped_missing_caption")
        log.warning("%s: no caption, skipped", name)
        return None
    text, valid_utf8 = decode_caption(caption)
    if not text:
        stats.add(split, "skipped_missing_caption")
        log.warning("%s: empty caption, skipped", name)
        return None
    try:
        stored, status = clean_image_bytes(image_bytes, max_size=max_size)
    except ValueError as e:
        stats.add(split, "skipped_corrupt_images")
        log.warning("%s: %s, skipped", name, e)
        return None
    if not valid_utf8:
        stats.add(split, "non_utf8_captions")
        log.warning("%s: caption is not UTF-8, decoded as latin-1", name)
    if status == "converted":
        stats.add(split, "converted_images")
    stats.add(split, "examples")
    return {"image": stored, "caption": text}


def iter_sorted_files(root: str, extensions: Iterable[str]) -> list[str]:
    """Paths (relative to root) of files with the given extensions, sorted for a stable order."""
    extensions = tuple(e.lower() for e in extensions)
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith(extensions) and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)
