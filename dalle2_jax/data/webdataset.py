"""`webdataset`: a tfds builder over img2dataset-style webdataset shards.

Each shard `NNNNN.tar` holds samples as consecutive members sharing a key
(the member name up to its first dot): `key.jpg` (or .jpeg/.png/.webp),
`key.txt` with the caption and optionally `key.json` (whose `caption` is used
when there is no .txt). All shards of one build form the `train` split.

Storage and cleaning are those of `folders`: images as bytes in a
`tfds.features.Image` in array_record files (no TensorFlow), non-RGB images
converted, undecodable images, samples without a caption and unreadable shards
skipped, non-UTF-8 captions decoded as latin-1; the counts are logged and kept
in `builder.info.metadata["build_stats"]`.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import tarfile
from typing import Iterator, Sequence

import tensorflow_datasets as tfds

from dalle2_jax.data import common

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


@dataclasses.dataclass(eq=False)
class WebDatasetConfig(tfds.core.BuilderConfig):
    shards: tuple[str, ...] = ()
    max_size: int | None = None  # shorter side is downscaled to this when larger


def webdataset_config(shards: str | Sequence[str], *, name: str | None = None,
                      max_size: int | None = None) -> WebDatasetConfig:
    """Config for a directory of `*.tar` shards, a glob pattern, or a list of shard paths."""
    if isinstance(shards, (str, os.PathLike)):
        pattern = os.fspath(shards)
        if os.path.isdir(pattern):
            paths = sorted(glob.glob(os.path.join(pattern, "*.tar")))
        else:
            paths = sorted(glob.glob(pattern))
    else:
        paths = [os.fspath(p) for p in shards]
    paths = tuple(os.path.abspath(p) for p in paths)
    if not paths:
        raise FileNotFoundError(f"shards must name at least one .tar file, found none for {shards!r}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"shards: no such file(s) {missing[:3]}")
    if max_size is not None and (not isinstance(max_size, int) or max_size < 1):
        raise ValueError(f"max_size must be None or a positive int, got {max_size!r}")
    if name is None:
        digest = hashlib.sha1("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()[:10]
        name = f"shards{len(paths)}_{digest}"
    return WebDatasetConfig(name=name, shards=paths, max_size=max_size)


def iter_tar_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each run of consecutive members sharing a key.

    Raises `tarfile.TarError`/`OSError` when the shard is unreadable; samples
    before the damage have been yielded by then.
    """
    key, sample = None, {}
    with tarfile.open(path, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            directory, base = os.path.split(member.name)
            if base.startswith(".") or "." not in base:
                continue
            stem, extension = base.split(".", 1)
            member_key = os.path.join(directory, stem)
            if member_key != key:
                if key is not None:
                    yield key, sample
                key, sample = member_key, {}
            sample[extension.lower()] = archive.extractfile(member).read()
    if key is not None:
        yield key, sample


def _caption_of(sample: dict[str, bytes]) -> bytes | str | None:
    if "txt" in sample:
        return sample["txt"]
    if "json" in sample:
        try:
            caption = json.loads(sample["json"].decode("utf-8", "replace")).get("caption")
        except (ValueError, AttributeError):
            return None
        return caption if isinstance(caption, str) else None
    return None


class WebDataset(common.OfflineBuilder, skip_registration=True):
    """img2dataset shards; `WebDataset(data_dir=..., config=webdataset_config(shard_dir))`."""

    name = "webdataset"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Captioned images from webdataset (img2dataset) tar shards.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "caption": tfds.features.Text(),
                "key": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if self.builder_config is None or not self.builder_config.shards:
            raise ValueError("WebDataset needs config=webdataset_config(shards)")
        self._stats = common.BuildStats()
        return {"train": self._generate_examples("train", self.builder_config.shards)}

    def _generate_examples(self, split, shards):
        index = 0
        for shard in shards:
            try:
                for key, sample in iter_tar_samples(shard):
                    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
                    example = common.make_image_text_example(
                        sample.get(image_key), _caption_of(sample), split=split, stats=self._stats,
                        name=f"{shard}:{key}", max_size=self.builder_config.max_size)
                    if example is not None:
                        example["key"] = key
                        yield index, example
                        index += 1
            except (tarfile.TarError, OSError, EOFError) as e:
                self._stats.add(split, "skipped_corrupt_shards")
                log.warning("%s: unreadable shard (%s); kept the samples before the damage", shard, e)
        counts = self._stats.as_dict().get(split, {})
        log.info("%s: %s", self.builder_config.name, counts)
        self.info.metadata["build_stats"] = self._stats.as_dict()
        if not counts.get("examples"):
            raise ValueError(f"shards: no usable examples in {len(shards)} shard(s) ({counts})")

    @property
    def build_stats(self) -> dict[str, dict[str, int]]:
        """Per split: examples written and what was converted or skipped."""
        return dict(self.info.metadata.get("build_stats", {}))


def build_webdataset(shards: str | Sequence[str], data_dir: str, *, name: str | None = None,
                     max_size: int | None = None) -> WebDataset:
    """Prepare (or reuse) the array_record copy of the shards under `data_dir`."""
    return common.prepare(lambda: WebDataset(data_dir=data_dir, config=webdataset_config(
        shards, name=name, max_size=max_size)))
