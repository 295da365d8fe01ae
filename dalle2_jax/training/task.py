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
    step and the process, so a task never has to think about resumption.
    """

    def init_params(self, rng: jax.Array, batch: Batch) -> Params:
        """Fresh parameters; `batch` is one global batch (possibly abstract shapes)."""

    def loss(self, params: Params, batch: Batch, rng: jax.Array, *, train: bool = True
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar loss to minimise and a dict of scalar metrics to log."""

    def train_iterator(self, *, seed: int, process_index: int, process_count: int,
                       per_process_batch: int) -> Iterator[Batch]:
        """This process's share of the training data as a checkpointable grain iterator."""

    def evaluate(self, params: Params, *, step: int, workdir: str) -> dict[str, float]:
        """Host-side evaluation with the EMA parameters; may write PNG grids into workdir."""
