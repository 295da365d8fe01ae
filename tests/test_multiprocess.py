"""Multi-process training as a pod runs it, on one machine: `dalle2-jax launch` starts 2 CPU
processes x 4 devices (gloo collectives) that form one 8-device mesh.

- The 2-process run ends where the 1-process, 8-device run of the same global batch ends.
- Killed with SIGKILL after its first checkpoint and relaunched, it ends bit for bit where the
  uninterrupted 2-process run ends.
- Elastic resume: its checkpoint restores into 1 process x 2 devices, and a data=8 checkpoint
  into a data=2 x fsdp=2 mesh, and training continues from the same data position.
"""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dalle2_jax import checkpoint, launch
from dalle2_jax.data import pipeline, shapes
from dalle2_jax.training import metrics

SHAPES_SIZES = dict(image_size=32, seed=0, num_train=192, num_test=40, num_test_unseen=24)
MODEL_OVERRIDES = dict(embed_dim=32, context_length=16, text_width=32, text_depth=1, text_heads=2,
                       text_mlp_dim=64, image_size=32, patch_size=8, vision_width=32, vision_depth=1,
                       vision_heads=2, vision_mlp_dim=64)
BATCH = 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT = 900


def _steps(scale):
    """(total steps, checkpoint interval): 24 / 6 locally, 12 / 4 in CI."""
    every = 6 if scale >= 1 else 4
    return 4 * every if scale >= 1 else 3 * every, every


def _train_args(workdir, data_dir, total, every, **extra):
    values = {f"model.{k}": v for k, v in MODEL_OVERRIDES.items()}
    values.update({f"data.{k}": v for k, v in SHAPES_SIZES.items()})
    values.update({"data.data_dir": data_dir, "total_steps": total, "batch_size": BATCH, "log_every": 1,
                   "eval_every": 0, "checkpoint_every": every, "progress_bar": False})
    values.update(extra)
    return ["train", "clip", "--config", os.path.join(REPO, "configs/clip.py:tiny"), "--workdir", str(workdir),
            *[f"--config.{key}={value}" for key, value in values.items()]]


def _env(devices: int | None = None):
    env = dict(os.environ)
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if devices is not None:
        env["XLA_FLAGS"] = launch._with_device_count(env.get("XLA_FLAGS", ""), devices)
    return env


def _launch_cmd(processes, devices_per_process, args):
    return [sys.executable, "-m", "dalle2_jax.cli", "launch", "--processes", str(processes),
            "--devices-per-process", str(devices_per_process), "--", *args]


def _run(cmd, devices=None):
    result = subprocess.run(cmd, env=_env(devices), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def _final(workdir):
    return checkpoint.load_params(workdir, which="params")


def _assert_trees(a, b, *, exact):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, scale):
    """The data, a 1 x 8 reference run and an uninterrupted 2 x 4 run of the same config."""
    root = tmp_path_factory.mktemp("multiprocess")
    data_dir = str(root / "data")
    shapes.build_shapes(data_dir, **SHAPES_SIZES)
    total, every = _steps(scale)
    one = root / "one_process" / "clip"
    _run([sys.executable, "-m", "dalle2_jax.cli", *_train_args(one, data_dir, total, every)], devices=8)
    two = root / "two_processes" / "clip"
    launched = _run(_launch_cmd(2, 4, _train_args(two, data_dir, total, every)))
    return dict(root=root, data_dir=data_dir, total=total, every=every, one=one, two=two, launched=launched)


@pytest.mark.heavy
def test_two_processes_train_like_one(runs):
    output = runs["launched"].stdout
    assert "[0] " in output and "[1] " in output  # both processes' output, prefixed
    one_log, two_log = metrics.read_metrics(runs["one"]), metrics.read_metrics(runs["two"])
    assert [r["step"] for r in two_log] == list(range(1, runs["total"] + 1))  # process 0 alone writes the log
    # Same global batches in the same order: the per-step losses agree from the first step on.
    np.testing.assert_allclose([r["loss"] for r in two_log], [r["loss"] for r in one_log], rtol=2e-4)
    files = sorted(os.listdir(runs["two"] / "checkpoints" / str(runs["total"]) / checkpoint.DATA_ITEM))
    assert [f for f in files if f.endswith(".json")] == ["process_0-of-2.json", "process_1-of-2.json"]
    # All-reduces run in another order across two processes, so float sums differ in the last
    # bits; 1e-7-level differences per step stay within these bounds over the run.
    _assert_trees(_final(runs["two"]), _final(runs["one"]), exact=False)


@pytest.mark.heavy
def test_sigkill_after_first_checkpoint_then_relaunch_ends_bit_identical(runs):
    workdir = runs["root"] / "killed" / "clip"
    args = _train_args(workdir, runs["data_dir"], runs["total"], runs["every"])
    process = subprocess.Popen(_launch_cmd(2, 4, args), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt_dir = workdir / "checkpoints"
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while time.monotonic() < deadline and process.poll() is None:
            steps = checkpoint_steps(ckpt_dir)
            if steps:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and both training processes
        process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    killed_at = max(checkpoint_steps(ckpt_dir))
    assert killed_at < runs["total"]
    _run(_launch_cmd(2, 4, args))
    assert max(checkpoint_steps(ckpt_dir)) == runs["total"]
    _assert_trees(_final(workdir), _final(runs["two"]), exact=True)


def checkpoint_steps(directory):
    if not directory.is_dir():
        return []
    import orbax.checkpoint as ocp

    return list(ocp.utils.checkpoint_steps(directory))


@pytest.mark.heavy
def test_elastic_resume_two_processes_into_one_process_of_two_devices(runs):
    """The 2 x 4 run's first checkpoint restores into 1 process x 2 devices; training goes on
    from the same global batch (the iterator state counts global batches) to the same end."""
    workdir = runs["root"] / "elastic" / "clip"
    total = runs["total"]
    every = _copy_checkpoint(runs["two"], workdir)
    _run([sys.executable, "-m", "dalle2_jax.cli",
          *_train_args(workdir, runs["data_dir"], total, every)], devices=2)
    log = metrics.read_metrics(workdir)
    assert [r["step"] for r in log] == list(range(every + 1, total + 1))
    assert every < total
    reference = {r["step"]: r["loss"] for r in metrics.read_metrics(runs["two"])}
    # The step after the restore sees the global batch the uninterrupted run saw there.
    np.testing.assert_allclose([r["loss"] for r in log], [reference[r["step"]] for r in log], rtol=2e-3)
    _assert_trees(_final(workdir), _final(runs["two"]), exact=False)


@pytest.mark.heavy
def test_elastic_resume_data8_into_data2_fsdp2(runs):
    workdir = runs["root"] / "fsdp" / "clip"
    total = runs["total"]
    every = _copy_checkpoint(runs["one"], workdir)
    _run([sys.executable, "-m", "dalle2_jax.cli",
          *_train_args(workdir, runs["data_dir"], total, every, **{"mesh.data": 2, "mesh.fsdp": 2,
                                                                  "mesh.min_fsdp_size": 64})], devices=4)
    log = metrics.read_metrics(workdir)
    assert [r["step"] for r in log] == list(range(every + 1, total + 1))
    reference = {r["step"]: r["loss"] for r in metrics.read_metrics(runs["one"])}
    np.testing.assert_allclose([r["loss"] for r in log], [reference[r["step"]] for r in log], rtol=2e-3)
    _assert_trees(_final(workdir), _final(runs["one"]), exact=False)


def _copy_checkpoint(source_workdir, workdir):
    """A workdir holding only the earliest kept checkpoint of source_workdir (and its
    tokenizer); returns that checkpoint's step."""
    import shutil

    step = min(checkpoint_steps(source_workdir / "checkpoints"))
    workdir.mkdir(parents=True)
    shutil.copytree(source_workdir / "tokenizer", workdir / "tokenizer")
    shutil.copytree(source_workdir / "checkpoints" / str(step), workdir / "checkpoints" / str(step))
    return step


def test_global_batches_do_not_depend_on_the_process_count(tmp_path):
    """Process i's batch is rows [i b, (i+1) b) of the one-process global batch, and an
    iterator's state restores into an iterator of another process count."""
    source = shapes.build_shapes(str(tmp_path), image_size=16, seed=0, num_train=40, num_test=4,
                                 num_test_unseen=4).as_data_source("train")

    def batches(process_count, index, count=7, state=None):
        iterator = pipeline.make_image_text_iterator(
            source, batch_size=12 // process_count, seed=5, process_index=index, process_count=process_count,
            image_size=16, augment="random_crop", random_flip=True)
        if state is not None:
            iterator.set_state(state)
        return iterator, [next(iterator) for _ in range(count)]

    _, whole = batches(1, 0)
    for process_count in (2, 3, 4):
        parts = [batches(process_count, i)[1] for i in range(process_count)]
        for step in range(7):  # crosses the epoch boundary at 40 examples
            joined = np.concatenate([part[step]["image"] for part in parts])
            np.testing.assert_array_equal(joined, whole[step]["image"])
            assert sum((list(part[step]["caption"]) for part in parts), []) == list(whole[step]["caption"])
    iterator, _ = batches(3, 2, count=4)
    _, resumed = batches(1, 0, count=3, state=iterator.get_state())
    for got, want in zip(resumed, whole[4:]):
        np.testing.assert_array_equal(got["image"], want["image"])


def test_launch_rejects_bad_arguments_and_reports_a_failed_process(tmp_path, capsys):
    with pytest.raises(ValueError, match="processes"):
        launch.launch(["train"], 0)
    with pytest.raises(ValueError, match="command"):
        launch.launch([], 2)
    with pytest.raises(ValueError, match="devices_per_process"):
        launch.launch(["train"], 2, devices_per_process=0)
    env = launch.process_env(1, 2, "127.0.0.1:1234", 4, base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --a"})
    assert env["JAX_PROCESS_ID"] == "1" and env["JAX_NUM_PROCESSES"] == "2"
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert env["XLA_FLAGS"].split() == ["--a", "--xla_force_host_platform_device_count=4"]
    # One process fails at once (no such config): the launcher stops the other and exits non-zero.
    result = subprocess.run(_launch_cmd(2, 1, ["train", "clip", "--config", str(tmp_path / "missing.py"),
                                               "--workdir", str(tmp_path / "w")]),
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "[0] " in result.stdout and "missing.py" in result.stdout
