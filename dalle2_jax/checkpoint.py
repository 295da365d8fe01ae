"""Checkpoints: the sharded training state plus each process's data-iterator position, via Orbax.

Layout: DIR/<step>/state (the TrainState pytree) and DIR/<step>/data_iterator
(one JSON file per process, grain's Orbax handler). Orbax writes each step into
a temporary directory and renames it when complete, so a run killed during a
save leaves only earlier, complete steps visible; a `Checkpointer` opened on
the directory removes such leftovers (in the background, finished before its
first save).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

STATE_ITEM = "state"
DATA_ITEM = "data_iterator"
CHECKPOINTS_SUBDIR = "checkpoints"
# Replicated arrays smaller than this are written by one replica instead of being
# split across replicas: the split costs one compiled slice per array and device,
# far more than writing a small array once.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 4 << 20
log = logging.getLogger(__name__)


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    default_array_handler = ocp.type_handlers.get_type_handler(jax.Array)
    array_handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES,
        array_metadata_store=getattr(default_array_handler, "_array_metadata_store", None))
    others = [(ty, ocp.type_handlers.get_type_handler(ty))
              for ty in (int, float, bytes, np.number, np.ndarray, str)]
    registry = ocp.type_handlers.create_type_handler_registry(*others, (jax.Array, array_handler))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class _ElasticIteratorHandler(grain.checkpoint.CheckpointHandler):
    """grain's handler (one JSON state per process), restoring a checkpoint written by another
    number of processes too: the input pipelines' state counts global batches and is the same in
    every process (dalle2_jax.data.pipeline), so any process's file positions every process."""

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        own = Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if own.exists():
            return super().restore(directory, item=item, args=args)
        written = sorted(Path(directory).glob("process_*-of-*.json"))
        if not written:
            raise FileNotFoundError(f"data_iterator: {directory} holds no iterator state")
        log.warning("data_iterator: %s was written by another process count; restoring every process "
                    "from %s", directory, written[0].name)
        item.set_state(json.loads(written[0].read_text()))
        item.start_prefetch()
        return item


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = _state_handler()
    registry.add(STATE_ITEM, ocp.args.PyTreeSave, state_handler)
    registry.add(STATE_ITEM, ocp.args.PyTreeRestore, state_handler)
    data_handler = _ElasticIteratorHandler()
    registry.add(DATA_ITEM, grain.checkpoint.CheckpointSave, data_handler)
    registry.add(DATA_ITEM, grain.checkpoint.CheckpointRestore, data_handler)
    return registry


class Checkpointer:
    """Save/restore TrainStates under `directory` (asynchronously), keeping the latest `keep`."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        if int(keep) < 1:
            raise ValueError(f"keep: expected a positive number of checkpoints to keep, got {keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=int(keep)),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=_handler_registry())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any = None) -> bool:
        """Start saving `state` (and the iterator position) as `step`; returns once the
        arrays are copied off the devices, the write continues in the background."""
        items = {STATE_ITEM: ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None) -> Any:
        """The state saved at `step` (default: latest), restored into `abstract_state`'s
        shapes and shardings; `data_iterator` (if given) is moved to the saved position."""
        step = self.latest_step() if step is None else int(step)
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"step: no complete checkpoint {'' if step is None else step} in {self.directory} "
                f"(available: {self.all_steps()})")
        items = {STATE_ITEM: ocp.args.PyTreeRestore(
            abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
        if data_iterator is not None:
            if not (self.directory / str(step) / DATA_ITEM).is_dir():
                raise FileNotFoundError(
                    f"data_iterator: checkpoint {self.directory / str(step)} holds no iterator state")
            items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE_ITEM]

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """`path` itself when it holds step directories, else its `checkpoints/` subdirectory (a workdir)."""
    path = Path(path)
    sub = path / CHECKPOINTS_SUBDIR
    return sub if sub.is_dir() else path


def load_params(path: str | os.PathLike, *, which: str = "ema_params", step: int | None = None) -> Any:
    """One subtree of a saved TrainState ("ema_params" or "params") as host numpy arrays.

    `path` is a training workdir or its checkpoints directory. Needs no model
    code and works on any device count; for export and inference.
    """
    if which not in ("ema_params", "params"):
        raise ValueError(f"which: expected 'ema_params' or 'params', got {which!r}")
    directory = checkpoint_dir(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"path: no checkpoint directory at {directory}")
    steps = sorted(ocp.utils.checkpoint_steps(directory))
    step = (steps[-1] if steps else None) if step is None else int(step)
    if step is None or step not in steps:
        raise FileNotFoundError(f"path: no complete checkpoint {'' if step is None else step} "
                                f"in {directory} (available: {steps})")
    state_dir = directory / str(step) / STATE_ITEM
    keys = restore_host_tree(state_dir, keys_only=True)
    if which not in keys:
        raise ValueError(f"which: checkpoint {state_dir} has no {which!r} (has {sorted(keys)})")
    return restore_host_tree(state_dir, key=which)


def restore_host_tree(directory: str | os.PathLike, key: str | None = None, *, keys_only: bool = False) -> Any:
    """The pytree saved in the Orbax PyTree directory `directory` (or its top-level entry `key`
    alone) as host numpy arrays; `keys_only`: just the top-level keys, nothing read."""
    directory = Path(directory).absolute()  # Orbax misreads relative paths
    # The handler, not a PyTreeCheckpointer: that looks for step metadata inside the item
    # directory and logs a warning on every load.
    handler = ocp.PyTreeCheckpointHandler()
    tree = handler.metadata(directory).tree
    if keys_only:
        return list(tree)
    item = tree if key is None else {key: tree[key]}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = handler.restore(directory, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=key is not None))
    return restored if key is None else restored[key]
