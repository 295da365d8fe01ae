"""`dalle2-jax plan`: the train step of each tiny stage compiled for a v5e:2x2 TPU slice by libtpu
on this CPU host (the tpu extra, installed by `make`), with the numbers checked against what they
must be; a plan that does not fit, a bad topology and a missing libtpu give messages, not tracebacks."""
import importlib.util
import json
import math

import jax
import pytest

from dalle2_jax import cli, config_util, plan
from dalle2_jax.pipeline.stages import abstract_variables, build_module

GIB = 1 << 30
TINY = {"clip": "configs/clip.py:tiny", "prior": "configs/prior.py:tiny", "decoder": "configs/decoder.py:tiny",
        "upsampler": "configs/upsampler.py:tiny"}
FIELDS = {"stage", "config", "topology", "jax_topology", "slices", "chips", "devices", "hosts", "mesh", "batch_size",
          "grad_accum_steps", "micro_batch_per_device", "compute_dtype", "params", "bytes_per_device",
          "hbm_bytes_per_device", "peak_tflops_per_device", "fits", "peak_bytes_per_device", "headroom_bytes",
          "flops_per_step_per_device", "flops_6nd_estimate_per_device", "flops_to_estimate", "step_seconds_at_peak",
          "step_seconds_at_half_peak", "compile_seconds"}


@pytest.fixture(autouse=True)
def _libtpu_installed():
    # Never a skip: without libtpu these tests fail, saying how to install it.
    assert importlib.util.find_spec("libtpu") is not None, (
        "libtpu is missing: the plan tests need the tpu extra, installed by `make` "
        "(pip install -c constraints.txt -e \".[dev,tpu]\")")


def _run_cli(argv, capsys) -> tuple[int, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out


@pytest.mark.parametrize("stage", sorted(TINY))
def test_tiny_stage_plan_on_v5e_2x2(stage, tmp_path, capsys):
    path = tmp_path / "plan.json"
    code, out = _run_cli(["plan", "--stage", stage, "--config", TINY[stage], "--topology", "v5e:2x2",
                          "--batch", "8", "--json", str(path)], capsys)
    assert code == 0, out
    result = json.loads(path.read_text())
    assert FIELDS <= set(result), FIELDS - set(result)
    assert (result["topology"], result["jax_topology"], result["chips"], result["devices"], result["hosts"]) == \
        ("v5e:2x2", "v5e:2x2", 4, 4, 1)
    assert result["mesh"] == {"data": 4, "fsdp": 1} and result["micro_batch_per_device"] == 2
    assert result["fits"] is True and result["compute_dtype"] == "float32"

    # The parameters are those of the model the pipeline builds from the same config.
    config = config_util.load_config(TINY[stage])
    expected = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(
        abstract_variables(stage, build_module(stage, config), config)["params"]))
    assert result["params"] == expected
    memory = result["bytes_per_device"]
    # float32 and replicated (fsdp=1): 4 bytes a parameter, the same for the EMA, two Adam moments.
    assert memory["params"] == memory["ema_params"] == 4 * expected
    assert 2 * memory["params"] <= memory["opt_state"] <= 2 * memory["params"] + 4096
    state = memory["params"] + memory["ema_params"] + memory["opt_state"]
    # + the batch and the step counters, and TPU tiling pads small tensors (a 16-channel norm's scale).
    assert state <= memory["arguments"] <= 1.5 * state + (1 << 20)
    assert memory["aliased"] >= 0.9 * state  # the donated state is updated in place
    assert result["peak_bytes_per_device"] == (memory["arguments"] + memory["outputs"] - memory["aliased"]
                                               + memory["temporaries"] + memory["generated_code"])
    assert result["hbm_bytes_per_device"] == 16 * GIB
    assert result["headroom_bytes"] == 16 * GIB - result["peak_bytes_per_device"]

    # XLA's FLOPs per device agree with 6 x kernel parameters x positions (measured 0.77-1.13).
    assert 0.6 < result["flops_to_estimate"] < 1.5, result["flops_to_estimate"]
    flops = result["flops_per_step_per_device"]
    assert result["step_seconds_at_peak"] == pytest.approx(flops / 197e12)
    assert result["step_seconds_at_half_peak"] == pytest.approx(2 * flops / 197e12)
    assert result["compile_seconds"] > 0
    assert f"{stage} {TINY[stage]} on v5e:2x2" in out and "headroom" in out


def test_oversized_batch_does_not_fit_with_numbers_and_suggestions(tmp_path, capsys):
    path = tmp_path / "plan.json"
    code, out = _run_cli(["plan", "--stage", "clip", "--config", TINY["clip"], "--topology", "v5e:2x2",
                          "--batch", "131072", "--json", str(path)], capsys)
    assert code == 1
    result = json.loads(path.read_text())
    assert result["fits"] is False
    assert result["compiler_needed_bytes"] > 16 * GIB  # the compiler's RESOURCE_EXHAUSTED, with its numbers
    message = result["message"]
    assert message.startswith("does not fit") and message in out
    for part in ("batch 131072", "of its 16.0 GiB HBM", "--accum 2", "fsdp=2", "a smaller --batch", "--search"):
        assert part in message, part


def test_a_state_larger_than_hbm_does_not_fit_without_compiling():
    # The 3.4B decoder's float32 parameters, EMA and Adam moments on 4 chips without fsdp: ~51 GiB each.
    result = plan.make_plan("decoder", "configs/decoder.py:paper", "v5e:2x2", batch=8, mesh=(-1, 1))
    assert result["fits"] is False and result["compile_seconds"] == 0.0
    state = sum(result["bytes_per_device"].values())
    assert state == pytest.approx(16 * result["params"], rel=0.01) and state > 16 * GIB
    assert "parameters, EMA and optimizer state take" in result["message"]
    assert result["message"].index("fsdp") < result["message"].index("--accum")  # fsdp first: state-bound


@pytest.mark.parametrize("name, jax_name, chips, devices, hosts", [
    ("v5p:4x4x4", "v5:4x4x4", 64, 64, 16),
    ("v5:2x2x1", "v5:2x2x1", 4, 4, 1),
    ("v4:4x4x4", "v4:4x4x4", 64, 64, 16),
    ("v6e:4x4", "v6e:4x4", 16, 16, 4),
    ("tpu7x:2x2x2", "tpu7x:2x2x2", 8, 16, 2),  # two devices (TensorCores) a chip
])
def test_topology_names_chips_and_hosts(name, jax_name, chips, devices, hosts):
    topology = plan.parse_topology(name)
    assert topology.jax_name == jax_name and topology.chips == chips
    found = plan.topology_devices(topology)
    assert len(found) == devices
    assert len({d.process_index for d in found}) == hosts


@pytest.mark.parametrize("name", ["v9:2x2", "v5e:2x2x2", "v5p:8x8", "v5e", "v5e:0x4"])
def test_bad_topology_names_the_argument_and_the_accepted_ones(name):
    with pytest.raises(plan.PlanError, match="--topology") as error:
        plan.parse_topology(name)
    for accepted in ("v4", "v5e", "v5p", "v6e", "tpu7x", "v5p:8x8x8"):
        assert accepted in str(error.value)


def test_bad_topology_on_the_command_line_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--stage", "clip", "--config", TINY["clip"], "--topology", "v9:2x2"])
    assert "dalle2-jax plan: error: --topology: unknown TPU generation 'v9'" in str(exit_info.value)


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(plan.PlanError, match=r'libtpu is not installed.*pip install .*"\.\[tpu\]"'):
        plan.topology_devices(plan.parse_topology("v5e:2x2"))


def test_search_prints_the_table_and_picks_the_fastest_plan_that_fits(tmp_path, capsys):
    # Against 60 MiB of HBM the tiny CLIP's step at batch 64 (~70 MiB at once) fits only by accumulating.
    path = tmp_path / "search.json"
    code, out = _run_cli(["plan", "--stage", "clip", "--config", TINY["clip"], "--topology", "v5e:2x2",
                          "--batch", "64", "--hbm-gib", str(60 / 1024), "--search", "--json", str(path)], capsys)
    assert code == 0, out
    result = json.loads(path.read_text())
    tried = [(p["mesh"]["fsdp"], p["grad_accum_steps"], p["fits"]) for p in result["plans"]]
    assert tried[0] == (1, 1, False), tried
    best = result["best"]
    assert best["fits"] and best["grad_accum_steps"] > 1 and best["peak_bytes_per_device"] <= 60 << 20
    assert best["hbm_bytes_per_device"] == 60 << 20
    fitting = [p for p in result["plans"] if p["fits"]]
    assert all(p["step_seconds_at_peak"] >= 0.99 * best["step_seconds_at_peak"] for p in fitting)
    assert "fsdp accum" in " ".join(out.split()) and \
        f"fastest plan that fits: data={best['mesh']['data']} x fsdp={best['mesh']['fsdp']}" in out


@pytest.mark.parametrize("name, slices, fsdp, shape", [
    ("v4:4x4x4", 1, 8, {"data": 8, "fsdp": 8}),  # 8 is no product of the 4x4x4 torus axes: split one
    ("v5p:8x8x8", 1, 16, {"data": 32, "fsdp": 16}),
    ("v5e:2x2", 2, 2, {"data": 4, "fsdp": 2}),  # two slices: data spans them, fsdp stays in one
])
def test_sharding_makes_meshes_of_pod_topologies(name, slices, fsdp, shape):
    from dalle2_jax import sharding

    devices = plan.topology_devices(plan.parse_topology(name, slices))
    mesh = sharding.make_mesh(-1, fsdp, devices)
    assert dict(mesh.shape) == shape
    if slices > 1:
        for row in mesh.devices:  # each fsdp group inside one slice
            assert len({d.slice_index for d in row}) == 1
