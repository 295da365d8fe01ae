"""grain input pipelines: checkpointable iterators of numpy batches for one process.

Both iterators are built the same way:

    MapDataset.source(source)
      .seed(seed).shuffle().repeat(num_epochs)                 one global order, fresh every epoch
      .map / .random_map(...)                                  per-example work, random draws
                                                               keyed by (seed, global position)
      .batch(batch_size)                                       this process's rows of a global batch
      [process_index::process_count]                           are one such batch: global batch g is
                                                               batches g*P .. g*P + P-1, in process order
      .to_iter_dataset(read_options)                           threads read ahead, in order
      [.mp_prefetch(worker_count)] [.map(tokenizer)]           worker processes, in order

so the global batches depend only on (seed, position), not on the number of
processes, threads or workers: P processes of batch B/P see exactly the batches
one process of batch B sees, row for row. `get_state()` / `set_state()` on the
returned iterator resume it exactly; its state counts the global batches taken,
so it also restores into an iterator of another process count (elastic resume).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import grain
import numpy as np
from absl import flags
from PIL import Image

AUGMENTATIONS = ("center_crop", "random_crop", "none")
Tokenizer = Callable[[list[str]], dict[str, Any]]


def _check_common(source, batch_size, seed, process_index, process_count, num_epochs, worker_count):
    if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
        raise ValueError(f"source must be a random-access source (len and []), got {type(source).__name__}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (per process), got {batch_size!r}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if not isinstance(process_count, (int, np.integer)) or process_count < 1:
        raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    if len(source) < process_count:
        raise ValueError(f"source has {len(source)} examples, fewer than process_count={process_count}")
    if num_epochs is not None and (not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1):
        raise ValueError(f"num_epochs must be None (forever) or a positive int, got {num_epochs!r}")
    if not isinstance(worker_count, (int, np.integer)) or worker_count < 0:
        raise ValueError(f"worker_count must be a non-negative int, got {worker_count!r}")


def _shuffled(source, *, seed, num_epochs) -> grain.MapDataset:
    return grain.MapDataset.source(source).seed(int(seed)).shuffle().repeat(num_epochs)


def _to_batches(dataset: grain.MapDataset, *, batch_size, process_index, process_count, drop_remainder,
                worker_count, read_options) -> grain.IterDataset:
    """This process's batches: its rows of each global batch of batch_size * process_count."""
    batches = dataset.batch(int(batch_size), drop_remainder=drop_remainder, batch_fn=stack_examples)
    batches = batches[int(process_index)::int(process_count)]
    iterable = batches.to_iter_dataset(read_options or _default_read_options())
    if worker_count > 0:
        # grain's worker start-up reads absl flags; outside an absl app nobody has parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Workers take batches round-robin and grain interleaves them back in order.
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(worker_count)))
    return iterable


def _default_read_options() -> grain.ReadOptions:
    # Elements are whole batches: threads prepare that many batches ahead.
    return grain.ReadOptions(num_threads=min(4, os.cpu_count() or 1), prefetch_buffer_size=4)


def stack_examples(examples: Sequence[dict]) -> dict[str, np.ndarray]:
    """Batch dicts: arrays are stacked, strings become an object array of python str."""
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if isinstance(values[0], str):
            strings = np.empty(len(values), dtype=object)
            strings[:] = values
            batch[key] = strings
        else:
            batch[key] = np.stack(values)
    return batch


class BatchView(grain.DatasetIterator):
    """A checkpointable view of a batch iterator: each batch goes through `map_batch`, and the
    state is the parent's, so the view resumes exactly where its parent does."""

    def __next__(self) -> dict[str, np.ndarray]:
        return self.map_batch(next(self._parent))

    def map_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


# ---------------------------------------------------------------------------------------------
# Images and captions.

def _as_text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0:
        return _as_text(value.item())
    return str(value)


def _rgb_uint8(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or image.dtype != np.uint8:
        raise ValueError(f"example image must be uint8 (H, W, 1|3|4), got {image.dtype} {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    return image


def prepare_example(example: dict) -> dict:
    """Source example -> {"image": uint8 HWC RGB, "caption": str, numeric fields as numpy scalars}.

    String fields other than the caption (file names, keys) are dropped: batches
    carry only what a training step can use.
    """
    if "image" not in example or "caption" not in example:
        raise ValueError(f"examples must have 'image' and 'caption', got keys {sorted(example)}")
    prepared = {"image": _rgb_uint8(example["image"]), "caption": _as_text(example["caption"])}
    for key, value in example.items():
        if key in prepared:
            continue
        array = np.asarray(value)
        if array.dtype.kind in "iub":
            prepared[key] = array.astype(np.int32)
        elif array.dtype.kind == "f":
            prepared[key] = array.astype(np.float32)
    return prepared


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def crop_and_resize(image: np.ndarray, image_size: int, augment: str, rng: np.random.Generator | None,
                    crop_scale: tuple[float, float] = (0.75, 1.0)) -> np.ndarray:
    """uint8 (image_size, image_size, 3) view of an image.

    center_crop: the central square, resized. random_crop: a square whose side is
    a uniform fraction in `crop_scale` of the shorter side, at a uniform
    position, resized. none: the whole image resized (squashed if not square).
    """
    height, width = image.shape[:2]
    if augment == "none":
        return _resize(image, image_size)
    short = min(height, width)
    if augment == "center_crop":
        side, top, left = short, (height - short) // 2, (width - short) // 2
    else:
        side = max(1, int(round(short * rng.uniform(*crop_scale))))
        top = int(rng.integers(height - side + 1))
        left = int(rng.integers(width - side + 1))
    return _resize(np.ascontiguousarray(image[top:top + side, left:left + side]), image_size)


class _ImageTransform(grain.transforms.RandomMap):
    def __init__(self, image_size, augment, random_flip, crop_scale):
        self.image_size, self.augment = image_size, augment
        self.random_flip, self.crop_scale = random_flip, crop_scale

    def random_map(self, example, rng):
        example = prepare_example(example)
        image = crop_and_resize(example["image"], self.image_size, self.augment, rng, self.crop_scale)
        if self.random_flip and rng.random() < 0.5:
            image = image[:, ::-1]
        example["image"] = image.astype(np.float32) / 127.5 - 1.0
        return example


class _Tokenize(grain.transforms.Map):
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def map(self, batch):
        captions = list(batch["caption"])
        tokens = self.tokenizer(captions)
        for key, value in tokens.items():
            value = np.asarray(value)
            if value.ndim < 1 or value.shape[0] != len(captions):
                raise ValueError(f"tokenizer output {key!r} must have {len(captions)} rows, got shape {value.shape}")
            batch[key] = value.astype(np.int32) if value.dtype.kind in "iub" else value
        return batch


def make_image_text_iterator(source, *, batch_size: int, seed: int, process_index: int = 0,
                             process_count: int = 1, image_size: int, augment: str = "center_crop",
                             random_flip: bool = False, tokenizer: Tokenizer | None = None,
                             num_epochs: int | None = None, worker_count: int = 0,
                             drop_remainder: bool = True, crop_scale: tuple[float, float] = (0.75, 1.0),
                             read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
    """This process's batches of an image-caption source (e.g. `builder.as_data_source("train")`).

    Batches: "image" float32 (B, image_size, image_size, 3) in [-1, 1],
    "caption" object array of str, the tokenizer's arrays as int32 when a
    tokenizer is given (called once per batch with the list of captions), and
    the source's numeric fields (e.g. the `shapes` attribute ids) as int32.
    `random_flip` mirrors left-right, which contradicts captions that say
    "left"/"right" (as `shapes` captions do).
    """
    _check_common(source, batch_size, seed, process_index, process_count, num_epochs, worker_count)
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    low, high = crop_scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale!r}")
    if tokenizer is not None and not callable(tokenizer):
        raise ValueError(f"tokenizer must be a callable list[str] -> dict of arrays, got {tokenizer!r}")
    dataset = _shuffled(source, seed=seed, num_epochs=num_epochs)
    dataset = dataset.random_map(_ImageTransform(int(image_size), augment, bool(random_flip), (low, high)))
    batches = _to_batches(dataset, batch_size=batch_size, process_index=process_index,
                          process_count=process_count, drop_remainder=drop_remainder,
                          worker_count=worker_count, read_options=read_options)
    if tokenizer is not None:
        batches = batches.map(_Tokenize(tokenizer))
    return iter(batches)


# ---------------------------------------------------------------------------------------------
# Embeddings.

def _embedding_example(example: dict) -> dict:
    prepared = {}
    for key, value in example.items():
        if isinstance(value, (str, bytes)):
            prepared[key] = _as_text(value)
            continue
        array = np.asarray(value)
        if key == "text_mask":
            prepared[key] = array.astype(bool)
        elif array.dtype.kind == "f":
            prepared[key] = array.astype(np.float32)
        else:
            prepared[key] = array
    return prepared


def make_embedding_iterator(source, *, batch_size: int, seed: int, process_index: int = 0,
                            process_count: int = 1, num_epochs: int | None = None, worker_count: int = 0,
                            drop_remainder: bool = True,
                            read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
    """This process's batches of an `EmbeddingSource`.

    Batches: "image_embed", "text_embed" float32 (B, D); "text_encodings"
    float32 (B, L, W) and "text_mask" bool (B, L) when stored; "caption" object
    array of str when stored.
    """
    _check_common(source, batch_size, seed, process_index, process_count, num_epochs, worker_count)
    dataset = _shuffled(source, seed=seed, num_epochs=num_epochs).map(_embedding_example)
    batches = _to_batches(dataset, batch_size=batch_size, process_index=process_index,
                          process_count=process_count, drop_remainder=drop_remainder,
                          worker_count=worker_count, read_options=read_options)
    return iter(batches)
