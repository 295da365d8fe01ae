"""Damaged checkpoints and failed saves: each kind of damage in the newest of three steps is
reported (step, file, reason), set aside and resumed past with a bit-identical end; all steps
damaged; ENOSPC during a save; SIGKILL during an asynchronous save; a damaged weight file
for load_params, export and from_pretrained; `dalle2-jax checkpoints [--verify]`."""
import datetime
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.path import async_path

from dalle2_jax import checkpoint, cli
from dalle2_jax.training import loop
from test_training_loop import ToyTask, toy_config, tree_equal

TOTAL, EVERY, PREEMPT_AT = 12, 3, 9  # checkpoints 3, 6, 9, preempted at 9; the resumed run ends at 12


def config(**overrides):
    return toy_config(**{"total_steps": TOTAL, "checkpoint_every": EVERY, "keep_checkpoints": 3, **overrides})


@pytest.fixture(scope="module")
def reference(devices8, tmp_path_factory):
    """The uninterrupted run's final state, on the host."""
    return jax.device_get(loop.train(ToyTask(), config(), tmp_path_factory.mktemp("reference")))


@pytest.fixture(scope="module")
def preempted(devices8, tmp_path_factory):
    """A workdir with checkpoints 3, 6 and 9 of the 12-step run (stopped by SIGTERM at 9)."""
    workdir = tmp_path_factory.mktemp("preempted")
    state = loop.train(ToyTask(sigterm_at_step=PREEMPT_AT), config(), workdir)
    assert int(state.step) == PREEMPT_AT
    assert steps_on_disk(workdir) == [3, 6, 9]
    return workdir


def steps_on_disk(workdir):
    return sorted(ocp.utils.checkpoint_steps(Path(workdir) / checkpoint.CHECKPOINTS_SUBDIR))


def copy_of(workdir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return copy


def truncate(file: Path) -> Path:
    os.truncate(file, file.stat().st_size // 2)
    return file


def largest_data_file(step_dir: Path) -> Path:
    """The largest OCDBT data file; on a tie the root database's (small arrays are stored in
    the B-tree nodes, which the root database holds a copy of; the restore reads that one)."""
    return max((f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"),
               key=lambda f: (f.stat().st_size, f.parent.parent.name == "state"))


def garble(file: Path) -> Path:
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = b"\x00\xff{[:,\"\x01"
    file.write_bytes(bytes(data))
    return file


DAMAGE = {  # name -> damage(step_dir) -> the file (or directory) the report must name
    "array_data_truncated": lambda d: truncate(largest_data_file(d)),
    "tree_metadata_truncated": lambda d: truncate(d / "state" / "_METADATA"),
    "step_metadata_garbled": lambda d: garble(d / "_CHECKPOINT_METADATA"),
    "item_directory_deleted": lambda d: (shutil.rmtree(d / "state"), d / "state")[1],
    "iterator_state_truncated": lambda d: truncate(d / "data_iterator" / "process_0-of-1.json"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_step_is_set_aside_and_run_ends_bit_identical(kind, preempted, reference, tmp_path,
                                                                      caplog):
    workdir = copy_of(preempted, tmp_path)
    step_dir = workdir / checkpoint.CHECKPOINTS_SUBDIR / str(PREEMPT_AT)
    damaged_file = DAMAGE[kind](step_dir)
    damaged_bytes = damaged_file.read_bytes() if damaged_file.is_file() else None
    with caplog.at_level(logging.WARNING, logger="dalle2_jax.checkpoint"):
        state = loop.train(ToyTask(), config(), workdir)
    assert tree_equal(jax.device_get(state), reference)  # resumed from 6: the same 12 steps, bit for bit

    warnings = [r.getMessage() for r in caplog.records if r.name == "dalle2_jax.checkpoint"]
    assert len(warnings) == 1, warnings
    assert f"step {PREEMPT_AT} is damaged" in warnings[0] and str(damaged_file) in warnings[0]
    set_aside = [p for p in (workdir / checkpoint.CHECKPOINTS_SUBDIR).iterdir() if ".damaged-" in p.name]
    assert len(set_aside) == 1 and set_aside[0].name.startswith(f"{PREEMPT_AT}.damaged-")
    assert str(set_aside[0]) in warnings[0]
    kept = set_aside[0] / damaged_file.relative_to(step_dir)  # as it was found, for inspection
    assert (kept.read_bytes() == damaged_bytes) if damaged_bytes is not None else not kept.exists()
    assert steps_on_disk(workdir) == [6, 9, 12]  # 9 and 12 written again by the resumed run


def test_every_step_damaged_is_reported_step_by_step_and_nothing_renamed(preempted, tmp_path):
    workdir = copy_of(preempted, tmp_path)
    ckpt_dir = workdir / checkpoint.CHECKPOINTS_SUBDIR
    files = {3: DAMAGE["iterator_state_truncated"](ckpt_dir / "3"),
             6: DAMAGE["tree_metadata_truncated"](ckpt_dir / "6"),
             9: DAMAGE["array_data_truncated"](ckpt_dir / "9")}
    before = sorted(p.name for p in ckpt_dir.iterdir())
    with pytest.raises(checkpoint.NoReadableCheckpointError) as raised:
        loop.train(ToyTask(), config(), workdir)
    message = str(raised.value)
    for step, file in files.items():
        assert f"step {step}: {file}" in message
    assert "truncated" in message and "not valid JSON" in message and "Nothing was renamed" in message
    assert sorted(p.name for p in ckpt_dir.iterdir()) == before
    assert [d.step for d in raised.value.damaged] == [9, 6, 3]

    # The command line: the listing names each step's problem and exits 1; load_params names the file.
    assert cli.main(["checkpoints", str(workdir)]) == 0  # without --verify nothing is read
    assert cli.main(["checkpoints", str(workdir), "--verify"]) == 1
    with pytest.raises(ValueError, match=str(files[9])):
        checkpoint.load_params(workdir)


def test_checkpoints_command_lists_sizes_times_and_verification(preempted, tmp_path, capsys):
    workdir = copy_of(preempted, tmp_path)
    bad = DAMAGE["array_data_truncated"](workdir / checkpoint.CHECKPOINTS_SUBDIR / "6")
    assert cli.main(["checkpoints", str(workdir)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert all(line.endswith("finalized (not read back)") for line in listing[2:])  # nothing read
    rows = [line.split() for line in listing[2:]]
    assert [int(row[0]) for row in rows] == [3, 6, 9]
    sizes = [sum(f.stat().st_size for f in (workdir / "checkpoints" / str(s)).rglob("*") if f.is_file()) / 1024
             for s in (3, 6, 9)]
    assert [float(row[1]) for row in rows] == [round(size, 1) for size in sizes] and rows[0][2] == "KiB"
    for row in rows:  # the commit time Orbax recorded, in UTC
        nanoseconds = json.loads((workdir / "checkpoints" / row[0] / "_CHECKPOINT_METADATA").read_text())[
            "commit_timestamp_nsecs"]
        saved = datetime.datetime.fromtimestamp(nanoseconds / 1e9, datetime.timezone.utc)
        assert f"{row[3]} {row[4]}" == saved.strftime("%Y-%m-%d %H:%M:%S")

    assert cli.main(["checkpoints", str(workdir), "--verify"]) == 1
    out = capsys.readouterr()
    verified = {int(line.split()[0]): line for line in out.out.splitlines()[2:]}
    assert "ok (read back completely)" in verified[3] and "ok (read back completely)" in verified[9]
    assert f"DAMAGED: {bad}: truncated" in verified[6]
    assert "1 damaged step(s): [6]" in out.err
    with pytest.raises(SystemExit, match="path: no checkpoint directory"):
        cli.main(["checkpoints", str(tmp_path / "nowhere")])


def test_load_params_names_the_damaged_file_and_older_steps(preempted, tmp_path):
    workdir = copy_of(preempted, tmp_path)
    bad = DAMAGE["array_data_truncated"](workdir / checkpoint.CHECKPOINTS_SUBDIR / "9")
    with pytest.raises(checkpoint.DamagedCheckpointError) as raised:
        checkpoint.load_params(workdir, which="params")
    assert isinstance(raised.value, ValueError) and raised.value.file == bad and raised.value.step == 9
    assert "older steps [3, 6]" in str(raised.value)
    at_6 = checkpoint.load_params(workdir, which="params", step=6)
    assert tree_equal(at_6, checkpoint.load_params(preempted, which="params", step=6))


# ---------------------------------------------------------------- failing saves

def test_save_failing_with_enospc_stops_training_and_keeps_complete_steps(preempted, reference, tmp_path,
                                                                          monkeypatch):
    workdir = tmp_path / "run"
    write_text = async_path.write_text

    async def disk_full_at_step_9(path, text):
        if f"{PREEMPT_AT}{checkpoint.TMP_MARK}" in str(path) and path.name == "_METADATA":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return await write_text(path, text)

    with monkeypatch.context() as patch:
        patch.setattr(async_path, "write_text", disk_full_at_step_9)
        with pytest.raises(checkpoint.CheckpointSaveError) as raised:
            loop.train(ToyTask(), config(keep_checkpoints=2), workdir)
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC and isinstance(raised.value, OSError)
    assert f"saving step {PREEMPT_AT}" in message and "No space left on device" in message
    assert "training stopped" in message and "the latest complete checkpoint is step 6" in message
    ckpt_dir = workdir / checkpoint.CHECKPOINTS_SUBDIR
    # keep=2 would have dropped step 3 once 9 was complete; 9 never was, so 3 and 6 stay
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["3", "6"]
    with checkpoint.Checkpointer(ckpt_dir) as ckpt:
        assert ckpt.latest_step() == 6
    checkpoint.verify_step(ckpt_dir / "6")
    assert tree_equal(checkpoint.load_params(workdir, which="params"),
                      checkpoint.load_params(preempted, which="params", step=6))

    state = loop.train(ToyTask(), config(keep_checkpoints=2), workdir)  # disk space back: resume from 6
    assert tree_equal(jax.device_get(state), reference)


KILLED_SAVE = textwrap.dedent("""
    import asyncio, os, sys, time
    import numpy as np, grain
    from orbax.checkpoint._src.path import async_path
    from dalle2_jax import checkpoint

    directory, block_at, marker = sys.argv[1], sys.argv[2], sys.argv[3]
    iterator = iter(grain.MapDataset.range(64).batch(4).to_iter_dataset(grain.ReadOptions(num_threads=0)))
    state = {"w": np.arange(4096, dtype=np.float32), "step": np.int32(1)}
    ckpt = checkpoint.Checkpointer(directory, keep=3)
    ckpt.save(1, state, iterator)
    ckpt.wait()
    write_text = async_path.write_text

    async def block(path, text):  # step 2's write stops here until the parent kills the process
        if "2.orbax-checkpoint-tmp" in str(path) and path.name == block_at:
            open(marker, "w").close()
            await asyncio.sleep(600)
        return await write_text(path, text)

    async_path.write_text = block
    next(iterator)
    ckpt.save(2, {"w": np.arange(4096, dtype=np.float32) * 2, "step": np.int32(2)}, iterator)
    print("save started", flush=True)
    ckpt.wait()
""")


@pytest.mark.parametrize("block_at", ["_METADATA", "commit_success.txt"])
def test_sigkill_during_async_save_leaves_no_step_taken_for_complete(tmp_path, block_at, caplog):
    """Killed while step 2 is written: with the arrays written but not the tree metadata, or with
    everything written but the commit markers and the final rename."""
    directory, marker = tmp_path / "checkpoints", tmp_path / "blocked"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(directory), block_at, str(marker)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, child.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the child never reached the blocked write"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL and "save started" in out
    partial = [p for p in directory.iterdir() if p.name.startswith("2.")]
    assert len(partial) == 1 and any(f.is_file() for f in partial[0].rglob("*"))  # half-written step 2

    assert sorted(ocp.utils.checkpoint_steps(directory)) == [1]
    listing = {(info.step, info.kind) for info in checkpoint.list_checkpoints(directory, verify=True)}
    assert listing == {(1, "step"), (2, "unfinished")}
    with caplog.at_level(logging.WARNING, logger="dalle2_jax.checkpoint"), checkpoint.Checkpointer(directory) as ckpt:
        assert [r.getMessage() for r in caplog.records] == [
            f"removing {partial[0]}: a save that never completed (the run stopped while writing it)"]
        assert ckpt.all_steps() == [1]
        abstract = {"w": jax.ShapeDtypeStruct((4096,), np.float32), "step": jax.ShapeDtypeStruct((), np.int32)}
        restored, step = ckpt.restore_latest_readable(abstract)
        assert step == 1 and np.array_equal(np.asarray(restored["w"]), np.arange(4096, dtype=np.float32))
        ckpt.save(2, restored)  # the restarted run writes step 2 again, cleanly
        ckpt.wait()
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


# ---------------------------------------------------------------- exported weights

def test_damaged_weights_in_export_and_from_pretrained_name_the_file(tmp_path):
    from dalle2_jax.pipeline import UnCLIPPipeline, export_pipeline
    from test_pipeline import tiny_pipeline

    pipe = tiny_pipeline()
    model = tmp_path / "model"
    pipe.save_pretrained(model)
    bad = truncate(max((f for f in (model / "decoder" / "params").rglob("*") if f.parent.name == "d"),
                       key=lambda f: f.stat().st_size))
    with pytest.raises(ValueError, match=f"stage 'decoder' are corrupt: {bad}: truncated"):
        UnCLIPPipeline.from_pretrained(model)
    with pytest.raises(SystemExit, match=f"{bad}: truncated"):
        cli.main(["generate", "a red circle", "--model", str(model), "--out", str(tmp_path / "x.png")])

    root = tmp_path / "workdirs"  # training workdirs as test_pipeline's export test builds them
    for stage in pipe.stages:
        workdir = root / stage.name
        workdir.mkdir(parents=True)
        (workdir / "config.json").write_text(stage.config.to_json_best_effort())
        params = jax.tree.map(np.asarray, stage.variables["params"])
        with checkpoint.Checkpointer(workdir / "checkpoints", async_save=False) as saver:
            saver.save(3, {"params": params, "ema_params": params, "step": np.int32(3)})
    pipe.tokenizer.save(root / "clip" / "tokenizer")
    bad = garble(root / "prior" / "checkpoints" / "3" / "state" / "_METADATA")
    with pytest.raises(checkpoint.DamagedCheckpointError, match=f"{bad}: not valid JSON"):
        export_pipeline(root, tmp_path / "exported")
    with pytest.raises(SystemExit, match=f"dalle2-jax export: error: checkpoint step 3: {bad}: not valid JSON"):
        cli.main(["export", "--workdir", str(root), "--out", str(tmp_path / "exported")])
    with pytest.raises(checkpoint.DamagedCheckpointError):  # --debug: the exception itself, with its traceback
        cli.main(["export", "--workdir", str(root), "--out", str(tmp_path / "exported"), "--debug"])
    assert not (tmp_path / "exported").exists()
