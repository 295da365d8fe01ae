"""`image_folder`: a tfds builder over a folder of captioned images.

Captions come from `captions.csv` or `captions.jsonl` (columns `file` and
`caption`; `filename`/`image`/`path` and `text` are accepted too) when the
folder has one, otherwise from a `.txt` file next to each image with the same
stem. Subfolders named `train`, `validation`, `val` or `test` become splits;
without them the whole folder is `train`.

Images are stored as bytes in a `tfds.features.Image` (array_record, no
TensorFlow): plain RGB JPEG/PNG files verbatim, everything else decoded,
converted to RGB (RGBA composited on white, L/P/CMYK converted) and stored as
PNG. Undecodable images and images without a caption are skipped; captions
that are not UTF-8 are decoded as latin-1. The counts are logged and kept in
`builder.info.metadata["build_stats"][split]` (see `common.BuildStats`).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os

import tensorflow_datasets as tfds

from dalle2_jax.data import common

log = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
CAPTION_TABLES = ("captions.csv", "captions.jsonl")
FILE_COLUMNS = ("file", "filename", "image", "path")
CAPTION_COLUMNS = ("caption", "text")


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
    source_dir: str = ""
    max_size: int | None = None  # shorter side is downscaled to this when larger


def image_folder_config(source_dir: str, *, name: str | None = None,
                        max_size: int | None = None) -> ImageFolderConfig:
    """Config for `source_dir`; the default name is derived from its absolute path."""
    source_dir = os.path.abspath(os.fspath(source_dir))
    if not os.path.isdir(source_dir):
        raise FileNotFoundError(f"source_dir must be an existing directory, got {source_dir!r}")
    if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
        raise ValueError(f"max_size must be None or a positive int, got {max_size!r}")
    if name is None:
        digest = hashlib.sha1(source_dir.encode("utf-8", "surrogateescape")).hexdigest()[:10]
        name = f"{_safe_name(os.path.basename(source_dir))}_{digest}"
    return ImageFolderConfig(name=name, source_dir=source_dir, max_size=max_size)


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text) or "folder"


def find_splits(source_dir: str) -> dict[str, str]:
    """Split name -> directory holding its images."""
    splits = {}
    for entry in sorted(os.listdir(source_dir)):
        path = os.path.join(source_dir, entry)
        if entry in SPLIT_DIRS and os.path.isdir(path):
            if SPLIT_DIRS[entry] in splits:
                raise ValueError(f"source_dir {source_dir!r} has both 'val' and 'validation' folders")
            splits[SPLIT_DIRS[entry]] = path
    return splits or {"train": source_dir}


def _pick_column(columns, wanted, table):
    for name in wanted:
        if name in columns:
            return name
    raise ValueError(f"{table} must have a column named one of {wanted}, got columns {list(columns)}")


def read_caption_table(split_dir: str, *, split: str, stats: common.BuildStats) -> dict[str, bytes] | None:
    """Relative image path -> raw caption bytes from captions.csv / .jsonl, or None without a table.

    Captions are returned as the bytes in the file so that non-UTF-8 text is
    detected and decoded per caption, like a `.txt` caption.
    """
    for table in CAPTION_TABLES:
        path = os.path.join(split_dir, table)
        if os.path.isfile(path):
            break
    else:
        return None
    with open(path, "rb") as f:
        raw = f.read()
    captions = {}
    if table.endswith(".csv"):
        # surrogateescape keeps undecodable bytes so each caption can be decoded on its own.
        reader = csv.DictReader(io.StringIO(raw.decode("utf-8", "surrogateescape").lstrip("\ufeff"),
                                            newline=""))
        file_column = _pick_column(reader.fieldnames or (), FILE_COLUMNS, path)
        caption_column = _pick_column(reader.fieldnames or (), CAPTION_COLUMNS, path)
        for row in reader:
            if not row.get(file_column) or row.get(caption_column) is None:
                stats.add(split, "skipped_bad_rows")
                continue
            captions[os.path.normpath(row[file_column])] = row[caption_column].encode("utf-8", "surrogateescape")
    else:
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8", "surrogateescape"))
                file_column = _pick_column(row, FILE_COLUMNS, path)
                caption_column = _pick_column(row, CAPTION_COLUMNS, path)
                file, caption = row[file_column], row[caption_column]
                if not isinstance(file, str) or not isinstance(caption, str):
                    raise ValueError("file and caption must be strings")
            except ValueError as e:
                stats.add(split, "skipped_bad_rows")
                log.warning("%s line %d: %s, skipped", path, number, e)
                continue
            captions[os.path.normpath(file)] = caption.encode("utf-8", "surrogateescape")
    return captions


class ImageFolder(common.OfflineBuilder, skip_registration=True):
    """Captioned images from a folder; `ImageFolder(data_dir=..., config=image_folder_config(dir))`."""

    name = "image_folder"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Captioned images from a local folder.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "caption": tfds.features.Text(),
                "file": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if self.builder_config is None or not self.builder_config.source_dir:
            raise ValueError("ImageFolder needs config=image_folder_config(source_dir)")
        self._stats = common.BuildStats()
        return {split: self._generate_examples(split, directory)
                for split, directory in find_splits(self.builder_config.source_dir).items()}

    def _generate_examples(self, split, split_dir):
        table = read_caption_table(split_dir, split=split, stats=self._stats)
        images = common.iter_sorted_files(split_dir, common.IMAGE_EXTENSIONS)
        entries = sorted(set(images) | set(table or ()))
        index = 0
        for relative in entries:
            path = os.path.join(split_dir, relative)
            image_bytes = _read_bytes(path)
            if table is not None and relative in table:
                caption = table[relative]
            else:
                caption = _read_bytes(os.path.splitext(path)[0] + ".txt")
            example = common.make_image_text_example(
                image_bytes, caption, split=split, stats=self._stats, name=path,
                max_size=self.builder_config.max_size)
            if example is not None:
                example["file"] = relative
                yield index, example
                index += 1
        self._finish_split(split)

    def _finish_split(self, split):
        counts = self._stats.as_dict().get(split, {})
        log.info("%s/%s: %s", self.builder_config.source_dir, split, counts)
        self.info.metadata["build_stats"] = self._stats.as_dict()
        if not counts.get("examples"):
            raise ValueError(f"source_dir {self.builder_config.source_dir!r}: no usable examples "
                             f"in split {split!r} ({counts})")

    @property
    def build_stats(self) -> dict[str, dict[str, int]]:
        """Per split: examples written and what was converted or skipped."""
        return dict(self.info.metadata.get("build_stats", {}))


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError):
        return None


def build_image_folder(source_dir: str, data_dir: str, *, name: str | None = None,
                       max_size: int | None = None) -> ImageFolder:
    """Prepare (or reuse) the array_record copy of `source_dir` under `data_dir`."""
    config = image_folder_config(source_dir, name=name, max_size=max_size)
    return common.prepare(lambda: ImageFolder(data_dir=data_dir, config=config))
