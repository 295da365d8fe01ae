"""The training state pytree and its sharded creation."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dalle2_jax import sharding


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator's position.

    step: int32, batches consumed so far (skipped updates included).
    rng: uint32 key data of the run's base key (see `step_key`).
    skipped_steps: int32, updates dropped because the loss or gradient was not finite.
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array
    skipped_steps: jax.Array


_INIT_STREAM, _TRAIN_STREAM = 0, 1


def init_key(base_key_data: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(base_key_data), _INIT_STREAM)


def step_key(base_key_data: jax.Array, step: jax.Array) -> jax.Array:
    """The key of training step `step`: identical on every process and every mesh.

    Device-side draws happen inside one global SPMD program, so they must not
    depend on the process; what differs per process is the data each one
    loads (see `Task.train_iterator`).
    """
    train_key = jax.random.fold_in(jax.random.wrap_key_data(base_key_data), _TRAIN_STREAM)
    return jax.random.fold_in(train_key, step)


def _to_float32(tree):
    return jax.tree.map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def abstract_batch(batch: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)


def create_train_state(task, tx: optax.GradientTransformation, batch_spec: Any, mesh: Mesh, *,
                       seed: int, min_fsdp_size: int = sharding.DEFAULT_MIN_FSDP_SIZE,
                       materialize: bool = True) -> tuple[TrainState, Any]:
    """Fresh state initialised directly into its shardings; returns (state, state_shardings).

    The shapes come from `jax.eval_shape` and the state is produced by a jit
    with `out_shardings`, so no device ever holds an unsharded copy of a large
    tensor. `batch_spec` gives the global batch's shapes (arrays or
    ShapeDtypeStructs). With `materialize=False` nothing is computed and the
    state is returned as sharded ShapeDtypeStructs (what a checkpoint restores into).
    """
    batch_spec = abstract_batch(batch_spec)

    def init():
        base_key = jax.random.key_data(jax.random.key(seed))
        batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch_spec)
        params = _to_float32(task.init_params(init_key(base_key), batch))
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params,
            ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
            rng=base_key, skipped_steps=jnp.zeros((), jnp.int32))

    abstract_state = jax.eval_shape(init)
    state_shardings = sharding.param_shardings(abstract_state, mesh, min_fsdp_size)
    if not materialize:
        return abstract_train_state(abstract_state, state_shardings), state_shardings
    return jax.jit(init, out_shardings=state_shardings)(), state_shardings


def abstract_train_state(state_or_abstract: Any, state_shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state_or_abstract, state_shardings)
