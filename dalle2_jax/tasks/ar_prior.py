"""The autoregressive prior stage: a caption's CLIP embeddings -> PCA tokens of its image's z_i.

  task = make_task(config, workdir)          # `dalle2-jax train ar_prior`, through training.loop

Data, evaluation sets, model sizes read from the data and the cosine evaluation are the
diffusion prior's (`tasks.prior`, which this task extends). What differs:

- The vocabulary: a `models.pca_quantizer.PCAQuantizer` fitted in float64 on the first
  `config.quantizer.max_rows` image/text embeddings of the training set, written to
  <workdir>/pca_quantizer.npz before the first step and read back on resume (a refit of other
  data would change what the checkpointed tokens mean). Export puts it in the pipeline beside
  the parameters, as the model's "quantizer" collection.
- Batches carry the image tokens (K,) and the z_i . z_t token, computed on the host from the
  float64 quantizer; the loss is their teacher-forced cross-entropy (`ar_prior_loss`) with the
  text dropped for `config.text_drop_prob` of the examples.
- Evaluation samples with `config.sampling` (temperature, top_p, guidance_scale,
  num_candidates) and the dot-product token drawn from the top half of its training distribution.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle2_jax import sharding
from dalle2_jax.data import embeddings, pipeline
from dalle2_jax.models import ar_prior as ar_prior_lib
from dalle2_jax.models import pca_quantizer
from dalle2_jax.tasks import prior as prior_task

log = logging.getLogger(__name__)

TOKEN_KEYS = ("image_tokens", "dot_token")


class _Tokenized:
    """A random-access source adding the quantizer's tokens of each item's embeddings."""

    def __init__(self, source, quantizer: pca_quantizer.PCAQuantizer):
        self.source, self.quantizer = source, quantizer

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        item = dict(self.source[index])
        image, text = np.asarray(item["image_embed"])[None], np.asarray(item["text_embed"])[None]
        item["image_tokens"] = self.quantizer.quantize(image)[0]
        item["dot_token"] = self.quantizer.dot_tokens(image, text)[0]
        return item


def fit_quantizer(source: embeddings.EmbeddingSource, model_config, max_rows: int) -> pca_quantizer.PCAQuantizer:
    """The quantizer of the first `max_rows` rows of `source`, read shard by shard."""
    parts = {"image_embed": [], "text_embed": []}
    remaining = max_rows
    for image_path, text_path in zip(source.paths["image_embed"], source.paths["text_embed"]):
        if remaining <= 0:
            break
        for key, path in (("image_embed", image_path), ("text_embed", text_path)):
            parts[key].append(np.asarray(np.load(path, mmap_mode="r")[:remaining], np.float64))
        remaining -= len(parts["image_embed"][-1])
    return pca_quantizer.PCAQuantizer.fit(
        np.concatenate(parts["image_embed"]), np.concatenate(parts["text_embed"]),
        num_components=int(model_config.num_components), num_buckets=int(model_config.num_buckets),
        num_dot_buckets=int(model_config.num_dot_buckets))


class ARPriorTask(prior_task.PriorTask):
    """`training.task.Task` of the AR prior stage; see the module docstring."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None):
        self.config = config
        data_config, sizes = self._open_train_data(workdir, "configs/ar_prior.py")
        self._set_sizes(data_config, sizes)
        try:
            self.model = ar_prior_lib.ARPrior(**config.model)
        except TypeError as error:
            raise ValueError(f"config.model: does not fit ARPrior ({error})") from None
        self.text_drop_prob = prior_task._check_probability(config.get("text_drop_prob", 0.1),
                                                            "config.text_drop_prob")
        self.quantizer = self._load_or_fit_quantizer(workdir)
        self.eval_dirs = self._resolve_eval_dirs(data_config.get("eval_dirs") or {})
        self._eval_rows: dict[str, dict[str, np.ndarray]] = {}
        self._sample_fns: dict[Any, Any] = {}

    def _load_or_fit_quantizer(self, workdir) -> pca_quantizer.PCAQuantizer:
        path = None if workdir is None else os.path.join(os.fspath(workdir), pca_quantizer.FILE_NAME)
        if path is not None and os.path.exists(path):
            quantizer = pca_quantizer.PCAQuantizer.load(path, "workdir")
            expected = (self.model.num_components, self.model.embed_dim, self.model.num_buckets,
                        self.model.num_dot_buckets)
            found = (*quantizer.components.shape, quantizer.num_buckets, quantizer.num_dot_buckets)
            if found != expected:
                raise ValueError(f"workdir: {path} holds a quantizer of (num_components, embed_dim, num_buckets, "
                                 f"num_dot_buckets) {found}, config.model asks for {expected}")
            return quantizer
        max_rows = prior_task._check_positive(self.config.get("quantizer", {}).get("max_rows", 200_000),
                                              "config.quantizer.max_rows")
        quantizer = fit_quantizer(self.train_source, self.model, max_rows)
        log.info("PCA of %s: %d components keep %.4f%% of the variance", self.train_dir,
                 quantizer.num_components, 100 * quantizer.explained_variance)
        if path is not None and jax.process_index() == 0:
            quantizer.save(path)
        return quantizer

    @property
    def quantizer_variables(self) -> dict[str, np.ndarray]:
        return self.quantizer.as_variables()

    # -- training -----------------------------------------------------------------------------

    def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        """The global batches `train_iterator` yields: the diffusion prior's, plus the quantizer's
        tokens of each image embedding and the bucket of its dot product with the caption's."""
        spec = super().batch_spec(batch_size)
        spec["image_tokens"] = jax.ShapeDtypeStruct((batch_size, self.quantizer.num_components), jnp.int32)
        spec["dot_token"] = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        return spec

    def init_params(self, rng, batch):
        first = jax.tree.map(lambda x: x[:1], batch)
        text_encodings, text_mask = self.text_inputs(first)
        return self.model.init(rng, first["image_tokens"][:, :-1], text_embed=first["text_embed"],
                               text_encodings=text_encodings, text_mask=text_mask,
                               dot_token=first["dot_token"])["params"]

    def loss(self, params, batch, rng, *, train: bool = True):
        text_encodings, text_mask = self.text_inputs(batch)
        loss, metrics = ar_prior_lib.ar_prior_loss(
            self.model, {"params": params}, rng, image_tokens=batch["image_tokens"], dot_token=batch["dot_token"],
            text_embed=batch["text_embed"], text_encodings=text_encodings, text_mask=text_mask,
            text_drop_prob=self.text_drop_prob if train else 0.0, train=train)
        return loss, {name: value for name, value in metrics.items() if name != "loss"}

    def train_iterator(self, *, seed: int, process_index: int, process_count: int, per_process_batch: int):
        keys = prior_task.EMBED_KEYS + (prior_task.TEXT_KEYS if self.use_text_encodings else ())
        fields = prior_task._Fields(self.train_source, keys, self.text_len)
        return pipeline.make_embedding_iterator(
            _Tokenized(fields, self.quantizer), batch_size=per_process_batch, seed=seed,
            process_index=process_index, process_count=process_count,
            worker_count=int(self.config.data.get("worker_count", 0)))

    # -- evaluation ---------------------------------------------------------------------------

    def sampling_options(self) -> dict[str, Any]:
        sampling = self.config.get("sampling") or {}
        guidance_scale = sampling.get("guidance_scale")
        return dict(temperature=float(sampling.get("temperature", 1.0)), top_p=float(sampling.get("top_p", 1.0)),
                    guidance_scale=None if guidance_scale is None or guidance_scale == 1.0 else float(guidance_scale),
                    num_candidates=prior_task._check_positive(sampling.get("num_candidates", 1),
                                                              "config.sampling.num_candidates"))

    def _sample_fn(self, mesh):
        """jit(params, rows, rng) -> unit z_i samples, batch-sharded like `rows`; compiled once per mesh."""
        if mesh not in self._sample_fns:
            options = self.sampling_options()
            quantizer = jax.tree.map(jnp.asarray, self.quantizer_variables)

            def sample(params, rows, rng):
                text_encodings, text_mask = self.text_inputs(rows)
                return ar_prior_lib.sample_image_embeddings(
                    self.model, {"params": params, "quantizer": quantizer}, rng, text_embed=rows["text_embed"],
                    text_encodings=text_encodings, text_mask=text_mask, **options)

            self._sample_fns[mesh] = jax.jit(sample, out_shardings=sharding.batch_sharding(mesh))
        return self._sample_fns[mesh]


def make_task(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> ARPriorTask:
    return ARPriorTask(config, workdir)
