"""Device mesh, sharding rules and global batches: the only place sharding is decided.

The mesh has two axes. ``data`` replicates parameters and splits the batch;
``fsdp`` splits the batch too and additionally splits every large tensor along
one of its dimensions (ZeRO-3 style), so a model too big for one device fits on
the mesh. The rules depend on shapes only, so they apply to any pytree of
arrays or ``jax.ShapeDtypeStruct`` (parameters, EMA, optimizer state alike).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Tensors smaller than this (in elements) stay replicated: splitting them saves
# little memory and costs an all-gather each use.
DEFAULT_MIN_FSDP_SIZE = 2**18

_TRUE = ("1", "true", "yes")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all devices of all processes).

    At most one size may be -1: it takes whatever the other leaves.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices: expected at least one device, got an empty list")
    sizes = {"data": data, "fsdp": fsdp}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"{name}: expected a positive int or -1, got {size!r}")
    if data == -1 and fsdp == -1:
        raise ValueError("data, fsdp: at most one mesh axis may be -1")
    n = len(devices)
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if n % known:
            raise ValueError(f"mesh: {n} devices cannot be split into axes of size {known}")
        data, fsdp = (n // known, fsdp) if data == -1 else (data, n // known)
    if data * fsdp != n:
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} must equal the {n} devices given")
    axis_types = (AxisType.Auto,) * 2
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:  # several TPU slices: "data" spans them over the data-centre network, fsdp stays inside one
        if data % slices:
            raise ValueError(f"mesh: data={data} must be a multiple of the {slices} slices")
        device_grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp), (slices, 1), devices)
        return Mesh(device_grid, BATCH_AXES, axis_types=axis_types)
    try:
        return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        # A TPU torus whose axes do not factor into the mesh's (fsdp=8 on a 4x4x4 v4 slice): split
        # physical axes, as jax.make_mesh itself does on v5e.
        device_grid = mesh_utils.create_device_mesh((data, fsdp), devices, allow_split_physical_axes=True)
        return Mesh(device_grid, BATCH_AXES, axis_types=axis_types)


def param_spec(shape: Sequence[int], fsdp_size: int, min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE) -> P:
    """The rule: replicate, except large tensors split over `fsdp` along their
    largest dimension divisible by the fsdp size (the last such one on ties)."""
    shape = tuple(shape)
    if fsdp_size <= 1 or not shape or int(np.prod(shape)) < min_fsdp_size:
        return P()
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = FSDP_AXIS
    return P(*spec)


def param_shardings(abstract_params: Any, mesh: Mesh, min_fsdp_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs (params, EMA, opt state)."""
    fsdp_size = mesh.shape[FSDP_AXIS]
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, param_spec(np.shape(leaf), fsdp_size, min_fsdp_size)),
        abstract_params)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """This process's numpy batch -> one global jax.Array per leaf, batch-sharded.

    Every process passes only its own share (global batch / process count rows);
    no process ever holds the whole global batch.
    """
    sharding = batch_sharding(mesh)
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

    def to_global(path, leaf):
        leaf = np.asarray(leaf)
        if leaf.ndim == 0 or leaf.shape[0] % local_devices:
            raise ValueError(
                f"local_batch{jax.tree_util.keystr(path)}: expected a leading batch axis divisible by "
                f"the {local_devices} local devices, got shape {leaf.shape}")
        return jax.make_array_from_process_local_data(sharding, leaf)

    return jax.tree_util.tree_map_with_path(to_global, local_batch)


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` when the environment asks for a multi-process run.

    DALLE2_DISTRIBUTED=1 forces it and =0 forbids it; otherwise it runs when a
    coordinator is configured (JAX_COORDINATOR_ADDRESS, with JAX_NUM_PROCESSES and
    JAX_PROCESS_ID where no cluster manager tells them), on a multi-host TPU slice
    (several TPU_WORKER_HOSTNAMES) or under SLURM/Open MPI with several tasks. CPU
    processes exchange their collectives through gloo. Must run before anything touches
    a JAX backend. Returns whether JAX is now running distributed.
    """
    if jax.distributed.is_initialized():
        return True
    flag = os.environ.get("DALLE2_DISTRIBUTED", "").strip().lower()
    if flag in ("0", "false", "no"):
        return False
    wanted = flag in _TRUE or bool(
        os.environ.get("JAX_COORDINATOR_ADDRESS")
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
        or int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1)
    if not wanted:
        return False
    num_processes = _env_int("JAX_NUM_PROCESSES")
    process_id = _env_int("JAX_PROCESS_ID")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"JAX_PROCESS_ID: expected an int in [0, {num_processes}), got {process_id}")
    _use_gloo_for_cpu_collectives()
    counts = {key: value for key, value in (("num_processes", num_processes), ("process_id", process_id))
              if value is not None}  # else the cluster auto-detection of jax.distributed fills them
    jax.distributed.initialize(**counts)
    logging.info("jax.distributed initialised: process %d of %d", jax.process_index(),
                 jax.process_count())
    return True


@contextlib.contextmanager
def process_zero_first(name: str):
    """Process 0 runs the block before the others (which then find and reuse what it wrote:
    a prepared dataset, a trained tokenizer); a no-op in a single-process run."""
    multi = jax.distributed.is_initialized() and jax.process_count() > 1
    if multi and jax.process_index() != 0:
        multihost_utils.sync_global_devices(name)
    yield
    if multi and jax.process_index() == 0:
        multihost_utils.sync_global_devices(name)


def _use_gloo_for_cpu_collectives() -> None:
    # Without it, CPU devices of different processes cannot run collectives at all; it changes
    # nothing on TPU or GPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an int, got {value!r}") from None
