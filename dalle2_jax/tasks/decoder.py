"""The decoder stage: the unCLIP image decoder, conditioned on a frozen CLIP.

  task = make_task(config, workdir)          # `dalle2-jax train decoder`, through training.loop

A frozen CLIP (`config.clip_dir`, a CLIP training workdir or a transformers
CLIP directory; "" = <workdir>/../clip) encodes each batch as the iterator
yields it: one jitted program over this process's devices, with the CLIP
parameters as its argument, turns the images (at the CLIP run's load size) and
token ids into the unit-norm CLIP image embedding (CLIP's projected embedding as
it comes with `config.unit_norm_embeddings=False`, as Karlo's decoder takes it,
and the pooled text embedding too for a `model.use_text_embed` UNet), the
caption's token encodings and their mask, and the image area-downsampled to the decoder's size
(CLIP may see 64px while the decoder learns 32px). With `config.embeddings_dir`
the embeddings, token encodings and masks are read instead from the embedding
dataset that `dalle2-jax embed` wrote for the train split (row i = example i,
checked on its captions), and CLIP encodes only the evaluation conditions.
The CLIP parameters are never trained, never in the optimizer state, and never baked into the
train step as constants (a closed-over array becomes an HLO literal that XLA
constant-folds: minutes of compile for a tiny CLIP, impossible for ViT-L).
The loss noises the image and the UNet predicts the noise (and the variance
with the hybrid loss when `model.learned_variance`), with the image embedding
dropped for 10% of the examples and the caption for 50%
(`config.diffusion.drop_*_prob`, drawn from the step's key) so that
classifier-free guidance works at sampling time.

Evaluation decodes the CLIP embeddings and captions of the 18 "a {colour}
{shape}" test images (the held-out pairs from `test_unseen`) with
`dalle2_jax.sampling.decode_images`, writes workdir/samples/step_<N>.png (one
row per condition: the conditioning image, then its samples) and returns the
pixel judge's colour and shape accuracy of the samples against the
conditioning image's attributes.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from dalle2_jax import diffusion, sampling, sharding
from dalle2_jax.data import embeddings, pipeline, shapes
from dalle2_jax.models.clip import CLIP, normalize
from dalle2_jax.models.unet import UNet
from dalle2_jax.tasks import clip as clip_stage
from dalle2_jax.training import metrics as metrics_lib

SAMPLES_SUBDIR = "samples"
_CHUNK = 256  # examples read at once when looking for evaluation images


# ---------------------------------------------------------------------------------------------
# Helpers shared with the upsampler stage.

def default_stage_dir(workdir: str | os.PathLike, stage: str) -> str:
    """<workdir>/../<stage>: the demo keeps every stage's workdir side by side."""
    return os.path.join(os.path.dirname(os.path.abspath(os.fspath(workdir))), stage)


def check_data_config(config: ml_collections.ConfigDict, workdir, *, planning: bool = False) -> None:
    data_config = config.get("data")
    if data_config is None:
        raise ValueError("config.data: required (name, data_dir, image_size, ...; see configs/decoder.py)")
    if data_config.get("name", "shapes") not in clip_stage.DATA_NAMES:
        raise ValueError(f"config.data.name: expected one of {clip_stage.DATA_NAMES}, got {data_config.name!r}")
    if not planning and not data_config.get("data_dir") and workdir is None:
        raise ValueError("config.data.data_dir: required when no workdir is given (the default is <workdir>/../data)")


def downsample_images(images: jax.Array, size: int) -> jax.Array:
    """(B, H, W, C) -> (B, size, size, C): the mean of each block when `size` divides H and W
    (exact area downsampling), else antialiased bicubic."""
    batch, height, width, channels = images.shape
    if (height, width) == (size, size):
        return images
    if height % size == 0 and width % size == 0:
        blocks = images.reshape(batch, size, height // size, size, width // size, channels)
        return jnp.mean(blocks, axis=(2, 4), dtype=jnp.float32).astype(images.dtype)
    return jax.image.resize(images, (batch, size, size, channels), "bicubic", antialias=True)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images -> uint8 (rounded, clipped)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_float(images_uint8) -> np.ndarray:
    return np.asarray(images_uint8, np.float32) / 127.5 - 1.0


def mesh_of(params) -> jax.sharding.Mesh:
    leaf_sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(leaf_sharding, jax.sharding.NamedSharding):
        return leaf_sharding.mesh
    return sharding.make_mesh(devices=jax.local_devices())


def shard_rows(rows: Any, mesh: jax.sharding.Mesh) -> tuple[Any, int]:
    """Host arrays with the same value on every process -> batch-sharded global arrays, rows
    padded (by repeating the last) to a multiple of the mesh size; returns (arrays, row count)."""
    count = len(jax.tree.leaves(rows)[0])
    total = -(-count // mesh.devices.size) * mesh.devices.size
    per_process = total // jax.process_count()
    start = jax.process_index() * per_process

    def local(array):
        array = np.asarray(array)
        padded = np.concatenate([array, np.repeat(array[-1:], total - count, axis=0)])
        return padded[start:start + per_process]

    return sharding.global_batch(jax.tree.map(local, rows), mesh), count


def gather_rows(array: jax.Array, count: int) -> np.ndarray:
    """The first `count` rows of a (possibly multi-process) sharded array, on every host."""
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))[:count]


def first_examples(builder: tfds.core.DatasetBuilder, split: str, count: int) -> list[dict]:
    clip_stage._check_split(builder, split)
    source = builder.as_data_source(split)
    return list(source.__getitems__(range(min(count, len(source)))))


def eval_split(builder: tfds.core.DatasetBuilder) -> str:
    return "test" if "test" in builder.info.splits else "train"


def check_positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def check_probability(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {value!r}")
    return float(value)


def pair_examples(builder: tfds.core.DatasetBuilder) -> list[dict]:
    """An example of every (colour, shape) pair, colour-major as `tasks.clip.zero_shot_captions()`:
    from `test`, the held-out pairs from `test_unseen`; the first large one where there is one
    (a clearer picture at a small decoder size), else the first."""
    large = shapes.SIZES.index("large")
    first, first_large = {}, {}
    for split in ("test", "test_unseen"):
        clip_stage._check_split(builder, split)
        source = builder.as_data_source(split)
        pairs = set(shapes.pairs_for_split(split))
        for start in range(0, len(source), _CHUNK):
            for item in source.__getitems__(range(start, min(start + _CHUNK, len(source)))):
                key = (shapes.COLOUR_NAMES[item["colour"]], shapes.SHAPES[item["shape"]])
                first.setdefault(key, item)
                if item["size"] == large:
                    first_large.setdefault(key, item)
            if pairs <= set(first_large):
                break
    order = [(colour, shape) for colour in shapes.COLOUR_NAMES for shape in shapes.SHAPES]
    missing = [pair for pair in order if pair not in first]
    if missing:
        raise ValueError(f"config.data: the shapes test splits hold no example of {missing}; "
                         "raise data.num_test / data.num_test_unseen")
    return [first_large.get(pair, first[pair]) for pair in order]


# ---------------------------------------------------------------------------------------------
# The frozen CLIP.

def clip_conditioning(model: CLIP, image_size: int, variables, images, input_ids, attention_mask, *,
                      unit_norm: bool = True, with_text_embed: bool = False) -> dict[str, jax.Array]:
    """What the decoder is conditioned on, from [-1, 1] images at any size and their captions'
    tokens: the images area-downsampled to `image_size` ("image"), the CLIP image embeddings
    (B, D) (unit-norm, or as CLIP projects them with `unit_norm=False`: Karlo's decoder), the
    token encodings (B, L, W) float32 and their mask (B, L) bool; with `with_text_embed` the
    pooled text embeddings (B, D) too, normalised the same way."""
    image = model.apply(variables, clip_stage.clip_pixels(model, images), method=CLIP.encode_image)
    text = model.apply(variables, input_ids, attention_mask, method=CLIP.encode_text)
    embed = normalize if unit_norm else (lambda x: x.astype(jnp.float32))
    out = {"image": downsample_images(images.astype(jnp.float32), image_size),
           "image_embed": embed(image.embeds),
           "text_encodings": text.encodings.astype(jnp.float32),
           "text_mask": text.mask.astype(bool)}
    if with_text_embed:
        out["text_embed"] = embed(text.embeds)
    return out


# Module-level, so every task with the same CLIP and shapes shares one compiled program.
_clip_conditioning = jax.jit(clip_conditioning, static_argnums=(0, 1),
                             static_argnames=("unit_norm", "with_text_embed"))


class ClipEncoder:
    """`clip_conditioning` of host batches (any number of rows) over this process's devices,
    with the frozen CLIP's parameters as an argument: `encoder(images, input_ids,
    attention_mask)` -> dict of numpy arrays."""

    def __init__(self, model: CLIP, variables, image_size: int, *, unit_norm: bool = True,
                 with_text_embed: bool = False):
        self.model, self.image_size = model, int(image_size)
        self.options = {"unit_norm": bool(unit_norm), "with_text_embed": bool(with_text_embed)}
        self.mesh = sharding.make_mesh(devices=jax.local_devices())
        self.variables = jax.device_put(variables, sharding.replicated(self.mesh))

    def __call__(self, images, input_ids, attention_mask) -> dict[str, np.ndarray]:
        rows = {"images": np.asarray(images, np.float32), "input_ids": np.asarray(input_ids, np.int32),
                "attention_mask": np.asarray(attention_mask, np.int32)}
        count = len(rows["images"])
        pad = -count % self.mesh.devices.size
        rows = jax.device_put({key: np.concatenate([value, np.repeat(value[-1:], pad, axis=0)])
                               for key, value in rows.items()}, sharding.batch_sharding(self.mesh))
        out = _clip_conditioning(self.model, self.image_size, self.variables, rows["images"], rows["input_ids"],
                                 rows["attention_mask"], **self.options)
        return {key: value[:count] for key, value in jax.device_get(out).items()}


class EncodedBatches(pipeline.BatchView):
    """A checkpointable view of an image-caption batch iterator with the CLIP conditioning in
    place of the captions (the keys of `ClipEncoder`)."""

    def __init__(self, parent: grain.DatasetIterator, encoder: ClipEncoder):
        super().__init__(parent)
        self.encoder = encoder

    def map_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.encoder(batch["image"], batch["input_ids"], batch["attention_mask"])


class StoredConditioningSource:
    """Random access to example i of an image-caption split together with row i of its CLIP
    embedding dataset (`tasks.clip.run_embed` writes row i from example i): the example's
    fields plus "image_embed" (D,), "text_encodings" (L, W) and "text_mask" (L,).

    `argument` names the embedding directory in errors. The two must have the same length and
    the same captions (rows 0, the middle and the last are compared), and the stored arrays the
    widths the decoder is built for.
    """

    KEYS = ("image_embed", "text_encodings", "text_mask")

    def __init__(self, images, stored: embeddings.EmbeddingSource, *, image_embed_dim: int, text_len: int,
                 text_width: int, argument: str = "config.embeddings_dir"):
        self.images, self.stored = images, stored
        if len(stored) != len(images):
            raise ValueError(f"{argument}: holds {len(stored)} rows, the train split {len(images)} examples; "
                             "expected the `dalle2-jax embed` output of this split")
        missing = [embeddings.FIELDS[key][0] for key in self.KEYS if key not in stored.paths]
        if missing:
            raise ValueError(f"{argument}: has no {'/'.join(missing)} shards; the decoder needs the token "
                             "encodings too (written by `dalle2-jax embed`)")
        if stored.caption_paths is None:
            raise ValueError(f"{argument}: has no metadata captions to check its rows against the train split")
        first = stored[0]
        want = {"image_embed": (image_embed_dim,), "text_encodings": (text_len, text_width), "text_mask": (text_len,)}
        for key, shape in want.items():
            if first[key].shape != shape:
                raise ValueError(f"{argument}: {embeddings.FIELDS[key][0]} rows have shape {first[key].shape}, "
                                 f"the frozen CLIP gives {shape}; expected embeddings of this CLIP")
        for index in sorted({0, len(stored) // 2, len(stored) - 1}):
            caption = clip_stage._text(images[index]["caption"])
            if stored[index]["caption"] != caption:
                raise ValueError(f"{argument}: row {index} is the caption {stored[index]['caption']!r}, example "
                                 f"{index} of the train split {caption!r}; expected the embeddings of this split "
                                 "in its order")

    def __len__(self) -> int:
        return len(self.images)

    def _join(self, example, index: int) -> dict:
        row = self.stored[index]
        return {**example, **{key: row[key] for key in self.KEYS}}

    def __getitem__(self, index: int) -> dict:
        return self._join(self.images[index], int(index))

    def __getitems__(self, indices) -> list[dict]:
        indices = [int(i) for i in indices]
        return [self._join(example, i) for example, i in zip(self.images.__getitems__(indices), indices)]


_downsample_images = jax.jit(downsample_images, static_argnums=1)


class StoredBatches(pipeline.BatchView):
    """A checkpointable view of batches of a `StoredConditioningSource` with the keys of
    `ClipEncoder`: the images area-downsampled to `image_size`, the stored conditioning
    (float32 from `pipeline.prepare_example`, which turns the bool mask into int32)."""

    def __init__(self, parent: grain.DatasetIterator, image_size: int):
        super().__init__(parent)
        self.image_size = int(image_size)

    def map_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image": np.asarray(_downsample_images(batch["image"], self.image_size)),
                "image_embed": batch["image_embed"], "text_encodings": batch["text_encodings"],
                "text_mask": batch["text_mask"].astype(bool)}


# ---------------------------------------------------------------------------------------------
# The task.

class DecoderTask:
    """`training.task.Task` of the decoder stage; see the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None, *,
                 planning: bool = False):
        check_data_config(config, workdir, planning=planning)
        self.config = config
        self.workdir = None if workdir is None else os.fspath(workdir)
        self._builder = None
        self._eval_conditions = None
        self.unet = UNet(**config.model)
        if not (self.unet.use_image_embed or self.unet.use_text_encodings):
            raise ValueError("config.model: a decoder needs use_image_embed and/or use_text_encodings")
        if self.unet.use_low_res:
            raise ValueError("config.model.use_low_res: expected False for the decoder (that is an upsampler)")
        self.image_size = int(self.unet.image_size)
        unit_norm = config.get("unit_norm_embeddings", True)
        if not isinstance(unit_norm, bool):
            raise ValueError(f"config.unit_norm_embeddings: expected a bool, got {unit_norm!r}")
        self._init_diffusion(config)
        if planning:  # the conditioning shapes as config.conditioning gives them; no CLIP, no data
            self.clip_dir, self.clip, self.embeddings_dir = None, None, None
            self.load_size = int(config.data.get("image_size", 0)) or self.image_size
            return

        clip_dir = config.get("clip_dir") or (None if workdir is None else default_stage_dir(workdir, "clip"))
        if not clip_dir:
            raise ValueError("config.clip_dir: required when no workdir is given (the default is <workdir>/../clip)")
        if not os.path.isdir(clip_dir):
            raise FileNotFoundError(f"config.clip_dir: expected a CLIP training workdir or transformers CLIP "
                                    f"directory, {clip_dir!r} is not a directory")
        self.clip_dir = os.path.abspath(clip_dir)
        clip_model, clip_variables, self.tokenizer, clip_config = clip_stage.load_clip(self.clip_dir)
        self.clip = ClipEncoder(clip_model, clip_variables, self.image_size, unit_norm=unit_norm,
                                with_text_embed=self.unet.use_text_embed)
        # The conditioning shapes are the CLIP's; recorded so that config.json tells them.
        config.conditioning = ml_collections.ConfigDict(dict(
            image_embed_dim=int(clip_model.embed_dim), text_len=int(clip_model.context_length),
            text_width=int(clip_model.text_width)))
        clip_data = clip_config.get("data")
        clip_load_size = int(clip_data.image_size) if clip_data is not None else int(clip_model.image_size)
        self.load_size = int(config.data.get("image_size", 0)) or max(clip_load_size, self.image_size)
        if self.load_size < self.image_size:
            raise ValueError(f"config.data.image_size: expected at least the decoder's {self.image_size}, "
                             f"got {self.load_size}")

        self.embeddings_dir = config.get("embeddings_dir", "") or None
        self._stored_source = None
        if self.embeddings_dir is not None:
            if not os.path.isdir(self.embeddings_dir):
                raise FileNotFoundError(f"config.embeddings_dir: expected the `dalle2-jax embed` directory of the "
                                        f"train split, {self.embeddings_dir!r} is not a directory")
            if not unit_norm or self.unet.use_text_embed:
                raise ValueError("config.embeddings_dir: stored embeddings are unit-norm and give no pooled text "
                                 "embedding to the decoder; a decoder with unit_norm_embeddings=False or "
                                 "model.use_text_embed (Karlo) encodes each batch: leave embeddings_dir empty")
            # run_embed encodes the centre square of each image, unflipped.
            if config.data.get("augment", "center_crop") != "center_crop" or config.data.get("random_flip", False):
                raise ValueError("config.data.augment / random_flip: stored embeddings describe the centre crop of "
                                 "each image; expected augment='center_crop' and random_flip=False with "
                                 "config.embeddings_dir")

        stats_examples = int(config.get("image_embed_stats_examples", 0))
        if stats_examples < 0:
            raise ValueError(f"config.image_embed_stats_examples: expected >= 0, got {stats_examples}")
        if stats_examples and self.unet.use_image_embed and not config.model.get("image_embed_std", 0.0):
            mean, std = self.image_embed_stats(stats_examples)
            config.model.image_embed_mean, config.model.image_embed_std = tuple(float(m) for m in mean), std
            self.unet = UNet(**config.model)

    def _init_diffusion(self, config) -> None:
        diffusion_config = config.diffusion
        self.schedule = diffusion.make_schedule(diffusion_config.schedule, int(diffusion_config.num_timesteps))
        self.objective = diffusion_config.get("objective", "eps")
        self.drop_image_prob = check_probability(diffusion_config.get("drop_image_prob", 0.1),
                                                 "config.diffusion.drop_image_prob")
        self.drop_text_prob = check_probability(diffusion_config.get("drop_text_prob", 0.5),
                                                "config.diffusion.drop_text_prob")

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batches `train_iterator` yields: the decoder-size image and the CLIP
        conditioning of `config.conditioning`'s shapes (the keys of `clip_conditioning`)."""
        shapes_ = self.config.conditioning
        dim, length = int(shapes_.image_embed_dim), int(shapes_.text_len)
        spec = {"image": ((self.image_size, self.image_size, 3), jnp.float32), "image_embed": ((dim,), jnp.float32),
                "text_encodings": ((length, int(shapes_.text_width)), jnp.float32),
                "text_mask": ((length,), jnp.bool_)}
        if self.unet.use_text_embed:
            spec["text_embed"] = ((dim,), jnp.float32)
        return {key: jax.ShapeDtypeStruct((batch_size, *shape), dtype) for key, (shape, dtype) in spec.items()}

    @property
    def data_dir(self) -> str:
        return self.config.data.get("data_dir") or clip_stage.default_data_dir(self.workdir)

    @property
    def builder(self) -> tfds.core.DatasetBuilder:
        if self._builder is None:
            data_config = ml_collections.ConfigDict(self.config.data.to_dict())
            data_config.image_size = self.load_size
            self._builder = clip_stage.build_dataset(data_config, self.data_dir)
            clip_stage._check_split(self._builder, "train", "config.data")
        return self._builder

    def stored_source(self) -> StoredConditioningSource:
        """The train split joined with `config.embeddings_dir` (checked once, then kept)."""
        if self._stored_source is None:
            conditioning = self.config.conditioning
            self._stored_source = StoredConditioningSource(
                self.builder.as_data_source("train"), embeddings.EmbeddingSource(self.embeddings_dir),
                image_embed_dim=int(conditioning.image_embed_dim), text_len=int(conditioning.text_len),
                text_width=int(conditioning.text_width))
        return self._stored_source

    def image_embed_stats(self, count: int) -> tuple[np.ndarray, float]:
        """Mean (D,) and overall standard deviation of the CLIP image embeddings of the first
        `count` training examples, for `UNet.image_embed_mean` / `image_embed_std`."""
        if self.embeddings_dir is not None:
            stored = self.stored_source().stored
            embeds = np.stack([stored[i]["image_embed"] for i in range(min(count, len(stored)))])
        else:
            items = first_examples(self.builder, "train", count)
            chunks = []
            for start in range(0, len(items), _CHUNK):
                chunk = items[start:start + _CHUNK]
                images = np.stack([clip_stage._square(item["image"], self.load_size) for item in chunk])
                chunks.append(self.encode(images, [clip_stage._text(item["caption"]) for item in chunk])["image_embed"])
            embeds = np.concatenate(chunks)
        embeds = embeds.astype(np.float64)
        return embeds.mean(0).astype(np.float32), float(np.sqrt(max(embeds.var(0).mean(), 1e-12)))

    # -- loss ---------------------------------------------------------------------------------

    def _unet_cond(self, batch, drop_image, drop_text) -> dict[str, jax.Array]:
        cond = {}
        if self.unet.use_image_embed:
            cond.update(image_embed=batch["image_embed"], drop_image=drop_image)
        if self.unet.use_text_encodings:
            cond.update(text_encodings=batch["text_encodings"], text_mask=batch["text_mask"], drop_text=drop_text)
        if self.unet.use_text_embed:
            cond.update(text_embed=batch["text_embed"], drop_text=drop_text)
        return cond

    def init_params(self, rng, batch):
        first = jax.tree.map(lambda x: x[:1], batch)  # the parameters do not depend on the batch size
        no_drop = jnp.zeros((1,), bool)
        x = jnp.zeros((1, self.image_size, self.image_size, self.unet.out_channels), jnp.float32)
        return self.unet.init(rng, x, jnp.zeros((1,), jnp.int32), **self._unet_cond(first, no_drop, no_drop))["params"]

    def example_losses(self, params, batch, rng, *, t: jax.Array | None = None, train: bool = True
                       ) -> dict[str, jax.Array]:
        """Per-example losses of `diffusion.training_losses` ("loss", "mse", "vlb" with the learned
        variance) of an encoded batch at timesteps `t` (B,) (default: uniform draws from `rng`)."""
        x_start = batch["image"].astype(jnp.float32)
        if x_start.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"batch['image']: expected images of the decoder's size {self.image_size}, "
                             f"got shape {x_start.shape}")
        size = x_start.shape[0]
        t_key, noise_key, image_key, text_key, dropout_key = jax.random.split(rng, 5)
        if t is None:
            t = jax.random.randint(t_key, (size,), 0, self.schedule.num_timesteps)
        noise = jax.random.normal(noise_key, x_start.shape, jnp.float32)
        x_t = diffusion.q_sample(self.schedule, x_start, t, noise)
        if train:
            drop_image = jax.random.bernoulli(image_key, self.drop_image_prob, (size,))
            drop_text = jax.random.bernoulli(text_key, self.drop_text_prob, (size,))
        else:
            drop_image = drop_text = jnp.zeros((size,), bool)
        output = self.unet.apply({"params": params}, x_t, self.schedule.timesteps[t],
                                 **self._unet_cond(batch, drop_image, drop_text), train=train,
                                 rngs={"dropout": dropout_key})
        return diffusion.training_losses(
            self.schedule, output, x_start=x_start, x_t=x_t, t=t, noise=noise, objective=self.objective,
            learned_variance=self.unet.learned_variance,
            vlb_weight=float(self.config.diffusion.get("vlb_weight", 1e-3)),
            snr_gamma=float(self.config.diffusion.get("snr_gamma", 0.0)))

    def loss(self, params, batch, rng, *, train: bool = True):
        losses = self.example_losses(params, batch, rng, train=train)
        return jnp.mean(losses["loss"]), {name: jnp.mean(value) for name, value in losses.items() if name != "loss"}

    def train_iterator(self, *, seed: int, process_index: int, process_count: int, per_process_batch: int):
        data = self.config.data
        if self.embeddings_dir is not None:
            iterator = pipeline.make_image_text_iterator(
                self.stored_source(), batch_size=per_process_batch, seed=seed, process_index=process_index,
                process_count=process_count, image_size=self.load_size, augment="center_crop",
                worker_count=int(data.get("worker_count", 0)))
            return StoredBatches(iterator, self.image_size)
        iterator = pipeline.make_image_text_iterator(
            self.builder.as_data_source("train"), batch_size=per_process_batch, seed=seed,
            process_index=process_index, process_count=process_count, image_size=self.load_size,
            augment=data.get("augment", "center_crop"), random_flip=bool(data.get("random_flip", False)),
            tokenizer=self.tokenizer, worker_count=int(data.get("worker_count", 0)))
        return EncodedBatches(iterator, self.clip)

    # -- evaluation ---------------------------------------------------------------------------

    def eval_conditions(self) -> dict[str, Any]:
        """The fixed conditions of `evaluate`, built once: uint8 "images" at the load size,
        "captions", and for shapes data the "colour" / "shape" names of each image."""
        if self._eval_conditions is None:
            if self.config.data.get("name", "shapes") == "shapes":
                items = pair_examples(self.builder)
                captions = clip_stage.zero_shot_captions()
                conditions = {"colour": [shapes.COLOUR_NAMES[item["colour"]] for item in items],
                              "shape": [shapes.SHAPES[item["shape"]] for item in items]}
            else:
                count = check_positive(self.config.eval.get("num_conditions", 8), "config.eval.num_conditions")
                items = first_examples(self.builder, eval_split(self.builder), count)
                captions = [clip_stage._text(item["caption"]) for item in items]
                conditions = {}
            conditions["images"] = np.stack([clip_stage._square(item["image"], self.load_size) for item in items])
            conditions["captions"] = captions
            conditions.update(self.encode(conditions["images"], captions))
            self._eval_conditions = conditions
        return self._eval_conditions

    def encode(self, images_uint8: np.ndarray, captions: Sequence[str]) -> dict[str, np.ndarray]:
        """`clip_conditioning` of uint8 images and their captions."""
        tokens = self.tokenizer(list(captions))
        return self.clip(to_float(images_uint8), tokens["input_ids"], tokens["attention_mask"])

    def sample(self, params, image_embed, text_encodings=None, text_mask=None, *, rng,
               guidance_scale=None, steps: int | None = None, text_embed=None) -> np.ndarray:
        """Decoder samples (B, S, S, 3) in [-1, 1] for rows of conditions, batch-sharded over the
        mesh of `params` (the EMA parameters the loop passes)."""
        diffusion_config, eval_config = self.config.diffusion, self.config.eval
        mesh = mesh_of(params)
        rows = {"image_embed": np.asarray(image_embed, np.float32)}
        if self.unet.use_text_encodings and text_encodings is not None:
            rows.update(text_encodings=np.asarray(text_encodings, np.float32), text_mask=np.asarray(text_mask, bool))
        if self.unet.use_text_embed and text_embed is not None:
            rows["text_embed"] = np.asarray(text_embed, np.float32)
        rows, count = shard_rows(rows, mesh)
        kwargs = {"image_embed": rows["image_embed"]} if self.unet.use_image_embed else {}
        if "text_encodings" in rows:
            kwargs.update(text_encodings=rows["text_encodings"], text_mask=rows["text_mask"])
        if "text_embed" in rows:
            kwargs["text_embed"] = rows["text_embed"]
        samples = sampling.decode_images(
            self.unet, {"params": params}, rng, **kwargs, schedule=self.schedule,
            steps=int(steps or eval_config.sampling_steps),
            guidance_scale=float(diffusion_config.get("guidance_scale", 1.0) if guidance_scale is None
                                 else guidance_scale),
            sampler=diffusion_config.get("sampler", "ddim"), eta=float(diffusion_config.get("eta", 0.0)),
            image_size=self.image_size, objective=self.objective,
            clip_denoised=bool(diffusion_config.get("clip_denoised", True)))
        return gather_rows(samples, count)

    def evaluate(self, params, *, step: int, workdir: str) -> dict[str, float]:
        """Samples of the fixed conditions -> workdir/samples/step_<step>.png; on shapes data the
        judge's accuracy against the conditioning images (overall and on the unseen pairs)."""
        conditions = self.eval_conditions()
        per_condition = check_positive(self.config.eval.get("samples_per_condition", 2),
                                       "config.eval.samples_per_condition")
        repeat = lambda a: np.repeat(np.asarray(a), per_condition, axis=0)  # noqa: E731
        samples = to_uint8(self.sample(
            params, repeat(conditions["image_embed"]), repeat(conditions["text_encodings"]),
            repeat(conditions["text_mask"]), rng=jax.random.key(int(self.config.eval.get("seed", 0))),
            text_embed=repeat(conditions["text_embed"]) if "text_embed" in conditions else None))
        references = to_uint8(conditions["image"])
        if jax.process_index() == 0:
            rows = np.concatenate([references[:, None], samples.reshape(len(references), per_condition,
                                                                        *samples.shape[1:])], axis=1)
            metrics_lib.write_image_grid(os.path.join(workdir, SAMPLES_SUBDIR, f"step_{step}.png"),
                                         rows.reshape(-1, *samples.shape[1:]), ncols=1 + per_condition)
        if "colour" not in conditions:
            return {}
        return judge_samples(samples, repeat(conditions["colour"]), repeat(conditions["shape"]))


def judge_samples(samples_uint8: np.ndarray, colours: Sequence[str], shape_names: Sequence[str]
                  ) -> dict[str, float]:
    """`classify_shape_image` on each sample against the wanted (colour, shape): accuracies of the
    colour, the shape and both, overall and ("unseen/...") on the held-out pairs."""
    judged = [shapes.classify_shape_image(image) for image in samples_uint8]
    colour_hit = np.array([seen[0] == want for seen, want in zip(judged, colours)])
    shape_hit = np.array([seen[1] == want for seen, want in zip(judged, shape_names)])
    unseen = np.array([pair in shapes.HELD_OUT_PAIRS for pair in zip(colours, shape_names)])
    metrics = {}
    for prefix, rows in (("", np.ones_like(unseen)), ("unseen/", unseen)):
        if rows.any():
            metrics.update({f"{prefix}colour_acc": float(colour_hit[rows].mean()),
                            f"{prefix}shape_acc": float(shape_hit[rows].mean()),
                            f"{prefix}acc": float((colour_hit & shape_hit)[rows].mean())})
    return metrics


def make_task(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None, *,
              planning: bool = False) -> DecoderTask:
    """planning=True: from the config alone (no CLIP, no data), for `dalle2-jax plan`."""
    return DecoderTask(config, workdir, planning=planning)
