"""The contract between the generic training loop and a stage (CLIP, prior, decoder, upsampler)."""
from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

import jax

Params = Any
Batch = dict[str, Any]


@runtime_checkable
class Task(Protocol):
    """What `dalle2_jax.training.loop.train` needs from a stage.

    `init_params` and `loss` are pure and jittable; the loop jits them with the
    shardings from `dalle2_jax.sharding`. `rng` arrives already folded with the
    step (and the micro-batch index when accumulating gradients), so a task never
    has to think about resumption. It is the same on every process: the step is
    one global program over the global batch, so device-side draws must not
    depend on the process; what each process contributes is its own share of
    the data, from `train_iterator`.
    """

    def init_params(self, rng: jax.Array, batch: Batch) -> Params:
        """Fresh parameters (cast to float32 by the loop). Runs under `jax.eval_shape` and
        `jax.jit`: `batch` is traced zeros with the global batch's shapes and dtypes."""

    def loss(self, params: Params, batch: Batch, rng: jax.Array, *, train: bool = True
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar loss to minimise (a mean over the batch's examples, so that gradient
        accumulation over micro-batches is exact) and a dict of scalar metrics to log."""

    def train_iterator(self, *, seed: int, process_index: int, process_count: int,
                       per_process_batch: int) -> Iterator[Batch]:
        """This process's share of the training data as a checkpointable grain DatasetIterator
        (get_state/set_state) of dict batches with `per_process_batch` rows; endless (repeating).
        Its shuffling depends on `seed` and its shard on `process_index` of `process_count`."""

    def evaluate(self, params: Params, *, step: int, workdir: str) -> dict[str, float]:
        """Optional. Host-side evaluation with the EMA parameters, every `config.eval_every`
        steps on every process; may write PNG grids into workdir (from process 0)."""
