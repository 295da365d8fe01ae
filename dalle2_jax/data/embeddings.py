"""CLIP embedding datasets in the clip-retrieval layout, for prior and decoder training.

```
out_dir/img_emb/img_emb_0000.npy        (n, D) image embeddings
out_dir/text_emb/text_emb_0000.npy      (n, D) text embeddings
out_dir/text_enc/text_enc_0000.npy      (n, L, W) token encodings     (ours, optional)
out_dir/text_mask/text_mask_0000.npy    (n, L) bool token mask        (ours, optional)
out_dir/metadata/metadata_0000.parquet  a `caption` column             (optional)
```

Plain clip-retrieval directories (img_emb + text_emb, shards numbered without
padding, metadata with more columns) read the same way. Arrays keep the dtype
they were written with (clip-retrieval writes float16); the input pipeline
casts to float32.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FIELDS = {  # example key -> (folder, file prefix)
    "image_embed": ("img_emb", "img_emb"),
    "text_embed": ("text_emb", "text_emb"),
    "text_encodings": ("text_enc", "text_enc"),
    "text_mask": ("text_mask", "text_mask"),
}
REQUIRED = ("image_embed", "text_embed")
_EXPECTED_NDIM = {"image_embed": 2, "text_embed": 2, "text_encodings": 3, "text_mask": 2}
_ARGUMENT = {"image_embed": "image_embeds", "text_embed": "text_embeds",
             "text_encodings": "text_encodings", "text_mask": "text_mask"}


class EmbeddingWriter:
    """Streams embeddings into shards of `shard_size` rows; the directory appears only on `close()`.

    ```
    with EmbeddingWriter(out_dir, shard_size=100_000) as writer:
        for batch in batches:
            writer.add(image_embeds, text_embeds, text_encodings=..., text_mask=..., captions=...)
    ```
    An exception inside the `with` block leaves no `out_dir` behind.
    """

    def __init__(self, out_dir: str, *, shard_size: int = 100_000, overwrite: bool = False):
        if not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        if os.path.exists(self.out_dir) and not overwrite:
            raise ValueError(f"out_dir {self.out_dir!r} already exists; pass overwrite=True to replace it")
        parent = os.path.dirname(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        self.shard_size = int(shard_size)
        self.overwrite = overwrite
        self._tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out_dir)}.tmp-", dir=parent)
        self._pending: dict[str, list] = {}
        self._present: tuple[str, ...] | None = None  # which optional fields every add() carries
        self._num_pending = 0
        self._num_shards = 0
        self.num_rows = 0

    def add(self, image_embeds, text_embeds, text_encodings=None, text_mask=None,
            captions: Sequence[str] | None = None) -> None:
        arrays = {"image_embed": image_embeds, "text_embed": text_embeds,
                  "text_encodings": text_encodings, "text_mask": text_mask}
        arrays = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
        count = len(arrays["image_embed"]) if arrays["image_embed"].ndim else -1
        for key, array in arrays.items():
            if array.ndim != _EXPECTED_NDIM[key] or array.shape[0] != count:
                raise ValueError(f"{_ARGUMENT[key]} must be a {_EXPECTED_NDIM[key]}-d array with {count} rows "
                                 f"(as image_embeds), got shape {array.shape}")
        if "text_mask" in arrays:
            if "text_encodings" in arrays and arrays["text_mask"].shape != arrays["text_encodings"].shape[:2]:
                raise ValueError(f"text_mask must have shape {arrays['text_encodings'].shape[:2]} "
                                 f"(text_encodings without the width), got {arrays['text_mask'].shape}")
            arrays["text_mask"] = arrays["text_mask"].astype(bool)
        if captions is not None:
            if isinstance(captions, str) or len(captions) != count or not all(isinstance(c, str) for c in captions):
                raise ValueError(f"captions must be a sequence of {count} str, got {type(captions).__name__}")
            arrays["caption"] = list(captions)
        present = tuple(sorted(arrays))
        if self._present is None:
            self._present = present
        elif present != self._present:
            raise ValueError(f"every add() must carry the same fields: first had {self._present}, "
                             f"this one {present}")
        for key, value in arrays.items():
            self._pending.setdefault(key, []).append(value)
        self._num_pending += count
        self.num_rows += count
        while self._num_pending >= self.shard_size:
            self._write_shard(self.shard_size)

    def _take(self, key: str, rows: int):
        parts = self._pending[key]
        if key == "caption":
            flat = [c for part in parts for c in part]
            self._pending[key] = [flat[rows:]]
            return flat[:rows]
        joined = np.concatenate(parts) if len(parts) > 1 else parts[0]
        self._pending[key] = [joined[rows:]]
        return joined[:rows]

    def _write_shard(self, rows: int) -> None:
        shard = self._num_shards
        for key in self._present:
            values = self._take(key, rows)
            if key == "caption":
                folder = os.path.join(self._tmp_dir, "metadata")
                os.makedirs(folder, exist_ok=True)
                pq.write_table(pa.table({"caption": pa.array(values, pa.string())}),
                               os.path.join(folder, f"metadata_{shard:04d}.parquet"))
            else:
                folder_name, prefix = FIELDS[key]
                folder = os.path.join(self._tmp_dir, folder_name)
                os.makedirs(folder, exist_ok=True)
                np.save(os.path.join(folder, f"{prefix}_{shard:04d}.npy"), np.ascontiguousarray(values))
        self._num_pending -= rows
        self._num_shards += 1

    def close(self) -> str:
        """Write the last shard and move the finished directory to `out_dir`; returns it."""
        if self._tmp_dir is None:
            raise ValueError("EmbeddingWriter is already closed")
        if self.num_rows == 0:
            self.abort()
            raise ValueError("EmbeddingWriter got no rows: add() at least one embedding before close()")
        if self._num_pending:
            self._write_shard(self._num_pending)
        if os.path.exists(self.out_dir):
            if not self.overwrite:
                self.abort()
                raise ValueError(f"out_dir {self.out_dir!r} appeared while writing; not replaced")
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out_dir)}.old-",
                                     dir=os.path.dirname(self.out_dir))
            os.replace(self.out_dir, os.path.join(trash, "old"))
            os.replace(self._tmp_dir, self.out_dir)
            shutil.rmtree(trash)
        else:
            os.replace(self._tmp_dir, self.out_dir)
        self._tmp_dir = None
        return self.out_dir

    def abort(self) -> None:
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_embedding_dataset(out_dir: str, image_embeds, text_embeds, text_encodings=None, text_mask=None,
                            captions: Sequence[str] | None = None, *, shard_size: int = 100_000,
                            overwrite: bool = False) -> str:
    """Write in-memory embeddings as an embedding dataset (atomically); returns `out_dir`."""
    writer = EmbeddingWriter(out_dir, shard_size=shard_size, overwrite=overwrite)
    try:
        writer.add(image_embeds, text_embeds, text_encodings=text_encodings, text_mask=text_mask,
                   captions=captions)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _numbered_files(folder: str, prefix: str, suffix: str) -> list[str]:
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+){re.escape(suffix)}$")
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        match = pattern.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(folder, name)))
    numbers = [n for n, _ in sorted(found)]
    if numbers != list(range(len(numbers))):
        raise ValueError(f"{folder}: shards must be numbered 0..n-1 without gaps, got {numbers}")
    return [path for _, path in sorted(found)]


class EmbeddingSource:
    """Random-access (grain) source over an embedding directory, memory-mapped.

    Items are dicts with `image_embed` (D,), `text_embed` (D,), and when stored
    `text_encodings` (L, W), `text_mask` (L,) and `caption` (str).
    """

    def __init__(self, directory: str, *, captions: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"directory must be an embedding dataset directory, got {self.directory!r}")
        self.paths: dict[str, list[str]] = {}
        for key, (folder, prefix) in FIELDS.items():
            paths = _numbered_files(os.path.join(self.directory, folder), prefix, ".npy")
            if paths:
                self.paths[key] = paths
        missing = [FIELDS[k][0] for k in REQUIRED if k not in self.paths]
        if missing:
            raise FileNotFoundError(f"directory {self.directory!r} has no {'/'.join(missing)} shards "
                                    f"(expected e.g. img_emb/img_emb_0000.npy)")
        self.caption_paths = None
        if captions:
            parquet = _numbered_files(os.path.join(self.directory, "metadata"), "metadata", ".parquet")
            if parquet and all("caption" in pq.read_schema(p).names for p in parquet):
                self.caption_paths = parquet
        num_shards = len(self.paths["image_embed"])
        self.shard_sizes = [np.load(p, mmap_mode="r").shape[0] for p in self.paths["image_embed"]]
        for key, paths in self.paths.items():
            sizes = [np.load(p, mmap_mode="r").shape[0] for p in paths]
            if sizes != self.shard_sizes:
                raise ValueError(f"directory {self.directory!r}: {FIELDS[key][0]} shard sizes {sizes} "
                                 f"differ from img_emb's {self.shard_sizes}")
        if self.caption_paths is not None:
            sizes = [pq.read_metadata(p).num_rows for p in self.caption_paths]
            if len(sizes) != num_shards or sizes != self.shard_sizes:
                raise ValueError(f"directory {self.directory!r}: metadata rows {sizes} differ from "
                                 f"img_emb's {self.shard_sizes}")
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self._arrays: dict[str, list] | None = None
        self._captions: list | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"], state["_captions"] = None, None  # memory maps reopen in each worker
        return state

    def _open(self) -> None:
        # _arrays last: reader threads take a non-None _arrays to mean "fully opened".
        if self.caption_paths is not None:
            self._captions = [None] * len(self.caption_paths)
        self._arrays = {key: [np.load(p, mmap_mode="r") for p in paths] for key, paths in self.paths.items()}

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} embeddings")
        index %= len(self)
        if self._arrays is None:
            self._open()
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        row = index - int(self.offsets[shard])
        item = {key: np.asarray(arrays[shard][row]) for key, arrays in self._arrays.items()}
        if self._captions is not None:
            if self._captions[shard] is None:
                self._captions[shard] = pq.read_table(self.caption_paths[shard], columns=["caption"],
                                                      memory_map=True).column("caption")
            caption = self._captions[shard][row].as_py()
            item["caption"] = caption if caption is not None else ""
        return item

    def __repr__(self) -> str:
        return f"EmbeddingSource({self.directory!r}, {len(self)} rows, fields={sorted(self.paths)})"
