"""Checkpoints: the sharded training state plus each process's data-iterator position, via Orbax.

Layout: DIR/<step>/state (the TrainState pytree, OCDBT: _METADATA, _sharding,
array_metadatas/, manifest.ocdbt and the array data in ocdbt.process_*/d/) and
DIR/<step>/data_iterator (one JSON file per process, grain's Orbax handler);
DIR/<step>/_CHECKPOINT_METADATA and a commit_success.txt in the step and in each
item. Orbax writes each step into a temporary directory and renames it when
complete, so a run killed during a save leaves only earlier, complete steps
visible; a `Checkpointer` opened on the directory removes such leftovers.

A step counts as readable only when all of it reads back: every metadata file
parses, every array is read in full, the iterator state parses and applies.
`Checkpointer.restore_latest_readable` falls back past damaged steps (renamed
aside to <step>.damaged-<UTC time>, never deleted); `verify_step` checks a step
without model code; `load_params` reports a damaged file by name.
"""
from __future__ import annotations

import dataclasses
import datetime
import errno as errno_lib
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

STATE_ITEM = "state"
DATA_ITEM = "data_iterator"
CHECKPOINTS_SUBDIR = "checkpoints"
STEP_METADATA_FILE = "_CHECKPOINT_METADATA"
TREE_METADATA_FILE = "_METADATA"
COMMIT_FILE = "commit_success.txt"
DAMAGED_MARK = ".damaged-"
TMP_MARK = ".orbax-checkpoint-tmp"
# Replicated arrays smaller than this are written by one replica instead of being
# split across replicas: the split costs one compiled slice per array and device,
# far more than writing a small array once.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 4 << 20
log = logging.getLogger(__name__)


class DamagedCheckpointError(ValueError):
    """A checkpoint (or one of its files) that cannot be read completely."""

    def __init__(self, file: str | os.PathLike, reason: str, step: int | None = None):
        self.file, self.reason, self.step = Path(file), reason, step
        where = f"checkpoint step {step}: " if step is not None else ""
        super().__init__(f"{where}{self.file}: {reason}")


class NoReadableCheckpointError(ValueError):
    """Every checkpoint in a directory is damaged; `damaged` says why, step by step."""

    def __init__(self, directory: Path, damaged: Sequence[DamagedCheckpointError]):
        self.directory, self.damaged = directory, list(damaged)
        lines = "\n".join(f"  step {d.step}: {d.file}: {d.reason}" for d in self.damaged)
        super().__init__(
            f"checkpoints: none of the {len(self.damaged)} checkpoints in {directory} can be read completely:\n"
            f"{lines}\nNothing was renamed or deleted. Restore a good copy of one of them, or move them all "
            "aside to start training from scratch.")


class CheckpointSaveError(OSError):
    """A save that did not complete; the earlier checkpoints are untouched."""


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
        if jax.process_index() == 0 and self.directory.is_dir():
            for unfinished in sorted(self.directory.glob(f"*{TMP_MARK}*")):
                log.warning("removing %s: a save that never completed (the run stopped while writing it)",
                            unfinished)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=int(keep)),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=_handler_registry())
        self._pending_step: int | None = None  # an asynchronous save not yet known to be complete

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any = None) -> bool:
        """Start saving `state` (and the iterator position) as `step`; returns once the
        arrays are copied off the devices, the write continues in the background.
        A failed save (this one, or the previous one still being written) raises
        CheckpointSaveError; the steps saved before it stay as they were."""
        self.wait()
        items = {STATE_ITEM: ocp.args.PyTreeSave(state)}
        if data_iterator is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
        self._pending_step = int(step)
        try:
            saved = self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        except Exception as error:
            raise self._save_failed(error) from error
        return saved

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk; CheckpointSaveError if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._save_failed(error) from error
        self._pending_step = None

    def raise_if_save_failed(self) -> None:
        """Without blocking: CheckpointSaveError if the last asynchronous save has ended in failure.
        Single process only: processes would see the end at different steps and part ways
        (with several, the next save, which all of them make, reports the failure)."""
        if jax.process_count() > 1:
            return
        if self._pending_step is not None and not self._manager.is_saving_in_progress():
            self.wait()  # returns at once: the save has ended

    def _save_failed(self, error: Exception) -> CheckpointSaveError:
        step, self._pending_step = self._pending_step, None
        if jax.process_index() == 0:  # nothing half-written is left behind
            for leftover in self.directory.glob(f"{step}{TMP_MARK}*"):
                shutil.rmtree(leftover, ignore_errors=True)
        self._manager.reload()
        latest = self._manager.latest_step()
        kept = (f"the latest complete checkpoint is step {latest} ({self.directory / str(latest)})"
                if latest is not None else "there is no earlier checkpoint")
        failure = CheckpointSaveError(
            f"checkpoint: saving step {step} in {self.directory} failed ({type(error).__name__}: {error}); "
            f"training stopped. The partial step was removed and {kept}; fix the cause (for example free "
            "disk space) and run the same command again to resume.")
        failure.errno = getattr(error, "errno", None) or (errno_lib.EIO if isinstance(error, OSError) else None)
        return failure

    def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None) -> Any:
        """The state saved at `step` (default: latest), restored into `abstract_state`'s
        shapes and shardings; `data_iterator` (if given) is moved to the saved position.
        Raises DamagedCheckpointError (naming the file) when any of it cannot be read."""
        step = self.latest_step() if step is None else int(step)
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"step: no complete checkpoint {'' if step is None else step} in {self.directory} "
                f"(available: {self.all_steps()})")
        step_dir = self.directory / str(step)
        try:
            saved_items = check_step_files(step_dir)
        except DamagedCheckpointError as error:
            raise DamagedCheckpointError(error.file, error.reason, step) from None
        if data_iterator is not None and DATA_ITEM not in saved_items:
            raise FileNotFoundError(f"data_iterator: checkpoint {step_dir} holds no iterator state")
        args = {STATE_ITEM: ocp.args.PyTreeRestore(
            abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
        if data_iterator is not None:
            args[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
        _ignore_callbacks_of_aborted_reads()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as error:
            file, reason = _explain_read_error(step_dir, error)
            raise DamagedCheckpointError(file, reason, step) from None
        return restored[STATE_ITEM]

    def restore_latest_readable(self, abstract_state: Any, data_iterator: Any = None) -> tuple[Any, int | None]:
        """(state, step) of the newest checkpoint that reads back completely, or
        (None, None) when there is none. Newer damaged steps are logged with a
        warning (step, file, reason) and renamed aside to <step>.damaged-<time>.
        NoReadableCheckpointError, renaming nothing, when every step is damaged."""
        damaged: list[DamagedCheckpointError] = []
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(abstract_state, data_iterator, step=step)
                ok = True
            except DamagedCheckpointError as error:
                damaged.append(error)
                ok = False
            if _all_processes_agree(ok):
                for error in damaged:
                    self._set_aside(error)
                return state, step
            if ok:  # damaged on another process
                damaged.append(DamagedCheckpointError(self.directory / str(step), "unreadable on another process",
                                                      step))
        if damaged:
            raise NoReadableCheckpointError(self.directory, damaged)
        return None, None

    def _set_aside(self, damage: DamagedCheckpointError) -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        source = self.directory / str(damage.step)
        target = source.with_name(f"{damage.step}{DAMAGED_MARK}{stamp}")
        if jax.process_index() == 0:
            counter = 1
            while target.exists():  # a name ending in "_<digits>" would read as a step to Orbax
                target, counter = source.with_name(f"{damage.step}{DAMAGED_MARK}{stamp}-{counter}x"), counter + 1
            os.rename(source, target)
            log.warning("checkpoint step %d is damaged and was renamed to %s: %s: %s",
                        damage.step, target, damage.file, damage.reason)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"dalle2_jax checkpoint set aside {damage.step}")
        self._manager.reload()

    def close(self) -> None:
        try:
            self._manager.close()
        except Exception:  # a failed save is reported by save()/wait(), not again on the way out
            log.debug("closing the checkpoint manager after a failed save", exc_info=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_closed_loop_error(error) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _ignore_callbacks_of_aborted_reads() -> None:
    """When one array of a restore fails, Orbax returns and closes its event loop while
    TensorStore still completes the other reads; each completion then fails to schedule
    its callback and prints "RuntimeError: Event loop is closed" (through sys.excepthook
    or sys.unraisablehook), burying the real error under dozens of tracebacks. Drop
    exactly those; installed once, before reading, since they arrive after the read returns."""
    if getattr(sys.unraisablehook, "_ignores_closed_loop", False):
        return
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

    def unraisable_hook(unraisable):
        if not _is_closed_loop_error(unraisable.exc_value):
            previous_unraisable(unraisable)

    def except_hook(kind, error, traceback):
        if not _is_closed_loop_error(error):
            previous_except(kind, error, traceback)

    unraisable_hook._ignores_closed_loop = True
    sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook


def _all_processes_agree(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


# ---------------------------------------------------------------- reading a step completely

def _read_json(file: Path):
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpointError(file, "missing (an incomplete save or copy)") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise DamagedCheckpointError(file, f"not valid JSON ({error}; {file.stat().st_size} bytes)") from None


def _metadata_files(item_dir: Path) -> list[Path]:
    """The JSON files of an Orbax item directory (everything but the OCDBT binary data)."""
    files = [f for f in item_dir.rglob("*") if f.is_file() and (
        f.name in (TREE_METADATA_FILE, STEP_METADATA_FILE, "_sharding") or f.suffix == ".json"
        or f.parent.name == "array_metadatas")]
    return sorted(files)


def check_tree_files(item_dir: Path) -> None:
    """An Orbax PyTree directory's metadata files are all there and parse (arrays not read)."""
    if not item_dir.is_dir():
        raise DamagedCheckpointError(item_dir, "missing item directory")
    if not (item_dir / TREE_METADATA_FILE).is_file():
        raise DamagedCheckpointError(item_dir / TREE_METADATA_FILE, "missing (an incomplete save or copy)")
    for file in _metadata_files(item_dir):
        if not isinstance(_read_json(file), dict):
            raise DamagedCheckpointError(file, "corrupt (expected a JSON object)")


def check_step_files(step_dir: Path, items: Sequence[str] | None = None) -> list[str]:
    """Everything of a step but the array data: the commit markers, the step metadata,
    each item's directory and metadata files, and the iterator state (all parsed).
    `items`: those to check (default: every item the step metadata lists); returns them."""
    metadata = _read_json(step_dir / STEP_METADATA_FILE)
    if not isinstance(metadata, dict) or not isinstance(metadata.get("item_handlers", {}), dict):
        raise DamagedCheckpointError(step_dir / STEP_METADATA_FILE, "corrupt (expected a JSON object)")
    if items is None:
        items = sorted({STATE_ITEM, *metadata.get("item_handlers", {})})
    for marker in [step_dir / COMMIT_FILE, *(step_dir / item / COMMIT_FILE for item in items)]:
        if marker.parent.is_dir() and not marker.is_file():
            raise DamagedCheckpointError(marker, "missing: the save or a copy of the checkpoint did not finish")
    for item in items:
        if item == STATE_ITEM:
            check_tree_files(step_dir / item)
            continue
        item_dir = step_dir / item
        if not item_dir.is_dir():
            raise DamagedCheckpointError(item_dir, "missing item directory")
        states = sorted(item_dir.glob("process_*-of-*.json"))
        if not states:
            raise DamagedCheckpointError(item_dir, "holds no iterator state file (process_*-of-*.json)")
        for file in states:
            state = _read_json(file)
            if not isinstance(state, dict) or not state:
                raise DamagedCheckpointError(file, "corrupt (expected the iterator state as a JSON object)")
    return list(items)


_ARRAY_READ_ERROR = re.compile(r'Error reading "([^"]+)" in OCDBT database at [^"]*"[^"]*"?: ?([^\n]*)')
_VALUE_SIZE = re.compile(r"is not valid for value of size (\d+)")
_LOCAL_FILE = re.compile(r'(?:of|decoding) local file "([^"]+)"')
_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec=.*$")


def _explain_read_error(directory: Path, error: BaseException) -> tuple[Path, str]:
    """(file, reason) for an exception raised while reading a checkpoint under `directory`:
    the file TensorStore names (or, for a truncated OCDBT data file it does not name, the
    one data file of the size it reports), else `directory`."""
    messages, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        messages.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    text = "\n".join(messages)
    found = _ARRAY_READ_ERROR.search(text)
    if found is None:
        last = messages[-1].strip().splitlines()
        return directory, _TENSORSTORE_SPEC.sub("", last[0] if last else messages[-1])[:300]
    array, detail = found.group(1).split("/", 1)[0], _TENSORSTORE_SPEC.sub("", found.group(2).strip())[:300]
    size = _VALUE_SIZE.search(text)
    named = _LOCAL_FILE.search(text)
    if named is not None and Path(named.group(1)).is_file():
        file = Path(named.group(1))
    else:
        same_size = [] if size is None else [
            f for f in directory.rglob("*")
            if f.is_file() and f.parent.name == "d" and f.stat().st_size == int(size.group(1))]
        file = same_size[0] if len(same_size) == 1 else directory
    if size is not None and file != directory:
        return file, f"truncated: array {array!r} lies past the end of the {size.group(1)}-byte file ({detail})"
    return file, f"array {array!r} cannot be read ({detail})"


def read_tree(directory: str | os.PathLike, key: str | None = None, *, keys_only: bool = False) -> Any:
    """The pytree of the Orbax PyTree directory `directory` (or its top-level entry `key`;
    `keys_only`: its top-level keys) as host numpy arrays, every array read in full;
    DamagedCheckpointError naming the file when any metadata file or array cannot be read."""
    directory = Path(directory).absolute()
    check_tree_files(directory)
    try:
        return restore_host_tree(directory, key, keys_only=keys_only)
    except Exception as error:  # Orbax / TensorStore raise many kinds; all mean a file is unreadable
        raise DamagedCheckpointError(*_explain_read_error(directory, error)) from None


def verify_step(step_dir: str | os.PathLike, items: Sequence[str] | None = None) -> None:
    """Read the step `step_dir` back completely on the host, one top-level state entry
    at a time (so at most one of params / ema_params / opt_state is in memory), without
    model code; DamagedCheckpointError naming the file if any of it is unreadable."""
    step_dir = Path(step_dir).absolute()
    step = int(step_dir.name) if step_dir.name.isdigit() else None
    try:
        check_step_files(step_dir, items)
        for key in read_tree(step_dir / STATE_ITEM, keys_only=True):
            read_tree(step_dir / STATE_ITEM, key)
    except DamagedCheckpointError as error:
        raise DamagedCheckpointError(error.file, error.reason, step) from None


# ---------------------------------------------------------------- listing

@dataclasses.dataclass
class CheckpointInfo:
    """One entry of a checkpoints directory: a step, a step set aside as damaged, or an unfinished save."""
    name: str
    path: Path
    step: int
    kind: str  # "step" | "damaged" (set aside) | "unfinished" (a save that never completed)
    size_bytes: int
    saved: datetime.datetime | None
    problem: DamagedCheckpointError | None = None
    verified: bool = False


def _saved_time(path: Path) -> datetime.datetime | None:
    try:
        nanoseconds = json.loads((path / STEP_METADATA_FILE).read_text()).get("commit_timestamp_nsecs")
        if isinstance(nanoseconds, int):
            return datetime.datetime.fromtimestamp(nanoseconds / 1e9, datetime.timezone.utc)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    except OSError:
        return None


def list_checkpoints(path: str | os.PathLike, *, verify: bool = False) -> list[CheckpointInfo]:
    """The entries of a checkpoints directory (or a workdir's checkpoints/), oldest step first;
    `verify`: read each complete step back in full (`verify_step`) and record its problem."""
    directory = checkpoint_dir(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"path: no checkpoint directory at {directory}")
    infos = []
    for entry in directory.iterdir():
        if not entry.is_dir():
            continue
        name = entry.name
        if name.isdigit():
            kind, step = "step", int(name)
        elif DAMAGED_MARK in name and name.split(".", 1)[0].isdigit():
            kind, step = "damaged", int(name.split(".", 1)[0])
        elif TMP_MARK in name and name.split(".", 1)[0].isdigit():
            kind, step = "unfinished", int(name.split(".", 1)[0])
        else:
            continue
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        info = CheckpointInfo(name, entry, step, kind, size, _saved_time(entry))
        if verify and kind == "step":
            try:
                verify_step(entry)
                info.verified = True
            except DamagedCheckpointError as error:
                info.problem = error
        infos.append(info)
    return sorted(infos, key=lambda i: (i.step, i.kind != "step", i.name))


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """`path` itself when it holds step directories, else its `checkpoints/` subdirectory (a workdir)."""
    path = Path(path)
    sub = path / CHECKPOINTS_SUBDIR
    return sub if sub.is_dir() else path


def load_params(path: str | os.PathLike, *, which: str = "ema_params", step: int | None = None) -> Any:
    """One subtree of a saved TrainState ("ema_params" or "params") as host numpy arrays.

    `path` is a training workdir or its checkpoints directory. Needs no model
    code and works on any device count; for export and inference. A damaged
    checkpoint raises ValueError (DamagedCheckpointError) naming the file.
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
    state_dir = directory.absolute() / str(step) / STATE_ITEM
    try:
        check_step_files(state_dir.parent, [STATE_ITEM])
        keys = read_tree(state_dir, keys_only=True)
        if which not in keys:
            raise ValueError(f"which: checkpoint {state_dir} has no {which!r} (has {sorted(keys)})")
        return read_tree(state_dir, which)
    except DamagedCheckpointError as error:
        older = [s for s in steps if s < step]
        hint = (f"; older steps {older} may be intact: pass step=, or check them with "
                f"`dalle2-jax checkpoints {directory} --verify`" if older else "")
        raise DamagedCheckpointError(error.file, f"{error.reason} (path: {path}){hint}", step) from None


def restore_host_tree(directory: str | os.PathLike, key: str | None = None, *, keys_only: bool = False) -> Any:
    """The pytree saved in the Orbax PyTree directory `directory` (or its top-level entry `key`
    alone) as host numpy arrays; `keys_only`: just the top-level keys, nothing read."""
    directory = Path(directory).absolute()  # Orbax misreads relative paths
    _ignore_callbacks_of_aborted_reads()  # the tree metadata is read through TensorStore too
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
