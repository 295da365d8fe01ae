"""Mesh construction, the FSDP sharding rule (checked on a 1B-parameter model's abstract
shapes), global batches and the distributed-initialisation switch."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dalle2_jax import sharding
from dalle2_jax.training import optim
from dalle2_jax.training.state import create_train_state


@pytest.mark.parametrize("data, fsdp, expected", [(-1, 1, (8, 1)), (4, 2, (4, 2)), (-1, 2, (4, 2)),
                                                  (2, -1, (2, 4)), (1, 8, (1, 8))])
def test_make_mesh_sizes(devices8, data, fsdp, expected):
    mesh = sharding.make_mesh(data, fsdp)
    assert mesh.axis_names == ("data", "fsdp")
    assert (mesh.shape["data"], mesh.shape["fsdp"]) == expected
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_given_devices_and_bad_sizes(devices8):
    one = sharding.make_mesh(1, 1, devices=devices8[:1])
    assert one.devices.size == 1 and one.devices.flat[0] == devices8[0]
    with pytest.raises(ValueError, match="data=3 x fsdp=1"):
        sharding.make_mesh(3, 1)
    with pytest.raises(ValueError, match="cannot be split"):
        sharding.make_mesh(-1, 3)
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(-1, -1)
    with pytest.raises(ValueError, match="fsdp"):
        sharding.make_mesh(8, 0)


def test_param_spec_rule():
    big = 2**18
    assert sharding.param_spec((2048, 8192), 8) == P(None, "fsdp")  # largest divisible dimension
    assert sharding.param_spec((8192, 2048), 8) == P("fsdp", None)
    assert sharding.param_spec((2048, 2048), 8) == P(None, "fsdp")  # ties: the last one
    assert sharding.param_spec((4096, 100), 8) == P("fsdp", None)  # 100 is not divisible by 8
    assert sharding.param_spec((big - 1,), 8) == P()  # below the threshold
    assert sharding.param_spec((big + 1,), 8) == P()  # nothing divisible
    assert sharding.param_spec((2048, 2048), 1) == P()  # no fsdp axis to split over
    assert sharding.param_spec((), 8) == P()
    assert sharding.param_spec((64, 6), 2, min_fsdp_size=64) == P("fsdp", None)


class Block(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        q, k, v = jnp.split(nn.Dense(3 * self.width, name="qkv")(h), 3, axis=-1)
        attention = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(self.width)) @ v
        x = x + nn.Dense(self.width, name="proj")(attention)
        h = nn.Dense(4 * self.width, name="mlp_in")(nn.LayerNorm()(x))
        return x + nn.Dense(self.width, name="mlp_out")(nn.gelu(h)), None


class Transformer(nn.Module):
    """24 scanned layers of width 2048 plus a 49408-token embedding: the paper's 1B prior shape."""
    width: int = 2048
    depth: int = 24
    vocab: int = 49408

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.width)(tokens)
        layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.depth)
        x, _ = layers(self.width, name="layers")(x, None)
        return nn.LayerNorm()(x)


class TransformerTask:
    def init_params(self, rng, batch):
        return Transformer().init(rng, batch["tokens"])["params"]


def test_one_billion_parameter_model_is_split_eight_ways_without_allocating(devices8):
    mesh = sharding.make_mesh(1, 8)
    batch_spec = {"tokens": jax.ShapeDtypeStruct((8, 16), jnp.int32)}
    tx = optim.make_optimizer(ml_collections.ConfigDict(dict(learning_rate=1e-4, weight_decay=0.1)), total_steps=10)
    live_before = len(jax.live_arrays())
    state, shardings = create_train_state(TransformerTask(), tx, batch_spec, mesh, seed=0, materialize=False)
    assert len(jax.live_arrays()) == live_before  # nothing was materialised
    params = state.params
    n_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    assert 1.2e9 < n_params < 1.4e9
    assert params["layers"]["mlp_in"]["kernel"].shape == (24, 2048, 8192)

    large_bytes = per_device_bytes = 0
    for leaf in jax.tree.leaves(state):  # params, EMA and both Adam moments
        size = int(np.prod(leaf.shape))
        shard_size = int(np.prod(leaf.sharding.shard_shape(leaf.shape)))
        if size >= sharding.DEFAULT_MIN_FSDP_SIZE:
            assert list(leaf.sharding.spec).count("fsdp") == 1, (leaf.shape, leaf.sharding.spec)
            assert shard_size * 8 == size
            large_bytes += size * leaf.dtype.itemsize
        else:
            assert leaf.sharding.spec == P()
        per_device_bytes += shard_size * leaf.dtype.itemsize
    total_bytes = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
    assert large_bytes > 0.999 * total_bytes
    assert per_device_bytes < total_bytes / 8 * 1.01  # ~20 GB of state -> ~2.6 GB per device
    assert params["layers"]["mlp_in"]["kernel"].sharding.spec == P(None, None, "fsdp")
    assert params["Embed_0"]["embedding"].sharding.spec == P("fsdp", None)  # (49408, 2048)
    assert shardings.params["layers"]["mlp_out"]["kernel"].spec == P(None, "fsdp", None)


def test_global_batch_shards_leading_axis(devices8):
    mesh = sharding.make_mesh(4, 2)
    local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "label": np.arange(16, dtype=np.int32)}
    batch = sharding.global_batch(local, mesh)
    assert batch["x"].shape == (16, 3) and batch["x"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
    np.testing.assert_array_equal(np.asarray(batch["label"]), local["label"])
    for shard in batch["x"].addressable_shards:
        assert shard.data.shape == (2, 3)
        np.testing.assert_array_equal(np.asarray(shard.data), local["x"][shard.index])
    with pytest.raises(ValueError, match=r"local_batch\['x'\].*divisible by the 8"):
        sharding.global_batch({"x": np.zeros((12, 3))}, mesh)


DISTRIBUTED_ENV = ("DALLE2_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                   "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # a single-host TPU
    ({"SLURM_NTASKS": "1"}, False),
    ({"DALLE2_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False),
    ({"DALLE2_DISTRIBUTED": "1"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"TPU_WORKER_HOSTNAMES": "host0,host1"}, True),
    ({"SLURM_NTASKS": "4"}, True),
])
def test_maybe_initialize_distributed_only_when_asked(monkeypatch, env, expected):
    calls = []
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    gloo = []
    monkeypatch.setattr(sharding, "_use_gloo_for_cpu_collectives", lambda: gloo.append(True))
    assert sharding.maybe_initialize_distributed() is expected
    assert calls == ([((), {})] if expected else [])
    assert gloo == ([True] if expected else [])


def test_maybe_initialize_distributed_passes_the_process_count_and_id(monkeypatch):
    calls = []
    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(sharding, "_use_gloo_for_cpu_collectives", lambda: None)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert sharding.maybe_initialize_distributed()
    assert calls == [((), {"num_processes": 2, "process_id": 1})]
    for value, expected in (("2", "JAX_PROCESS_ID: expected an int in"), ("x", "JAX_PROCESS_ID: expected an int")):
        monkeypatch.setenv("JAX_PROCESS_ID", value)
        with pytest.raises(ValueError, match=expected):
            sharding.maybe_initialize_distributed()
