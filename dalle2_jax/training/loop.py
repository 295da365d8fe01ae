"""The one training loop every stage uses: `train(task, config, workdir)`.

Per step: this process's batch from the task's grain iterator becomes one
global array (`sharding.global_batch`), and one jitted, state-donating step
computes the gradient (scanning over micro-batches when accumulating), clips,
applies AdamW, updates the EMA and returns scalar metrics. A step whose loss or
gradient norm is not finite changes nothing but `step` (which counts batches
consumed, so the data and random streams stay aligned) and `skipped_steps`;
the learning-rate schedule and EMA warm-up count applied updates only.

Config keys: seed, total_steps, batch_size (global), log_every, eval_every
(0: never), checkpoint_every (0: only at the end), keep_checkpoints,
progress_bar, mesh.{data, fsdp, min_fsdp_size}, optimizer.* (see optim.py),
ema.{decay, warmup}. `compute_dtype` is the task's business: parameters stay
float32 here and the task casts inside its loss.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dalle2_jax import checkpoint, sharding
from dalle2_jax.training import metrics as metrics_lib
from dalle2_jax.training import optim
from dalle2_jax.training.state import TrainState, create_train_state, step_key

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"


def _get(config, key, default):
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def _positive_int(config, key, default=None, *, allow_zero=False):
    value = _get(config, key, default)
    if value is None:
        raise ValueError(f"config.{key}: required, not set")
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise ValueError(f"config.{key}: expected a {'non-negative' if allow_zero else 'positive'} int, "
                         f"got {value!r}")
    return int(value)


def make_train_step(task, tx: optax.GradientTransformation, config, state_shardings: Any,
                    batch_shardings: Any, mesh: Mesh):
    """jit(step)(state, global_batch) -> (state, metrics); `state` is donated."""
    num_micro = _positive_int(config.optimizer, "grad_accum_steps", 1)
    ema_config = _get(config, "ema", {})
    decay = float(_get(ema_config, "decay", 0.9999))
    ema_warmup = bool(_get(ema_config, "warmup", True))
    schedule = optim.learning_rate_schedule(config.optimizer, int(config.total_steps))

    def loss_fn(params, batch, rng):
        loss, aux = task.loss(params, batch, rng, train=True)
        return loss, dict(aux)

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = step_key(state.rng, state.step)
        loss, task_metrics, grads = optim.accumulate_gradients(loss_fn, state.params, batch, rng, num_micro)
        grads = jax.lax.with_sharding_constraint(grads, state_shardings.params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        applied = state.step - state.skipped_steps  # updates applied before this one
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = optim.update_ema(state.ema_params, params, optim.ema_decay(applied, decay, ema_warmup))

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        skipped = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_finite(params, state.params),
            ema_params=keep_if_finite(ema_params, state.ema_params),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            skipped_steps=state.skipped_steps + skipped)
        step_metrics = {**task_metrics, "loss": loss, "grad_norm": grad_norm,
                        "learning_rate": schedule(applied), "skipped": skipped,
                        "skipped_steps": new_state.skipped_steps}
        return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), step_metrics)

    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


def mesh_from_config(config, devices=None) -> Mesh:
    """The ("data", "fsdp") mesh of `config.mesh` over `devices` (default: every device)."""
    mesh_config = _get(config, "mesh", {})
    return sharding.make_mesh(_get(mesh_config, "data", -1), _get(mesh_config, "fsdp", 1), devices)


def check_batch_size(config, mesh: Mesh, process_count: int) -> int:
    """config.batch_size, checked to split evenly over the mesh, the micro-batches and the processes."""
    batch_size = _positive_int(config, "batch_size")
    num_micro = _positive_int(config.optimizer, "grad_accum_steps", 1)
    if batch_size % (mesh.devices.size * num_micro) or batch_size % process_count:
        raise ValueError(f"config.batch_size: {batch_size} must be divisible by {mesh.devices.size} devices "
                         f"x {num_micro} grad_accum_steps (and by {process_count} processes)")
    return batch_size


def prepare_step(task, config, batch_spec: Any, mesh: Mesh, *, materialize: bool = True):
    """(state, state_shardings, batch_shardings, train_step): everything `train` runs, and what
    `dalle2-jax plan` compiles for a TPU topology (materialize=False: the state as sharded
    ShapeDtypeStructs, nothing allocated)."""
    if _get(config, "optimizer", None) is None:
        raise ValueError("config.optimizer: required (learning_rate, warmup_steps, schedule, ...), not set")
    total_steps = _positive_int(config, "total_steps")
    seed = _positive_int(config, "seed", 0, allow_zero=True)
    min_fsdp_size = int(_get(_get(config, "mesh", {}), "min_fsdp_size", sharding.DEFAULT_MIN_FSDP_SIZE))
    batch_shardings = jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch_spec)
    tx = optim.make_optimizer(config.optimizer, total_steps)
    state, state_shardings = create_train_state(task, tx, batch_spec, mesh, seed=seed, min_fsdp_size=min_fsdp_size,
                                                materialize=materialize)
    train_step = make_train_step(task, tx, config, state_shardings, batch_shardings, mesh)
    return state, state_shardings, batch_shardings, train_step


def _check_batch_spec(task, batch_spec) -> None:
    """A task's declared `batch_spec` (what `dalle2-jax plan` compiles with) must be what its
    iterator yields."""
    declared_fn = getattr(task, "batch_spec", None)
    if declared_fn is None:
        return
    batch = jax.tree.leaves(batch_spec)[0].shape[0]
    declared = jax.tree.map(lambda s: (tuple(s.shape), np.dtype(s.dtype)), declared_fn(batch))
    found = jax.tree.map(lambda s: (tuple(s.shape), np.dtype(s.dtype)), batch_spec)
    if declared != found:
        raise ValueError(f"task.batch_spec: declares {declared}, but train_iterator yields {found}")


def _batch_spec(iterator, process_count: int):
    """Global batch shapes from a peek at the first batch; the iterator is rewound."""
    # grain's Orbax handler serialises exactly these two types (a DatasetIterator's state as JSON).
    if not isinstance(iterator, (grain.DatasetIterator, grain.DataLoaderIterator)):
        raise ValueError("task.train_iterator: expected a checkpointable grain DatasetIterator "
                         f"(get_state/set_state), got {type(iterator).__name__}")
    position = iterator.get_state()
    first = next(iterator)
    iterator.set_state(position)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((np.shape(x)[0] * process_count, *np.shape(x)[1:]), np.asarray(x).dtype),
        first)


class _Preemption:
    """SIGTERM -> save and stop. Single process: a signal handler sets a flag.
    Several processes: JAX's preemption sync point, so all stop at the same step."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._flag.is_set()
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # preemption service not running
            return False

    def close(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _mean_metrics(pending: list[dict[str, jax.Array]]) -> dict[str, float]:
    host = jax.device_get(pending)
    out = {}
    for name in host[0]:
        values = np.array([m[name] for m in host], np.float64)
        if name in ("skipped_steps", "learning_rate"):
            out[name] = float(values[-1])
        elif name == "skipped":
            out[name] = float(values.sum())
        else:  # an interval mean over the steps that were not skipped
            finite = values[np.isfinite(values)]
            out[name] = float(finite.mean()) if finite.size else float("nan")
    return out


def _write_config(config, workdir: Path) -> None:
    if jax.process_index() != 0:
        return
    text = config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") else str(config)
    metrics_lib.atomic_write(workdir / CONFIG_FILE, lambda f: f.write(text.encode()))


def _init_from(task, state: TrainState, state_shardings, directory) -> TrainState:
    """The fresh state with params and EMA params from `directory`'s stage (training.init_from)."""
    from dalle2_jax.training import init_from

    stage = type(task).__module__.rsplit(".", 1)[-1]
    loaded = init_from.replace_params(state.params, init_from.stage_params(directory, stage), directory)
    params = jax.device_put(loaded, state_shardings.params)
    log.info("initialised the %s from %s", stage, directory)
    return state.replace(params=params, ema_params=jax.device_put(loaded, state_shardings.ema_params))


def train(task, config, workdir: str, *, mesh: Mesh | None = None) -> TrainState:
    """Train `task` as `config` says, checkpointing into workdir/checkpoints; resumes
    automatically from the latest checkpoint there that reads back completely (newer,
    damaged ones are renamed aside with a warning; none readable: NoReadableCheckpointError).
    Returns the final state (earlier than total_steps only when stopped by SIGTERM, after
    saving). A failed save raises checkpoint.CheckpointSaveError."""
    workdir = Path(workdir)
    total_steps = _positive_int(config, "total_steps")
    seed = _positive_int(config, "seed", 0, allow_zero=True)
    log_every = _positive_int(config, "log_every", 50)
    eval_every = _positive_int(config, "eval_every", 0, allow_zero=True)
    checkpoint_every = _positive_int(config, "checkpoint_every", 1000, allow_zero=True)
    keep_checkpoints = _positive_int(config, "keep_checkpoints", 3)
    if _get(config, "optimizer", None) is None:
        raise ValueError("config.optimizer: required (learning_rate, warmup_steps, schedule, ...), not set")
    if mesh is None:
        mesh = mesh_from_config(config)
    process_count = jax.process_count()
    batch_size = check_batch_size(config, mesh, process_count)

    workdir.mkdir(parents=True, exist_ok=True)
    _write_config(config, workdir)
    iterator = task.train_iterator(seed=seed, process_index=jax.process_index(),
                                   process_count=process_count, per_process_batch=batch_size // process_count)
    batch_spec = _batch_spec(iterator, process_count)
    _check_batch_spec(task, batch_spec)
    ckpt = checkpoint.Checkpointer(workdir / checkpoint.CHECKPOINTS_SUBDIR, keep=keep_checkpoints)
    resuming = ckpt.latest_step() is not None
    state, state_shardings, _, train_step = prepare_step(task, config, batch_spec, mesh, materialize=not resuming)
    resume_step = None
    if resuming:  # the newest checkpoint that reads back completely; newer damaged ones are set aside
        try:
            state, resume_step = ckpt.restore_latest_readable(state, iterator)
        except BaseException:
            ckpt.close()
            raise
        log.info("resumed from %s at step %d", ckpt.directory, resume_step)
    elif _get(config, "init_from", ""):
        state = _init_from(task, state, state_shardings, config.init_from)
    step = int(jax.device_get(state.step))
    last_saved = resume_step
    evaluate = getattr(task, "evaluate", None) if eval_every else None
    writer = metrics_lib.MetricsWriter(workdir, total_steps=total_steps, start_step=step,
                                       progress_bar=bool(_get(config, "progress_bar", True)))
    preemption = _Preemption()
    pending: list[dict[str, jax.Array]] = []
    interval_start, interval_start_step = time.perf_counter(), step
    try:
        while step < total_steps:
            try:
                local_batch = next(iterator)
            except StopIteration:
                raise ValueError(f"task.train_iterator: ran out of data after {step} steps; expected an "
                                 "endless (repeating) iterator") from None
            state, step_metrics = train_step(state, sharding.global_batch(local_batch, mesh))
            step += 1
            pending.append(step_metrics)
            stop = preemption.reached(step)
            if step % log_every == 0 or step == total_steps or stop:
                record = _mean_metrics(pending)
                now = time.perf_counter()
                record["steps_per_sec"] = (step - interval_start_step) / max(now - interval_start, 1e-9)
                writer.write(step, record)
                writer.progress(step, loss=record["loss"], steps_per_sec=record["steps_per_sec"])
                pending, interval_start, interval_start_step = [], now, step
            if (checkpoint_every and step % checkpoint_every == 0) or step == total_steps or stop:
                if step != last_saved:
                    ckpt.save(step, state, iterator)
                    last_saved = step
            else:
                ckpt.raise_if_save_failed()  # stop soon after a failed save, not at the next one
            if stop:
                log.warning("preempted: saved step %d in %s and stopped", step, ckpt.directory)
                break
            if evaluate is not None and step % eval_every == 0:
                eval_metrics = evaluate(state.ema_params, step=step, workdir=str(workdir))
                if eval_metrics:
                    writer.write(step, {f"eval/{name}": value for name, value in eval_metrics.items()})
        ckpt.wait()
    finally:
        preemption.close()
        writer.close()
        ckpt.close()
    return state
