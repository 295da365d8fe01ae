"""Checkpointer: sharded state + grain iterator round trip, resharding on restore,
keeping the latest N, ignoring half-written steps, and load_params."""
import grain
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from dalle2_jax import checkpoint, sharding


def make_state(mesh):
    """A TrainState-shaped dict: one fsdp-split matrix, replicated small leaves, an int step."""
    host = {"step": np.int32(7),
            "params": {"kernel": np.arange(64 * 8, dtype=np.float32).reshape(64, 8) / 7.0,
                       "bias": np.linspace(-1, 1, 8, dtype=np.float32)},
            "rng": np.array([1, 2], np.uint32)}
    shardings = sharding.param_shardings(host, mesh, min_fsdp_size=64)
    return host, jax.device_put(host, shardings)


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def data_iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4)
                .to_iter_dataset(grain.ReadOptions(num_threads=0)))


def tree_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


def test_round_trip_with_iterator_position_and_resharding(tmp_path, devices8):
    mesh = sharding.make_mesh(4, 2)
    host, state = make_state(mesh)
    assert state["params"]["kernel"].sharding.spec == P("fsdp", None)
    iterator = data_iterator()
    for _ in range(3):
        next(iterator)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(10, state, iterator)
        expected_next = [next(iterator) for _ in range(2)]  # drawn after the save: must not leak into it
        ckpt.wait()
        assert ckpt.latest_step() == 10

    with checkpoint.Checkpointer(tmp_path) as ckpt:
        fresh_iterator = data_iterator()
        restored = ckpt.restore(abstract(state), fresh_iterator)
        assert tree_equal(restored, host)
        assert restored["params"]["kernel"].sharding == state["params"]["kernel"].sharding
        np.testing.assert_array_equal([next(fresh_iterator) for _ in range(2)], expected_next)

        other_mesh = sharding.make_mesh(1, 8)  # restore onto a different layout
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
            other_mesh, P(None, "fsdp") if x.ndim == 2 else P())), host)
        resharded = ckpt.restore(target)
        assert tree_equal(resharded, host)
        assert resharded["params"]["kernel"].addressable_shards[0].data.shape == (64, 1)


def test_keeps_latest_and_ignores_half_written_steps(tmp_path, devices8):
    _, state = make_state(sharding.make_mesh(8, 1))
    with checkpoint.Checkpointer(tmp_path, keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, state)
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
    half_written = tmp_path / "5.orbax-checkpoint-tmp-1234567"
    (half_written / "state").mkdir(parents=True)
    (half_written / "state" / "garbage").write_bytes(b"\x00" * 10)
    with checkpoint.Checkpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.latest_step() == 4 and ckpt.all_steps() == [3, 4]
        with pytest.raises(FileNotFoundError, match="step: no complete checkpoint 5"):
            ckpt.restore(abstract(state), step=5)
        with pytest.raises(FileNotFoundError, match="data_iterator"):
            ckpt.restore(abstract(state), data_iterator(), step=4)
        ckpt.save(5, state)  # the resumed run saves step 5 again, cleanly
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
    assert not half_written.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5"]


def test_load_params_from_workdir(tmp_path, devices8, monkeypatch):
    host, state = make_state(sharding.make_mesh(4, 2))
    tree = {"params": state["params"], "ema_params": jax.tree.map(lambda x: x * 0 + 1, state["params"])}
    with checkpoint.Checkpointer(tmp_path / checkpoint.CHECKPOINTS_SUBDIR) as ckpt:
        ckpt.save(3, tree)
    loaded = checkpoint.load_params(tmp_path)  # a workdir: finds checkpoints/ and the latest step
    assert isinstance(loaded["kernel"], np.ndarray)
    assert tree_equal(loaded, jax.tree.map(np.ones_like, host["params"]))
    assert tree_equal(checkpoint.load_params(tmp_path / "checkpoints", which="params", step=3), host["params"])
    with monkeypatch.context() as patch:  # a path relative to the working directory, as users type it
        patch.chdir(tmp_path.parent)
        assert tree_equal(checkpoint.load_params(tmp_path.name), jax.tree.map(np.ones_like, host["params"]))
    with pytest.raises(ValueError, match="which"):
        checkpoint.load_params(tmp_path, which="opt_state")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint 9"):
        checkpoint.load_params(tmp_path, step=9)
    with pytest.raises(FileNotFoundError, match="path"):
        checkpoint.load_params(tmp_path / "missing")


def test_checkpointer_rejects_bad_keep(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        checkpoint.Checkpointer(tmp_path, keep=0)
    with checkpoint.Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError, match="no complete"):
        ckpt.restore({"x": jax.ShapeDtypeStruct((2,), np.float32)})
