"""The training loop end to end on a tiny MLP regression served by grain: sharding
parity, non-finite skips, gradient accumulation, resume in a new process, SIGKILL
during a save, SIGTERM, evaluation and logs."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from dalle2_jax import checkpoint, sharding
from dalle2_jax.training import loop, metrics, optim
from dalle2_jax.training.state import create_train_state

TESTS_DIR = Path(__file__).resolve().parent
BATCH = 16


def spread_init(key, shape, dtype=jnp.float32):
    """Deterministic weights of scale 1/sqrt(fan_in). Not random on purpose: compiling a
    random generator costs seconds of CPU per run on XLA:CPU, and any spread works here."""
    del key
    values = jnp.sin(jnp.arange(int(np.prod(shape)), dtype=dtype) * 2.3999 + 0.5)
    return (values * np.sqrt(3.0 / shape[0])).reshape(shape)


class MLP(nn.Module):
    hidden: int = 32
    out_dim: int = 4

    @nn.compact
    def __call__(self, x):
        hidden = nn.gelu(nn.Dense(self.hidden, kernel_init=spread_init, name="hidden")(x))
        return nn.Dense(self.out_dim, kernel_init=spread_init, name="out")(hidden)


class ToyTask:
    """Noisy regression of a fixed random tanh map (96 examples of dim 8).

    The loss reports a position-weighted checksum of the example indices, so the
    logs show exactly which batch each step drew. Test hooks: a NaN batch at
    `nan_at_step`, a SIGTERM to this process when `sigterm_at_step`'s batch is drawn.
    """

    num_examples = 96

    def __init__(self, noise=0.05, nan_at_step=None, sigterm_at_step=None):
        data_rng = np.random.default_rng(0)
        self.x = data_rng.normal(size=(self.num_examples, 8)).astype(np.float32)
        self.y = np.tanh(self.x @ data_rng.normal(size=(8, 4))).astype(np.float32)
        self.noise = noise
        self.nan_at_step = nan_at_step
        self.sigterm_at_step = sigterm_at_step
        self.model = MLP()
        self.predict = jax.jit(lambda params, x: self.model.apply({"params": params}, x))
        self.evaluated = {}  # step -> the parameters evaluate() received

    def init_params(self, rng, batch):
        return self.model.init(rng, batch["x"])["params"]

    def loss(self, params, batch, rng, *, train=True):
        target = batch["y"]
        if self.noise:  # label noise: the loss draws randomness from the per-step key
            target = target + self.noise * jax.random.normal(rng, target.shape)
        loss = jnp.mean((self.model.apply({"params": params}, batch["x"]) - target) ** 2)
        weights = jnp.arange(1, batch["index"].shape[0] + 1, dtype=jnp.float32)
        return loss, {"batch_checksum": jnp.sum(batch["index"].astype(jnp.float32) * weights)}

    def train_iterator(self, *, seed, process_index, process_count, per_process_batch):
        def example(position, index):
            x = self.x[index]
            if self.nan_at_step is not None and position // per_process_batch + 1 == self.nan_at_step:
                x = np.full_like(x, np.nan)
            return {"x": x, "y": self.y[index], "index": np.int32(index),
                    "step": np.int32(position // per_process_batch + 1)}

        dataset = (grain.MapDataset.range(self.num_examples).shuffle(seed=seed).repeat()
                   [process_index::process_count].map_with_index(example)
                   .batch(per_process_batch, drop_remainder=True)
                   .to_iter_dataset(grain.ReadOptions(num_threads=0)))
        if self.sigterm_at_step is not None:
            dataset = dataset.map(self._maybe_sigterm)  # runs as the loop draws the batch
        return iter(dataset)

    def _maybe_sigterm(self, batch):
        if batch["step"][0] == self.sigterm_at_step:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "loop installed no handler"
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    def evaluate(self, params, *, step, workdir):
        self.evaluated[step] = jax.device_get(params)
        prediction = np.asarray(self.predict(self.evaluated[step], self.x))
        grid = np.clip((prediction[:8, :, None, None] + 1) * 127.5, 0, 255).astype(np.uint8)
        metrics.write_image_grid(Path(workdir) / f"eval_{step}.png", np.repeat(grid, 3, axis=-1), ncols=4)
        return {"mse": float(np.mean((prediction - self.y) ** 2))}


def toy_config(**overrides):
    config = ml_collections.ConfigDict(dict(
        seed=0, total_steps=20, batch_size=BATCH, log_every=1, eval_every=0, checkpoint_every=0,
        keep_checkpoints=2, progress_bar=False,
        mesh=dict(data=-1, fsdp=1, min_fsdp_size=64),
        optimizer=dict(learning_rate=1e-2, warmup_steps=3, schedule="cosine", min_lr_ratio=0.0,
                       weight_decay=1e-2, b1=0.9, b2=0.99, eps=1e-8, grad_clip_norm=1.0, grad_accum_steps=1),
        ema=dict(decay=0.99, warmup=True)))
    config.update(overrides)
    return config


def tree_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


def assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


# ---------------------------------------------------------------- parity over meshes

@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory, devices8, scale):
    steps = max(10, round(20 * scale))
    meshes = {"one_device": sharding.make_mesh(1, 1, devices=devices8[:1]),
              "data8": sharding.make_mesh(8, 1), "data4_fsdp2": sharding.make_mesh(4, 2)}
    runs = {}
    for name, mesh in meshes.items():
        workdir = tmp_path_factory.mktemp(name)
        state = loop.train(ToyTask(), toy_config(total_steps=steps), workdir, mesh=mesh)
        runs[name] = (jax.device_get(state), metrics.read_metrics(workdir), state)
    return runs


@pytest.mark.heavy
@pytest.mark.parametrize("name", ["data8", "data4_fsdp2"])
def test_sharded_runs_equal_one_device_run(mesh_runs, name):
    ref_state, ref_log, _ = mesh_runs["one_device"]
    state, log, _ = mesh_runs[name]
    steps = len(ref_log)
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    np.testing.assert_allclose([r["loss"] for r in log], [r["loss"] for r in ref_log], rtol=1e-5)
    assert [r["batch_checksum"] for r in log] == [r["batch_checksum"] for r in ref_log]
    assert int(state.step) == steps and int(state.skipped_steps) == 0
    assert_tree_close(state.params, ref_state.params)
    assert_tree_close(state.ema_params, ref_state.ema_params)
    assert_tree_close(state.opt_state, ref_state.opt_state)


@pytest.mark.heavy
def test_training_reduces_loss_and_logs(mesh_runs):
    _, log, _ = mesh_runs["one_device"]
    assert np.mean([r["loss"] for r in log[-3:]]) < 0.7 * np.mean([r["loss"] for r in log[:3]])
    for record in log:
        assert record["grad_norm"] > 0 and record["steps_per_sec"] > 0 and record["skipped_steps"] == 0
    schedule = optim.learning_rate_schedule(toy_config().optimizer, len(log))
    np.testing.assert_allclose([r["learning_rate"] for r in log], jax.jit(jax.vmap(schedule))(jnp.arange(len(log))),
                               rtol=1e-5, atol=1e-9)


@pytest.mark.heavy
def test_fsdp_run_shards_large_kernels(mesh_runs):
    *_, state = mesh_runs["data4_fsdp2"]
    kernel, bias = state.params["hidden"]["kernel"], state.params["hidden"]["bias"]  # (8, 32), (32,)
    assert kernel.sharding.spec == P(None, "fsdp") and kernel.addressable_shards[0].data.shape == (8, 16)
    assert bias.sharding.spec == P()  # 32 elements: below min_fsdp_size
    assert state.opt_state[1][0].mu["hidden"]["kernel"].sharding.spec == P(None, "fsdp")


def test_train_rejects_bad_config_and_plain_iterators(tmp_path, devices8):
    with pytest.raises(ValueError, match=r"config.batch_size: 12 must be divisible by 8 devices x 1"):
        loop.train(ToyTask(), toy_config(batch_size=12), tmp_path)
    with pytest.raises(ValueError, match="config.total_steps"):
        loop.train(ToyTask(), toy_config(total_steps=0), tmp_path)

    class GeneratorTask(ToyTask):
        def train_iterator(self, **kwargs):
            return iter([{"x": self.x[:BATCH]}])

    with pytest.raises(ValueError, match="task.train_iterator: expected a checkpointable grain DatasetIterator"):
        loop.train(GeneratorTask(), toy_config(), tmp_path)


# ---------------------------------------------------------------- one step at a time

@pytest.fixture(scope="module")
def stepper(devices8):
    """A fresh-state factory and train steps without / with 4-way gradient accumulation."""
    task = ToyTask(noise=0.0)  # deterministic loss: micro-batches draw different noise otherwise
    mesh = sharding.make_mesh(4, 2)
    iterator = task.train_iterator(seed=0, process_index=0, process_count=1, per_process_batch=BATCH)
    batch = next(iterator)
    batch_shardings = jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch)
    config = toy_config()
    tx = optim.make_optimizer(config.optimizer, config.total_steps)
    state, state_shardings = create_train_state(task, tx, batch, mesh, seed=0, min_fsdp_size=64)
    host_state = jax.device_get(state)
    steps = {}
    for accum in (1, 4):
        config.optimizer.grad_accum_steps = accum
        steps[accum] = loop.make_train_step(task, tx, config, state_shardings, batch_shardings, mesh)
    return {"fresh_state": lambda: jax.device_put(host_state, state_shardings),  # steps donate their input
            "steps": steps, "global_batches": [sharding.global_batch(b, mesh) for b in (batch, next(iterator))],
            "batch": batch, "mesh": mesh}


def test_nonfinite_batch_leaves_state_unchanged_and_is_counted(stepper):
    train_step, (batch, next_batch) = stepper["steps"][1], stepper["global_batches"]
    state, _ = train_step(stepper["fresh_state"](), batch)
    before = jax.device_get(state)
    bad = dict(stepper["batch"], x=stepper["batch"]["x"].copy())
    bad["x"][5, 2] = np.nan
    state, step_metrics = train_step(state, sharding.global_batch(bad, stepper["mesh"]))
    after = jax.device_get(state)
    assert not np.isfinite(float(step_metrics["loss"]))
    assert float(step_metrics["skipped"]) == 1 and int(after.skipped_steps) == 1
    assert int(after.step) == int(before.step) + 1
    assert tree_equal(after.params, before.params)
    assert tree_equal(after.ema_params, before.ema_params)
    assert tree_equal(after.opt_state, before.opt_state)
    state, step_metrics = train_step(state, next_batch)
    assert float(step_metrics["skipped"]) == 0 and int(state.skipped_steps) == 1
    assert not tree_equal(jax.device_get(state.params), before.params)


def test_first_step_ema_follows_warmup_formula(stepper):
    state = stepper["fresh_state"]()
    params0 = jax.device_get(state.params)
    state, _ = stepper["steps"][1](state, stepper["global_batches"][0])
    decay0 = min(0.99, 1 / 10)  # min(decay, (1 + t) / (10 + t)) at t = 0
    expected = jax.tree.map(lambda e, p: decay0 * e + (1 - decay0) * p, params0, jax.device_get(state.params))
    assert_tree_close(state.ema_params, expected, rtol=1e-6, atol=1e-7)


def test_gradient_accumulation_equals_whole_batch_step(stepper):
    state_1, state_4 = stepper["fresh_state"](), stepper["fresh_state"]()
    for batch in stepper["global_batches"]:  # the second step goes through non-trivial Adam moments
        state_1, metrics_1 = stepper["steps"][1](state_1, batch)
        state_4, metrics_4 = stepper["steps"][4](state_4, batch)
        np.testing.assert_allclose(float(metrics_4["loss"]), float(metrics_1["loss"]), rtol=1e-6)
        np.testing.assert_allclose(float(metrics_4["grad_norm"]), float(metrics_1["grad_norm"]), rtol=1e-5)
    assert_tree_close(state_4.params, state_1.params)
    assert_tree_close(state_4.opt_state, state_1.opt_state)


# ---------------------------------------------------------------- preemption, evaluation, NaN in the loop

def test_sigterm_saves_and_stops_nan_step_skipped_and_eval_runs(tmp_path):
    assert threading.current_thread() is threading.main_thread()
    previous_handler = signal.getsignal(signal.SIGTERM)
    task = ToyTask(nan_at_step=2, sigterm_at_step=5)
    state = loop.train(task, toy_config(eval_every=2, checkpoint_every=4), tmp_path)
    assert signal.getsignal(signal.SIGTERM) == previous_handler
    assert int(state.step) == 5 and int(state.skipped_steps) == 1
    assert sorted(ocp.utils.checkpoint_steps(tmp_path / checkpoint.CHECKPOINTS_SUBDIR)) == [4, 5]
    saved = checkpoint.load_params(tmp_path, which="params")
    assert tree_equal(saved, jax.device_get(state.params))

    log = metrics.read_metrics(tmp_path)
    train_records = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5]
    assert train_records[1]["loss"] is None and train_records[1]["skipped"] == 1  # non-finite -> null
    assert [r["skipped_steps"] for r in train_records] == [0, 1, 1, 1, 1]

    eval_records = [r for r in log if "eval/mse" in r]
    assert [r["step"] for r in eval_records] == [2, 4]  # not at 5: preempted runs save and stop
    assert sorted(task.evaluated) == [2, 4] and (tmp_path / "eval_4.png").is_file()
    ema_at_4 = checkpoint.load_params(tmp_path, which="ema_params", step=4)
    assert tree_equal(task.evaluated[4], ema_at_4)  # evaluate() gets the EMA parameters
    assert not tree_equal(ema_at_4, checkpoint.load_params(tmp_path, which="params", step=4))
    ema_mse = float(np.mean((np.asarray(task.predict(ema_at_4, task.x)) - task.y) ** 2))
    np.testing.assert_allclose(eval_records[1]["eval/mse"], ema_mse, rtol=1e-6)
    assert json.loads((tmp_path / loop.CONFIG_FILE).read_text())["total_steps"] == 20
    assert any((tmp_path / metrics.TENSORBOARD_DIR).iterdir())


# ---------------------------------------------------------------- resume in a new process

CHILD = textwrap.dedent("""
    import logging, os, signal, sys
    sys.path.insert(0, {tests_dir!r})
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from test_training_loop import ToyTask, toy_config
    from dalle2_jax.training import loop

    kill_step = int(os.environ.get("TOY_KILL_DURING_SAVE", "0"))
    if kill_step:  # simulate a crash in the middle of writing checkpoint `kill_step`
        import grain.checkpoint
        save = grain.checkpoint.CheckpointHandler.save
        def save_then_die(self, directory, *args, **kwargs):
            save(self, directory, *args, **kwargs)
            if any(part.startswith(f"{{kill_step}}.") for part in directory.parts):
                os.kill(os.getpid(), signal.SIGKILL)
        grain.checkpoint.CheckpointHandler.save = save_then_die
    half = int(sys.argv[2])
    state = loop.train(ToyTask(), toy_config(total_steps=2 * half, checkpoint_every=half), sys.argv[1])
    print("final step", int(state.step))
""")


def run_child(workdir, half, cache_dir, **env):
    # The second child reuses the first one's compiled programs through the persistent cache.
    child_env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
                     JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                     **env)
    return subprocess.run([sys.executable, "-c", CHILD.format(tests_dir=str(TESTS_DIR)), str(workdir), str(half)],
                          env=child_env, capture_output=True, text=True, timeout=300)


@pytest.mark.heavy
def test_resume_in_new_process_after_sigkill_during_save(tmp_path, scale):
    """12 steps saving at 6 (scaled in CI); the first process dies while writing step 12."""
    half = max(3, round(6 * scale))
    total = 2 * half
    reference = loop.train(ToyTask(), toy_config(total_steps=total, checkpoint_every=half), tmp_path / "reference")
    workdir = tmp_path / "run"
    killed = run_child(workdir, half, tmp_path / "jax_cache", TOY_KILL_DURING_SAVE=str(total))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpt_dir = workdir / checkpoint.CHECKPOINTS_SUBDIR
    assert sorted(ocp.utils.checkpoint_steps(ckpt_dir)) == [half]
    assert any(p.name.startswith(f"{total}.") for p in ckpt_dir.iterdir())  # the half-written last step

    resumed = run_child(workdir, half, tmp_path / "jax_cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {half}" in resumed.stderr and f"final step {total}" in resumed.stdout
    assert sorted(ocp.utils.checkpoint_steps(ckpt_dir)) == [half, total]
    assert not any(p.name.startswith(f"{total}.") for p in ckpt_dir.iterdir())

    ref_log, log = metrics.read_metrics(tmp_path / "reference"), metrics.read_metrics(workdir)
    assert [r["step"] for r in log] == list(range(1, total + 1))
    for key in ("batch_checksum", "loss", "grad_norm", "learning_rate"):  # the second half ran in the new process
        assert [r[key] for r in log] == [r[key] for r in ref_log], key
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), reference)
    with checkpoint.Checkpointer(ckpt_dir) as ckpt:
        restored = ckpt.restore(abstract, step=total)
    assert tree_equal(jax.device_get(restored), jax.device_get(reference))
