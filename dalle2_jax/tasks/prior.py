"""The diffusion prior stage: from a caption's CLIP embeddings to its image's CLIP embedding.

  task = make_task(config, workdir)          # `dalle2-jax train prior`, through training.loop

Data are CLIP embedding directories (`data.embeddings` layout): written by
`dalle2-jax embed`, or plain clip-retrieval directories with only img_emb and
text_emb. `config.data.train_dir` ("" = <workdir>/../embeddings/train) is the
training set; each `config.data.eval_dirs.<name>` ("" = <train_dir>/../<name>,
skipped when that default does not exist) an evaluation set. A model size
(`embed_dim`, `text_encoding_dim`, `max_text_len`) left None in `config.model`
is read from the training set and written back into the config, so the
workdir's config.json rebuilds the model; a size that is set must fit the data.

Without token encodings (clip-retrieval, or `data.use_text_encodings=False`)
the prior sees one fully masked text token: it is conditioned on z_t alone,
and callers sample it the same way (`text_inputs`).

The loss is `models.prior.prior_loss`: embeddings unit-normalised and scaled
by `model.embed_scale`, uniform timesteps, the configured objective (x0, as the
paper), and the text replaced by the learned null for a fraction
`diffusion.text_drop_prob` of the examples, all drawn from the step's key.

Evaluation samples z_i for the first `eval.num_examples` captions of each
evaluation set (`diffusion.sampling_steps`, `guidance_scale`, `num_candidates`)
and reports their mean cosine similarity with the true image embedding
(`<name>/prior_cos`) next to that of the caption's own z_t (`<name>/baseline_cos`).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from dalle2_jax import diffusion, sharding
from dalle2_jax.data import embeddings, pipeline
from dalle2_jax.models import prior as prior_lib

log = logging.getLogger(__name__)

EMBED_KEYS = ("image_embed", "text_embed")
TEXT_KEYS = ("text_encodings", "text_mask")
DEFAULT_EMBEDDINGS_SUBDIR = "embeddings"


def default_train_dir(workdir: str | os.PathLike) -> str:
    """<workdir>/../embeddings/train: the demo keeps every stage's directory side by side."""
    return os.path.join(os.path.dirname(os.path.abspath(os.fspath(workdir))), DEFAULT_EMBEDDINGS_SUBDIR, "train")


def unit_norm(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class _Fields:
    """A random-access source showing only `keys` of another's items (no captions on device), the
    token encodings cut to their first `text_len` positions, which must hold every real token."""

    def __init__(self, source, keys, text_len: int | None = None):
        self.source, self.keys, self.text_len = source, tuple(keys), text_len

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        item = self.source[index]
        fields = {key: item[key] for key in self.keys}
        if self.text_len is not None and "text_mask" in fields:
            fields["text_encodings"], fields["text_mask"], cut_off = prior_lib.cut_text(
                fields["text_encodings"], fields["text_mask"], self.text_len)
            if cut_off:
                raise ValueError(f"config.data.text_len: row {index} of {self.source.directory} has real tokens "
                                 f"after the first {self.text_len}; raise it or set it to None")
        return fields


def _dataset_sizes(source: embeddings.EmbeddingSource, argument: str) -> dict[str, int | None]:
    """embed_dim, and text_len / text_width when token encodings are stored."""
    item = source[0]
    image_shape, text_shape = np.shape(item["image_embed"]), np.shape(item["text_embed"])
    if len(image_shape) != 1 or image_shape != text_shape:
        raise ValueError(f"{argument}: expected image and text embeddings of one size (D,), got img_emb rows "
                         f"{image_shape} and text_emb rows {text_shape} in {source.directory}")
    sizes = {"embed_dim": image_shape[0], "text_len": None, "text_width": None}
    if "text_encodings" in item:
        if "text_mask" not in item:
            raise ValueError(f"{argument}: {source.directory} has text_enc but no text_mask shards")
        encodings_shape = np.shape(item["text_encodings"])
        if len(encodings_shape) != 2 or np.shape(item["text_mask"]) != encodings_shape[:1]:
            raise ValueError(f"{argument}: expected text_enc rows (L, W) and text_mask rows (L,) in "
                             f"{source.directory}, got {encodings_shape} and {np.shape(item['text_mask'])}")
        sizes.update(text_len=encodings_shape[0], text_width=encodings_shape[1])
    return sizes


def _check_probability(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {value!r}")
    return float(value)


def _check_positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _mesh_of(params) -> jax.sharding.Mesh:
    leaf_sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(leaf_sharding, jax.sharding.NamedSharding):
        return leaf_sharding.mesh
    return sharding.make_mesh(devices=jax.local_devices())


def resolve_train_dir(config, workdir, config_file: str) -> tuple[Any, str]:
    """(config.data, the training embeddings directory: config.data.train_dir, else
    <workdir>/../embeddings/train), checked to exist."""
    data_config = config.get("data")
    if data_config is None:
        raise ValueError(f"config.data: required (train_dir, eval_dirs, ...; see {config_file})")
    train_dir = data_config.get("train_dir") or (None if workdir is None else default_train_dir(workdir))
    if not train_dir:
        raise ValueError("config.data.train_dir: required when no workdir is given "
                         "(the default is <workdir>/../embeddings/train)")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(f"config.data.train_dir: expected a CLIP embedding directory (`dalle2-jax "
                                f"embed` or clip-retrieval), {train_dir!r} is not a directory")
    return data_config, train_dir


class PriorTask:
    """`training.task.Task` of the prior stage; see the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None, *,
                 planning: bool = False):
        self.config = config
        if planning:  # sizes from config.model, token encodings stored: no data read
            data_config = config.get("data") or ml_collections.ConfigDict()
            self.train_dir = self.train_source = None
            sizes = planning_sizes(config)
        else:
            data_config, sizes = self._open_train_data(workdir, "configs/prior.py")
        self._set_sizes(data_config, sizes)
        self.model = prior_lib.DiffusionPrior(**config.model)

        diffusion_config = config.diffusion
        if diffusion_config.get("objective", self.model.objective) != self.model.objective:
            raise ValueError(f"config.diffusion.objective: expected model.objective {self.model.objective!r}, "
                             f"got {diffusion_config.objective!r}")
        self.schedule = diffusion.make_schedule(diffusion_config.schedule, int(diffusion_config.num_timesteps))
        self.text_drop_prob = _check_probability(diffusion_config.get("text_drop_prob", 0.1),
                                                 "config.diffusion.text_drop_prob")
        self.null_text = None
        if not self.model.learned_null_text:
            # Karlo's prior: a dropped caption is the empty caption "", as the directory's CLIP encodes it.
            if not config.get("init_from") and not planning:
                raise ValueError("config.init_from: a prior without learned null text (model.learned_null_text="
                                 "False) trains against the empty caption, which the CLIP of the pipeline it starts "
                                 "from encodes; set init_from to that pipeline or diffusers directory")
            if planning:  # the empty caption's shapes; its values do not change the compiled step
                embed = np.zeros((self.model.embed_dim,), np.float32)
                encodings = np.zeros((sizes["text_len"], self.model.text_encoding_dim), np.float32)
                mask = np.zeros((sizes["text_len"],), bool)
            else:
                from dalle2_jax.training.init_from import empty_caption_text

                embed, encodings, mask = empty_caption_text(config.init_from)
            if not self.use_text_encodings:
                encodings, mask = np.zeros((1, self.model.text_encoding_dim), np.float32), np.zeros((1,), bool)
            elif self.text_len is not None:
                encodings, mask = encodings[:self.text_len], mask[:self.text_len]
            self.null_text = (embed, encodings, mask)
        self.eval_dirs = {} if planning else self._resolve_eval_dirs(data_config.get("eval_dirs") or {})
        self._eval_rows: dict[str, dict[str, np.ndarray]] = {}
        self._sample_fns: dict[Any, Any] = {}

    # -- configuration ------------------------------------------------------------------------

    def _resolve_text_encodings(self, data_config, sizes) -> bool:
        wanted = data_config.get("use_text_encodings")
        stored = sizes["text_len"] is not None
        if wanted is None:
            wanted = stored
        elif not isinstance(wanted, bool):
            raise ValueError(f"config.data.use_text_encodings: expected None, True or False, got {wanted!r}")
        if wanted and not stored:
            raise ValueError(f"config.data.use_text_encodings: True, but {self.train_dir} stores no text_enc "
                             "(clip-retrieval layout); set it to None or False")
        data_config.use_text_encodings = bool(wanted)
        return bool(wanted)

    def _resolve_text_len(self, data_config, sizes) -> int | None:
        """The token positions the prior trains on: None = all stored ones."""
        text_len = data_config.get("text_len")
        if text_len is None or not self.use_text_encodings:
            return None
        text_len = _check_positive(text_len, "config.data.text_len")
        return text_len if text_len < sizes["text_len"] else None

    def _fill_model_sizes(self, model_config, sizes) -> None:
        """Model sizes left None come from the data; those set must fit it."""
        found = {"embed_dim": sizes["embed_dim"]}
        if self.use_text_encodings:
            found.update(text_encoding_dim=sizes["text_width"], max_text_len=sizes["text_len"])
        else:  # one masked stand-in token; its width only sizes an unused projection
            found.update(text_encoding_dim=1, max_text_len=1)
        for key, value in found.items():
            current = model_config.get(key)
            if current is None:
                model_config[key] = int(value)
            elif not self.use_text_encodings and key != "embed_dim":
                continue
            elif key == "max_text_len" and current < (self.text_len or value):
                raise ValueError(f"config.model.max_text_len: {current} is shorter than the {value}-token "
                                 f"encodings in {self.train_dir}; set it to None to read it from the data "
                                 "(or cut them with config.data.text_len)")
            elif key != "max_text_len" and current != value:
                raise ValueError(f"config.model.{key}: {current} does not match the training set's {value} "
                                 f"({self.train_dir}); set it to None to read it from the data")

    def _resolve_eval_dirs(self, eval_dirs) -> dict[str, str]:
        resolved = {}
        for name, directory in dict(eval_dirs).items():
            if directory:
                if not os.path.isdir(directory):
                    raise FileNotFoundError(f"config.data.eval_dirs.{name}: expected a CLIP embedding directory, "
                                            f"{directory!r} is not a directory")
                resolved[name] = os.path.abspath(directory)
                continue
            default = os.path.join(os.path.dirname(self.train_dir), name)
            if os.path.isdir(default):
                resolved[name] = default
            else:
                log.warning("config.data.eval_dirs.%s: no %s; that evaluation is skipped", name, default)
        return resolved

    # -- training -----------------------------------------------------------------------------

    def _open_train_data(self, workdir, config_file: str) -> tuple[Any, dict]:
        """(config.data, the sizes of the stored embeddings); sets train_dir and train_source."""
        data_config, train_dir = resolve_train_dir(self.config, workdir, config_file)
        self.train_dir = os.path.abspath(train_dir)
        self.train_source = embeddings.EmbeddingSource(self.train_dir, captions=False)
        return data_config, _dataset_sizes(self.train_source, "config.data.train_dir")

    def _set_sizes(self, data_config, sizes: dict) -> None:
        """The text inputs' settings from config.data and the data's sizes, and the model's sizes."""
        self.use_text_encodings = self._resolve_text_encodings(data_config, sizes)
        self.text_len = self._resolve_text_len(data_config, sizes)
        self.stored_text_len = sizes["text_len"]
        self._fill_model_sizes(self.config.model, sizes)

    def text_inputs(self, batch: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
        """(text_encodings, text_mask) the prior takes for a batch: the stored ones, or without
        them one masked zero token per example."""
        if self.use_text_encodings:
            return batch["text_encodings"], batch["text_mask"]
        size = batch["text_embed"].shape[0]
        return (jnp.zeros((size, 1, self.model.text_encoding_dim), jnp.float32), jnp.zeros((size, 1), bool))

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batches `train_iterator` yields."""
        dim = self.model.embed_dim
        spec = {key: jax.ShapeDtypeStruct((batch_size, dim), jnp.float32) for key in EMBED_KEYS}
        if self.use_text_encodings:
            length = self.text_len or self.stored_text_len
            spec["text_encodings"] = jax.ShapeDtypeStruct((batch_size, length, self.model.text_encoding_dim),
                                                          jnp.float32)
            spec["text_mask"] = jax.ShapeDtypeStruct((batch_size, length), jnp.bool_)
        return spec

    def init_params(self, rng, batch):
        first = jax.tree.map(lambda x: x[:1], batch)  # the parameters do not depend on the batch size
        text_encodings, text_mask = self.text_inputs(first)
        return self.model.init(rng, jnp.zeros_like(first["image_embed"], jnp.float32), jnp.zeros((1,), jnp.int32),
                               text_embed=first["text_embed"], text_encodings=text_encodings,
                               text_mask=text_mask)["params"]

    def loss(self, params, batch, rng, *, train: bool = True):
        text_encodings, text_mask = self.text_inputs(batch)
        loss, metrics = prior_lib.prior_loss(
            self.model, {"params": params}, rng, image_embed=batch["image_embed"], text_embed=batch["text_embed"],
            text_encodings=text_encodings, text_mask=text_mask, schedule=self.schedule,
            text_drop_prob=self.text_drop_prob if train else 0.0, train=train, null_text=self.null_text)
        return loss, {name: value for name, value in metrics.items() if name != "loss"}

    def train_iterator(self, *, seed: int, process_index: int, process_count: int, per_process_batch: int):
        keys = EMBED_KEYS + (TEXT_KEYS if self.use_text_encodings else ())
        return pipeline.make_embedding_iterator(
            _Fields(self.train_source, keys, self.text_len), batch_size=per_process_batch, seed=seed,
            process_index=process_index, process_count=process_count,
            worker_count=int(self.config.data.get("worker_count", 0)))

    # -- evaluation ---------------------------------------------------------------------------

    def eval_rows(self, name: str) -> dict[str, np.ndarray]:
        """The first `config.eval.num_examples` rows of evaluation set `name`, float32 / bool, read once."""
        if name not in self._eval_rows:
            if name not in self.eval_dirs:
                raise ValueError(f"name: expected one of the evaluation sets {sorted(self.eval_dirs)}, got {name!r}")
            argument = f"config.data.eval_dirs.{name}"
            source = embeddings.EmbeddingSource(self.eval_dirs[name], captions=False)
            sizes = _dataset_sizes(source, argument)
            if sizes["embed_dim"] != self.model.embed_dim:
                raise ValueError(f"{argument}: {sizes['embed_dim']}-d embeddings in {source.directory}, "
                                 f"the training set's are {self.model.embed_dim}-d")
            if self.use_text_encodings and (sizes["text_width"] != self.model.text_encoding_dim
                                            or min(sizes["text_len"], self.text_len or sizes["text_len"])
                                            > self.model.max_text_len):
                raise ValueError(f"{argument}: expected text encodings (L <= {self.model.max_text_len}, "
                                 f"{self.model.text_encoding_dim}) as the training set's, got "
                                 f"({sizes['text_len']}, {sizes['text_width']}) in {source.directory}")
            count = min(_check_positive(self.config.eval.num_examples, "config.eval.num_examples"), len(source))
            keys = EMBED_KEYS + (TEXT_KEYS if self.use_text_encodings else ())
            fields = _Fields(source, keys, self.text_len)
            items = [fields[i] for i in range(count)]
            self._eval_rows[name] = {key: np.stack([item[key] for item in items]).astype(
                bool if key == "text_mask" else np.float32) for key in keys}
        return self._eval_rows[name]

    def _sample_fn(self, mesh):
        """jit(params, rows, rng) -> unit z_i samples, batch-sharded like `rows`; compiled once per mesh."""
        if mesh not in self._sample_fns:
            diffusion_config = self.config.diffusion
            steps = _check_positive(diffusion_config.sampling_steps, "config.diffusion.sampling_steps")
            schedule = diffusion.sampler_schedule(self.schedule, steps, diffusion_config.get("sampler", "ddim"))
            guidance_scale = diffusion_config.get("guidance_scale")
            guidance_scale = None if guidance_scale is None or guidance_scale == 1.0 else float(guidance_scale)
            options = dict(schedule=schedule, steps=steps, sampler=diffusion_config.get("sampler", "ddim"),
                           guidance_scale=guidance_scale, eta=float(diffusion_config.get("eta", 0.0)),
                           num_candidates=_check_positive(diffusion_config.get("num_candidates", 1),
                                                          "config.diffusion.num_candidates"))

            def sample(params, rows, rng):
                text_encodings, text_mask = self.text_inputs(rows)
                return prior_lib.sample_image_embeddings(
                    self.model, {"params": params}, rng, text_embed=rows["text_embed"],
                    text_encodings=text_encodings, text_mask=text_mask, **options)

            self._sample_fns[mesh] = jax.jit(sample, out_shardings=sharding.batch_sharding(mesh))
        return self._sample_fns[mesh]

    def sample(self, params, rows: dict[str, np.ndarray], rng: jax.Array | None = None) -> np.ndarray:
        """Sampled unit image embeddings (N, D) for the captions in `rows` (text_embed, and the text
        encodings when used), in chunks of `config.eval.batch_size` over the mesh of `params`.
        Chunk i draws from fold_in(rng, i); rng defaults to the key of `config.eval.seed`."""
        rng = jax.random.key(int(self.config.eval.get("seed", 0))) if rng is None else rng
        mesh = _mesh_of(params)
        num_devices = mesh.devices.size
        chunk = -(-_check_positive(self.config.eval.batch_size, "config.eval.batch_size") // num_devices) * num_devices
        per_process = chunk // jax.process_count()
        first_row = jax.process_index() * per_process
        keys = ("text_embed",) + (TEXT_KEYS if self.use_text_encodings else ())
        count = len(rows["text_embed"])
        sample_fn = self._sample_fn(mesh)
        samples = []
        for index, start in enumerate(range(0, count, chunk)):
            local = {}
            for key in keys:
                part = np.asarray(rows[key][start:start + chunk])
                part = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)])  # pad: repeat the last
                local[key] = part[first_row:first_row + per_process]
            out = sample_fn(params, sharding.global_batch(local, mesh), jax.random.fold_in(rng, index))
            samples.append(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:min(chunk, count - start)])
        return np.concatenate(samples)

    def cosine_similarities(self, params, rows: dict[str, np.ndarray]) -> dict[str, float]:
        """prior_cos: mean cos(sampled z_i, z_i); baseline_cos: mean cos(z_t, z_i)."""
        image = unit_norm(rows["image_embed"])
        sampled = unit_norm(self.sample(params, rows))
        return {"prior_cos": float(np.mean(np.sum(sampled * image, axis=-1))),
                "baseline_cos": float(np.mean(np.sum(unit_norm(rows["text_embed"]) * image, axis=-1)))}

    def evaluate(self, params, *, step: int, workdir: str) -> dict[str, float]:
        del step, workdir
        metrics = {}
        for name in self.eval_dirs:
            for metric, value in self.cosine_similarities(params, self.eval_rows(name)).items():
                metrics[f"{name}/{metric}"] = value
        return metrics


def planning_sizes(config) -> dict[str, int]:
    """The training set's sizes as `config.model` states them (what `dalle2-jax plan` builds from):
    stored token encodings of max_text_len x text_encoding_dim."""
    model = config.model
    missing = [key for key in ("embed_dim", "text_encoding_dim", "max_text_len") if model.get(key) is None]
    if missing:
        raise ValueError(f"config.model.{missing[0]}: None (read from the training data); planning needs "
                         f"it set, e.g. --config.model.{missing[0]}=1024")
    return {"embed_dim": int(model.embed_dim), "text_len": int(model.max_text_len),
            "text_width": int(model.text_encoding_dim)}


def make_task(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None, *,
              planning: bool = False) -> PriorTask:
    """planning=True: from the config alone (no data read), for `dalle2-jax plan`."""
    return PriorTask(config, workdir, planning=planning)
