"""The CLIP stage: contrastive training from scratch, and the embedding export.

  task = make_task(config, workdir)          # `dalle2-jax train clip`, through training.loop
  model, variables, tokenizer, config = load_clip(workdir)
  run_embed(clip_dir=workdir, data="shapes", out_dir=...)   # `dalle2-jax embed`

Captions are tokenized by a byte-level BPE trained on the training captions,
saved in <workdir>/tokenizer/ and reused on resume. The loss is CLIP's
symmetric InfoNCE over the global batch: under jit the batch is one array
sharded over the mesh, so every example meets every other as a negative (with
`grad_accum_steps > 1`, those of its micro-batch). On `shapes` the evaluation is
zero-shot: every image is scored against the 18 captions "a {colour} {shape}"
and the colour and shape of the best caption are counted separately, on `test`
and on `test_unseen` (the colour-shape pairs never seen in training).

Images take one path everywhere: a square of `config.data.image_size` on the
host (`data.pipeline.crop_and_resize`), then `preprocess_images` to the
model's size and normalisation inside the jitted function, so training,
evaluation, export and the pipeline's `encode_image` see the same pixels.
"""
from __future__ import annotations

import concurrent.futures
import functools
import glob
import json
import os
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from tqdm.auto import tqdm

from dalle2_jax import checkpoint, sharding
from dalle2_jax.data import embeddings, folders, pipeline, shapes, webdataset
from dalle2_jax.models.clip import CLIP, clip_contrastive_loss, exp_logit_scale, normalize, preprocess_images
from dalle2_jax.tokenizer import TOKENIZER_FILE, Tokenizer, train_bpe_tokenizer

DATA_NAMES = ("shapes", "folder", "webdataset")
CONFIG_FILE = "config.json"  # written into the workdir by training.loop
TOKENIZER_SUBDIR = "tokenizer"
TRAIN_KEYS = ("image", "input_ids", "attention_mask")
EVAL_SPLITS = ("test", "test_unseen")
ZERO_SHOT_TEMPLATE = "a {colour} {shape}"
_CAPTION_CHUNK = 4096  # examples read at once when collecting captions


def zero_shot_captions() -> list[str]:
    """The 18 captions of the zero-shot evaluation, colour-major: index = colour * 3 + shape."""
    return [ZERO_SHOT_TEMPLATE.format(colour=colour, shape=shape)
            for colour in shapes.COLOUR_NAMES for shape in shapes.SHAPES]


def zero_shot_counts(scores: jax.Array, colour_ids: jax.Array, shape_ids: jax.Array,
                     valid: jax.Array) -> jax.Array:
    """float32 (4,): rows whose best caption has the right colour, the right shape, both; valid rows.

    `scores` (B, 18) are against `zero_shot_captions()`; padding rows have `valid` False.
    """
    best = jnp.argmax(scores, axis=-1)
    valid = valid.astype(bool)
    colour_hit = (best // len(shapes.SHAPES) == colour_ids) & valid
    shape_hit = (best % len(shapes.SHAPES) == shape_ids) & valid
    return jnp.stack([colour_hit.sum(), shape_hit.sum(), (colour_hit & shape_hit).sum(), valid.sum()]
                     ).astype(jnp.float32)


def zero_shot_metrics(counts) -> dict[str, float]:
    colour, shape, both, total = (float(c) for c in np.asarray(counts))
    return {"colour_acc": colour / total, "shape_acc": shape / total, "acc": both / total}


def clip_pixels(model: CLIP, images: jax.Array) -> jax.Array:
    """uint8 or [-1, 1] float NHWC images -> the model's input (its size, CLIP-normalised)."""
    return preprocess_images(images, model.image_size, model.image_mean, model.image_std)


def encode_batch(model: CLIP, variables, images, input_ids, attention_mask) -> dict[str, jax.Array]:
    """What the embedding datasets hold: unit-norm image and text embeddings, the text encodings
    (float16) and their mask (bool)."""
    image = model.apply(variables, clip_pixels(model, images), method=CLIP.encode_image)
    text = model.apply(variables, input_ids, attention_mask, method=CLIP.encode_text)
    return {"image_embed": normalize(image.embeds), "text_embed": normalize(text.embeds),
            "text_encodings": text.encodings.astype(jnp.float16), "text_mask": text.mask.astype(bool)}


# ---------------------------------------------------------------------------------------------
# Data.

def default_data_dir(workdir: str | os.PathLike) -> str:
    """<workdir>/../data: stages side by side in one run directory share their built datasets."""
    return os.path.join(os.path.dirname(os.path.abspath(os.fspath(workdir))), "data")


def build_dataset(data_config, data_dir: str) -> tfds.core.DatasetBuilder:
    """Prepare (or reuse) the tfds build `data_config` names under `data_dir`."""
    name = data_config.get("name", "shapes")
    if name == "shapes":
        return shapes.build_shapes(
            data_dir, image_size=int(data_config.image_size), seed=int(data_config.seed),
            num_train=int(data_config.num_train), num_test=int(data_config.num_test),
            num_test_unseen=int(data_config.num_test_unseen))
    if name not in DATA_NAMES:
        raise ValueError(f"config.data.name: expected one of {DATA_NAMES}, got {name!r}")
    source = data_config.get("source", "")
    if not source:
        raise ValueError(f"config.data.source: expected the {name} directory for data.name={name!r}, got ''")
    if not os.path.exists(source):
        raise FileNotFoundError(f"config.data.source: no such file or directory {source!r}")
    if name == "folder":
        return folders.build_image_folder(source, data_dir)
    return webdataset.build_webdataset(source, data_dir)


def _check_split(builder, split: str, argument: str = "split") -> None:
    if split not in builder.info.splits:
        raise ValueError(f"{argument}: expected one of {sorted(builder.info.splits)} for {builder.name}, "
                         f"got {split!r}")


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def read_captions(builder, split: str = "train") -> list[str]:
    """Every caption of `split`, in order, without decoding the images."""
    _check_split(builder, split)
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    captions = []
    for start in range(0, len(source), _CAPTION_CHUNK):
        items = source.__getitems__(range(start, min(start + _CAPTION_CHUNK, len(source))))
        captions.extend(_text(item["caption"]) for item in items)
    return captions


def _square(image, size: int) -> np.ndarray:
    return pipeline.crop_and_resize(np.asarray(image), size, "center_crop", None)


class KeepKeys(pipeline.BatchView):
    """A checkpointable view of a batch iterator with only `keys` (the loop makes every leaf a
    device array, so captions and unused fields stay on the host)."""

    def __init__(self, parent: grain.DatasetIterator, keys: Sequence[str]):
        super().__init__(parent)
        self.keys = tuple(keys)

    def map_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {key: batch[key] for key in self.keys}


def check_tokenizer(tokenizer: Tokenizer, model: CLIP) -> None:
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(f"tokenizer: {tokenizer.vocab_size} tokens do not fit the model's "
                         f"vocab_size {model.vocab_size}")
    if model.text_pooling == "eos" and tokenizer.eos_token_id != model.eos_token_id:
        raise ValueError(f"tokenizer: end-of-text id {tokenizer.eos_token_id} differs from the model's "
                         f"eos_token_id {model.eos_token_id}")


def _mesh_of(params) -> jax.sharding.Mesh:
    leaf_sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(leaf_sharding, jax.sharding.NamedSharding):
        return leaf_sharding.mesh
    return sharding.make_mesh(devices=jax.local_devices())


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# ---------------------------------------------------------------------------------------------
# Training.

class CLIPTask:
    """`training.task.Task` of the CLIP stage; see the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None, *,
                 planning: bool = False):
        data_config = config.get("data")
        if data_config is None:
            raise ValueError("config.data: required (see configs/clip.py)")
        if data_config.get("name", "shapes") not in DATA_NAMES:
            raise ValueError(f"config.data.name: expected one of {DATA_NAMES}, got {data_config.name!r}")
        if not planning and not data_config.get("data_dir") and workdir is None:
            raise ValueError("config.data.data_dir: required when no workdir is given "
                             "(the default is <workdir>/../data)")
        self.config = config
        self.workdir = None if workdir is None else os.fspath(workdir)
        self.model = CLIP(**config.model)
        self._builder = None
        self._tokenizer = None
        self._eval_sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._eval_fns: dict[Any, Any] = {}

    @property
    def data_dir(self) -> str:
        return self.config.data.get("data_dir") or default_data_dir(self.workdir)

    @property
    def builder(self) -> tfds.core.DatasetBuilder:
        if self._builder is None:
            self._builder = build_dataset(self.config.data, self.data_dir)
            _check_split(self._builder, "train", "config.data")
        return self._builder

    @property
    def tokenizer(self) -> Tokenizer:
        """<workdir>/tokenizer when it exists, else a BPE trained on the training captions (and saved there)."""
        if self._tokenizer is None:
            directory = None if self.workdir is None else os.path.join(self.workdir, TOKENIZER_SUBDIR)
            if jax.process_count() > 1:
                # Built before the ordered block below: preparing it is itself ordered (process 0
                # first), and the two orderings must not nest.
                self.builder  # noqa: B018
            with sharding.process_zero_first("tokenizer"):
                if directory is not None and os.path.isfile(os.path.join(directory, TOKENIZER_FILE)):
                    tokenizer = Tokenizer.from_dir(directory, context_length=self.model.context_length)
                else:
                    tokenizer = train_bpe_tokenizer(read_captions(self.builder, "train"),
                                                    vocab_size=int(self.config.tokenizer.vocab_size),
                                                    context_length=self.model.context_length)
                    if directory is not None and jax.process_index() == 0:
                        tokenizer.save(directory)
            check_tokenizer(tokenizer, self.model)
            self._tokenizer = tokenizer
        return self._tokenizer

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batches `train_iterator` yields (the keys of TRAIN_KEYS)."""
        size, length = int(self.config.data.image_size), self.model.context_length
        return {"image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
                "input_ids": jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
                "attention_mask": jax.ShapeDtypeStruct((batch_size, length), jnp.int32)}

    def init_params(self, rng, batch):
        pixels = clip_pixels(self.model, batch["image"])
        return self.model.init(rng, batch["input_ids"], pixels, batch["attention_mask"])["params"]

    def loss(self, params, batch, rng, *, train: bool = True):
        del rng, train  # no dropout, no on-device augmentation
        out = self.model.apply({"params": params}, batch["input_ids"], clip_pixels(self.model, batch["image"]),
                               batch["attention_mask"])
        loss = clip_contrastive_loss(out.image.embeds, out.text.embeds, out.logit_scale,
                                     self.model.max_logit_scale)
        labels = jnp.arange(out.logits_per_image.shape[0])
        metrics = {
            "image_to_text_acc": jnp.mean(jnp.argmax(out.logits_per_image, axis=-1) == labels),
            "text_to_image_acc": jnp.mean(jnp.argmax(out.logits_per_text, axis=-1) == labels),
            "logit_scale": exp_logit_scale(out.logit_scale, self.model.max_logit_scale),
        }
        return loss, metrics

    def train_iterator(self, *, seed: int, process_index: int, process_count: int, per_process_batch: int):
        data = self.config.data
        iterator = pipeline.make_image_text_iterator(
            self.builder.as_data_source("train"), batch_size=per_process_batch, seed=seed,
            process_index=process_index, process_count=process_count, image_size=int(data.image_size),
            augment=data.get("augment", "center_crop"), random_flip=bool(data.get("random_flip", False)),
            tokenizer=self.tokenizer, worker_count=int(data.get("worker_count", 0)))
        return KeepKeys(iterator, TRAIN_KEYS)

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, params, *, step: int, workdir: str) -> dict[str, float]:
        """Zero-shot colour/shape accuracy on `test` and `test_unseen` (shapes data only)."""
        del step, workdir
        if self.config.data.get("name", "shapes") != "shapes":
            return {}
        metrics = {}
        for split in EVAL_SPLITS:
            counts = self.split_counts(params, split)
            metrics.update({f"{split}/{name}": value for name, value in zero_shot_metrics(counts).items()})
        return metrics

    def _eval_set(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This process's share of the first `config.eval.num_examples` of `split`:
        (uint8 squares, colour ids, shape ids), decoded once."""
        if split not in self._eval_sets:
            _check_split(self.builder, split)
            source = self.builder.as_data_source(split)
            count = min(int(self.config.eval.num_examples), len(source))
            items = source.__getitems__(range(jax.process_index(), count, jax.process_count()))
            size = int(self.config.data.image_size)
            images = np.stack([_square(item["image"], size) for item in items]) if items else \
                np.zeros((0, size, size, 3), np.uint8)
            colours = np.array([item["colour"] for item in items], np.int32)
            kinds = np.array([item["shape"] for item in items], np.int32)
            self._eval_sets[split] = (images, colours, kinds)
        return self._eval_sets[split]

    def _eval_fn(self, mesh):
        if mesh not in self._eval_fns:
            def counts_fn(params, batch, caption_ids, caption_mask):
                variables = {"params": params}
                image = self.model.apply(variables, clip_pixels(self.model, batch["image"]),
                                         method=CLIP.encode_image)
                text = self.model.apply(variables, caption_ids, caption_mask, method=CLIP.encode_text)
                scores = normalize(image.embeds) @ normalize(text.embeds).T
                return zero_shot_counts(scores, batch["colour"], batch["shape"], batch["valid"])

            self._eval_fns[mesh] = jax.jit(counts_fn, out_shardings=sharding.replicated(mesh))
        return self._eval_fns[mesh]

    def split_counts(self, params, split: str) -> np.ndarray:
        """`zero_shot_counts` summed over the evaluated examples of `split` (all processes)."""
        images, colours, kinds = self._eval_set(split)
        mesh = _mesh_of(params)
        local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        total = min(int(self.config.eval.num_examples), int(self.builder.info.splits[split].num_examples))
        per_process = -(-total // jax.process_count())  # every process runs the same batches
        rows = _round_up(max(1, -(-int(self.config.eval.batch_size) // jax.process_count())), local_devices)
        captions = self.tokenizer(zero_shot_captions())
        counts_fn = self._eval_fn(mesh)
        counts = np.zeros(4, np.float64)
        for start in range(0, per_process, rows):
            chunk = slice(start, min(start + rows, len(images)))
            count = max(0, chunk.stop - chunk.start)
            pad = rows - count
            local = {
                "image": np.concatenate([images[chunk], np.zeros((pad, *images.shape[1:]), np.uint8)]),
                "colour": np.pad(colours[chunk], (0, pad)),
                "shape": np.pad(kinds[chunk], (0, pad)),
                "valid": np.arange(rows) < count,
            }
            counts += np.asarray(counts_fn(params, sharding.global_batch(local, mesh),
                                           captions["input_ids"], captions["attention_mask"]))
        return counts


def make_task(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None, *,
              planning: bool = False) -> CLIPTask:
    """planning=True: from the config alone (no data read), for `batch_spec`, `init_params` and `loss`
    (what `dalle2-jax plan` compiles)."""
    return CLIPTask(config, workdir, planning=planning)


# ---------------------------------------------------------------------------------------------
# Loading and export.

def _as_tuples(value):
    if isinstance(value, dict):
        return {key: _as_tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_as_tuples(item) for item in value)
    return value


def load_clip(path: str | os.PathLike) -> tuple[CLIP, dict, Tokenizer, ml_collections.ConfigDict]:
    """(model, variables {"params": ...}, tokenizer, config) of a CLIP training workdir
    (config.json, checkpoints/ with the EMA params, tokenizer/) or of a transformers CLIP directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: expected a CLIP training workdir or transformers CLIP directory, "
                                f"{path!r} is not a directory")
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"path: {path!r} has no {CONFIG_FILE}")
    try:
        with open(config_file, encoding="utf-8") as f:
            raw = json.load(f)
    except ValueError as e:
        raise ValueError(f"path: {config_file} is not valid JSON ({e})") from None
    if "text_config" in raw or "vision_config" in raw:
        from dalle2_jax.convert import hf_clip

        model, variables = hf_clip.load_hf_clip(path)
        tokenizer = hf_clip.load_hf_tokenizer(path, context_length=model.context_length)
        config = ml_collections.ConfigDict({"model": {
            field: getattr(model, field) for field in ("embed_dim", "context_length", "text_width", "image_size")}})
        return model, variables, tokenizer, config
    if not isinstance(raw.get("model"), dict):
        raise ValueError(f"path: {config_file} has no 'model' section (expected a CLIP training config)")
    config = ml_collections.ConfigDict(_as_tuples(raw))
    model = CLIP(**_as_tuples(raw["model"]))
    params = checkpoint.load_params(path)
    shape_of = lambda tree: jax.tree.map(lambda leaf: tuple(np.shape(leaf)), tree)  # noqa: E731
    ids = jax.ShapeDtypeStruct((1, model.context_length), jnp.int32)
    pixels = jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)
    expected = jax.eval_shape(model.init, jax.random.key(0), ids, pixels)["params"]
    if shape_of(dict(params)) != shape_of(dict(expected)):
        raise ValueError(f"path: the checkpoint in {path!r} does not fit the CLIP of its {CONFIG_FILE}")
    tokenizer = Tokenizer.from_dir(os.path.join(path, TOKENIZER_SUBDIR), context_length=model.context_length)
    check_tokenizer(tokenizer, model)
    return model, {"params": params}, tokenizer, config


def _embed_builder(data, data_dir: str, config) -> tfds.core.DatasetBuilder:
    if data == "shapes":
        data_config = config.get("data")
        if data_config is None or data_config.get("name") != "shapes":
            defaults = shapes.shapes_config()
            data_config = ml_collections.ConfigDict({field: getattr(defaults, field) for field in (
                "image_size", "seed", "num_train", "num_test", "num_test_unseen")})
        return build_dataset(data_config, data_dir)
    if not isinstance(data, (str, os.PathLike)) or not os.path.isdir(data):
        raise FileNotFoundError(f"data: expected 'shapes', an image folder or a webdataset shard directory, "
                                f"got {data!r}")
    if glob.glob(os.path.join(os.fspath(data), "*.tar")):
        return webdataset.build_webdataset(os.fspath(data), data_dir)
    return folders.build_image_folder(os.fspath(data), data_dir)


def run_embed(*, clip_dir, data, out_dir, data_dir=None, split: str = "train", batch_size: int = 256,
              overwrite: bool = False, progress: bool = True) -> str:
    """Write the CLIP embedding dataset of `data`'s `split` into `out_dir` (atomically); returns it.

    Row i is example i of the split: unit-norm image and text embeddings, the caption's
    token encodings (float16) and mask, the caption. `data` is "shapes" (built into
    `data_dir`, default <out_dir>/../data, with the CLIP run's shapes settings) or an
    image folder or webdataset shard directory.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    if not out_dir:
        raise ValueError(f"out_dir: expected a directory path, got {out_dir!r}")
    model, variables, tokenizer, config = load_clip(clip_dir)
    builder = _embed_builder(data, data_dir or default_data_dir(out_dir), config)
    _check_split(builder, split)
    source = builder.as_data_source(split)
    if not len(source):
        raise ValueError(f"split: {split!r} of {builder.name} has no examples")
    data_config = config.get("data")
    load_size = int(data_config.image_size) if data_config is not None else model.image_size
    mesh = sharding.make_mesh(devices=jax.local_devices())
    rows = _round_up(int(batch_size), mesh.devices.size)
    replicated, batch_sharded = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    variables = jax.device_put(variables, replicated)
    encode = jax.jit(functools.partial(encode_batch, model), in_shardings=(replicated, *[batch_sharded] * 3),
                     out_shardings=batch_sharded)

    def load(start: int):
        items = source.__getitems__(range(start, min(start + int(batch_size), len(source))))
        captions = [_text(item["caption"]) for item in items]
        images = np.stack([_square(item["image"], load_size) for item in items])
        tokens = tokenizer(captions)
        pad = rows - len(items)
        padded = [np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
                  for a in (images, tokens["input_ids"], tokens["attention_mask"])]
        return padded, captions

    starts = range(0, len(source), int(batch_size))
    with embeddings.EmbeddingWriter(out_dir, overwrite=overwrite) as writer, \
            concurrent.futures.ThreadPoolExecutor(1) as reader:
        pending = reader.submit(load, 0)
        for start in tqdm(starts, desc=f"embed {split}", unit="batch", disable=not progress):
            arrays, captions = pending.result()
            if start + int(batch_size) < len(source):
                pending = reader.submit(load, start + int(batch_size))  # read ahead while encoding
            out = jax.device_get(encode(variables, *arrays))
            count = len(captions)
            writer.add(out["image_embed"][:count], out["text_embed"][:count],
                       text_encodings=out["text_encodings"][:count], text_mask=out["text_mask"][:count],
                       captions=captions)
    return os.path.abspath(os.fspath(out_dir))
