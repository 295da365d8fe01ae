"""`dalle2-jax plan`: the real train step compiled for a TPU pod topology on this (CPU) host.

libtpu's compiler compiles for a TPU topology it is not running on:
`jax.experimental.topologies.get_topology_desc` gives abstract TPU devices, and
the step that `dalle2-jax train` runs (`training.loop.prepare_step`: the same
task loss, optimizer, EMA, gradient accumulation, sharding rules of
`dalle2_jax.sharding`) is lowered over a mesh of them with the training state as
sharded `ShapeDtypeStruct`s (`jax.eval_shape`: no parameter is ever allocated)
and a batch built from the task's `batch_spec` (the task made from the config
alone, `make_task(..., planning=True)`: no data, no CLIP directory). The
compiled program's `memory_analysis()` gives the bytes per device, its
`cost_analysis()` the FLOPs per device; a program too large for a chip's HBM
fails to compile with RESOURCE_EXHAUSTED, reported as a plan that does not fit.

Two things differ from a run on the pod, both on purpose: the UNet's attention
"auto" resolves to "dense" (what it picks on an accelerator; on this CPU host it
would pick "blocked"), and XLA's cost analysis counts a loop body once, so with
gradient accumulation the FLOPs of the step are the compiled program's times the
number of micro-batches (which also counts the optimizer update that many times:
under 0.1% of a step here).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import tempfile
import time
from typing import Any, Sequence

GIB = 1 << 30
UNET_STAGES = ("decoder", "upsampler")
PLANNED_STAGES = ("clip", "prior", "decoder", "upsampler")


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation as the plan needs it. `hbm_gib` and `peak_tflops` are per chip (dense bf16)
    from Google's system architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e,
    /tpu7x); a JAX device is one chip except on TPU7x, whose chips show as two devices (one per
    TensorCore) sharing the chip's HBM and FLOP/s evenly."""

    name: str
    jax_name: str
    chip_config: str
    hbm_gib: float
    peak_tflops: float
    dims: int  # 3: a 3-D torus (AxBxC), 2: a 2-D torus (AxB)
    devices_per_chip: int = 1


GENERATIONS = {g.name: g for g in (
    Generation("v4", "v4", "megacore", 32, 275, 3),
    Generation("v5e", "v5e", "default", 16, 197, 2),
    Generation("v5p", "v5", "megacore", 95, 459, 3),
    Generation("v6e", "v6e", "default", 32, 918, 2),
    Generation("tpu7x", "tpu7x", "default", 192, 2307, 3, devices_per_chip=2),
)}
ALIASES = {"v5": "v5p", "v5litepod": "v5e", "v6litepod": "v6e"}
# Every generation's multi-host VMs hold 4 chips (2x2x1); hosts = chips / 4 (single-host v5e/v6e
# VMs of 8 chips exist, but a pod slice's VMs have 4).
CHIPS_PER_HOST_BOUNDS = (2, 2, 1)
EXAMPLES = "v4:4x4x4, v5e:16x16, v5p:8x8x8 (or v5:8x8x8), v6e:16x16, tpu7x:2x2x2"


class PlanError(ValueError):
    """A plan that cannot be made (bad topology, libtpu missing); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: Generation
    shape: tuple[int, ...]
    slices: int = 1

    @property
    def name(self) -> str:
        return f"{self.generation.name}:{'x'.join(map(str, self.shape))}"

    @property
    def jax_name(self) -> str:
        return f"{self.generation.jax_name}:{'x'.join(map(str, self.shape))}"

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.slices


def parse_topology(text: str, slices: int = 1) -> Topology:
    """"v5p:8x8x8" -> Topology; raises PlanError naming --topology and the accepted forms."""
    def fail(why: str) -> PlanError:
        return PlanError(f"--topology: {why}, got {text!r}; expected GENERATION:SHAPE with GENERATION one of "
                         f"{sorted(GENERATIONS)} (or {sorted(ALIASES)}), e.g. {EXAMPLES}")

    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
        raise PlanError(f"--slices: expected a positive int, got {slices!r}")
    match = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", str(text).strip().lower())
    if not match:
        raise fail("not of the form GENERATION:AxB[xC]")
    name = ALIASES.get(match.group(1), match.group(1))
    if name not in GENERATIONS:
        raise fail(f"unknown TPU generation {match.group(1)!r}")
    generation = GENERATIONS[name]
    shape = tuple(int(n) for n in match.group(2).split("x"))
    if len(shape) != generation.dims or min(shape) < 1:
        raise fail(f"{name} slices have {generation.dims} positive dimensions")
    return Topology(generation, shape, slices)


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise PlanError("libtpu is not installed: `dalle2-jax plan` compiles with the TPU compiler; install it "
                        "with pip install -c constraints.txt -e \".[tpu]\"")


@contextlib.contextmanager
def _captured_stderr():
    """libtpu prints warnings about the absent TPU hardware straight to fd 2 when it loads; they say
    nothing about a plan. Captured, and shown only if the block fails."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException as error:
            os.dup2(saved, 2)
            capture.seek(0)
            text = capture.read().decode(errors="replace").strip()
            if text:
                error.add_note(f"libtpu said:\n{text}")
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(topology: Topology) -> list:
    """The abstract TPU devices of `topology` (JAX_PLATFORMS needs no "tpu" for this)."""
    require_libtpu()
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask: not on a TPU VM
    # Compiling only: never take libtpu's one-process lock (/tmp/libtpu_lockfile), so plans run side
    # by side with each other and with a training job on a TPU VM.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    with _captured_stderr():
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topology.jax_name, chip_config_name=topology.generation.chip_config,
            chips_per_host_bounds=CHIPS_PER_HOST_BOUNDS, num_slices=topology.slices)
    return list(desc.devices)


# ---------------------------------------------------------------------------------------------
# The 6 x params x tokens estimate of a step's FLOPs (matmul and convolution weights only).

def _path_names(path) -> list[str]:
    return [str(getattr(key, "key", getattr(key, "name", key))) for key in path]


def _unet_positions(names: Sequence[str], size: int, levels: int, text_len: int) -> int:
    """How often a UNet kernel is applied per example: once per pixel of its level's resolution,
    once per text token for the context projections, once for embeddings of the example."""
    joined = "/".join(names)
    if re.search(r"(^|/)(time_embedding|noise_level_embedding)|image_embed|text_embed|time_emb_proj", joined):
        return 1
    if "encoder_hidden_states_proj" in joined or re.search(r"text_(encodings|proj)", joined):
        return text_len
    match = re.match(r"(down_blocks|up_blocks)_(\d+)", names[0])
    if match:
        level = int(match.group(2)) if match.group(1) == "down_blocks" else levels - 1 - int(match.group(2))
        if "downsamplers" in names[0]:
            level += 1
        elif "upsamplers" in names[0]:
            level -= 1
    else:
        level = levels - 1 if names[0].startswith("mid_block") else 0
    side = size // 2 ** max(level, 0)
    if re.search(r"attentions_\d+/(to_k|to_v|add_k_proj|add_v_proj)", joined) and text_len:
        return side * side + text_len  # keys and values of the pixels and of the context
    return side * side


def flops_estimate(stage: str, task: Any, params: Any, batch_size: int) -> float:
    """6 x (kernel parameters x the positions each is applied at) x examples: a step's forward and
    backward matmul/convolution FLOPs, without attention scores, norms or rematerialisation."""
    import jax

    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = _path_names(path)
        if names[-1] != "kernel":
            continue
        if stage == "prior":
            positions = task.batch_spec(1).get("text_encodings", jax.ShapeDtypeStruct((1, 1, 1), "f")).shape[1] + 3
        elif stage == "clip":
            model = task.model
            positions = model.context_length if names[0].startswith("text") else \
                (model.image_size // model.patch_size) ** 2 + 1
        else:
            unet = task.unet
            size = task.crop_size if stage == "upsampler" else task.image_size
            text_len = int(task.config.conditioning.text_len) if unet.use_text_encodings else 0
            positions = _unet_positions(names, size, len(unet.level_channels), text_len)
        total += math.prod(leaf.shape) * positions
    return 6.0 * total * batch_size


# ---------------------------------------------------------------------------------------------
# One plan.

def _per_device_bytes(tree: Any) -> int:
    import jax

    return int(sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                   for leaf in jax.tree.leaves(tree)))


def _hbm_used(message: str) -> tuple[float | None, float | None]:
    """(needed, available) bytes from a RESOURCE_EXHAUSTED compile error, where it says them
    ("... required for HLO temporaries (51.83G) exceeds available HBM (15.75G)", or "Used 20G of 16G hbm")."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    for pattern in (r"\(([\d.]+)([KMGT]?)\)\s+exceeds available HBM\s+\(([\d.]+)([KMGT]?)\)",
                    r"Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm"):
        match = re.search(pattern, message)
        if match:
            return (float(match.group(1)) * units[match.group(2)], float(match.group(3)) * units[match.group(4)])
    return None, None


def _apply_plan_settings(config, batch, mesh, accum) -> None:
    if batch is not None:
        config.batch_size = int(batch)
    if mesh is not None:
        config.mesh.data, config.mesh.fsdp = (int(n) for n in mesh)
    if accum is not None:
        config.optimizer.grad_accum_steps = int(accum)


def make_plan(stage: str, config_spec: str, topology: str | Topology, *, batch: int | None = None,
              mesh: tuple[int, int] | None = None, accum: int | None = None, overrides: Sequence[str] = (),
              slices: int = 1, devices: list | None = None, hbm_gib: float | None = None) -> dict[str, Any]:
    """Compile `stage`'s train step from `config_spec` (+ `overrides`, `batch`, `mesh` (data, fsdp),
    `accum` micro-batches) for `topology` (`hbm_gib`: plan against this much HBM per device instead of
    the chip's, to keep a reserve); returns the plan as a JSON-able dict (`fits` False with a
    `message` when it does not fit). Raises PlanError/ValueError for arguments it cannot plan."""
    import jax

    from dalle2_jax import config_util
    from dalle2_jax.training import entry, loop

    if stage not in PLANNED_STAGES:
        raise PlanError(f"stage: expected one of {PLANNED_STAGES}, got {stage!r}")
    topo = topology if isinstance(topology, Topology) else parse_topology(topology, slices)
    devices = topology_devices(topo) if devices is None else devices
    config = config_util.load_config(config_spec, overrides)
    _apply_plan_settings(config, batch, mesh, accum)
    if stage in UNET_STAGES and config.model.get("attention_impl", "auto") == "auto":
        config.model.attention_impl = "dense"  # what "auto" is on an accelerator
    task = entry.make_task(stage, config, planning=True)
    hosts = len({device.process_index for device in devices})
    device_mesh = loop.mesh_from_config(config, devices)
    batch_size = loop.check_batch_size(config, device_mesh, hosts)
    num_micro = int(config.optimizer.get("grad_accum_steps", 1))
    batch_spec = task.batch_spec(batch_size)
    state, _, batch_shardings, train_step = loop.prepare_step(task, config, batch_spec, device_mesh,
                                                              materialize=False)
    batch_arg = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             batch_spec, batch_shardings)
    generation = topo.generation
    hbm = generation.hbm_gib * GIB / generation.devices_per_chip
    if hbm_gib is not None:
        if not 0 < hbm_gib <= hbm / GIB:
            raise PlanError(f"--hbm-gib: expected a size in (0, {hbm / GIB:g}] GiB (a {generation.name} device's "
                            f"HBM), got {hbm_gib!r}")
        hbm = hbm_gib * GIB
    peak_flops = generation.peak_tflops * 1e12 / generation.devices_per_chip
    num_devices = len(devices)
    params = int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state.params)))
    plan: dict[str, Any] = {
        "stage": stage, "config": config_spec, "topology": topo.name, "jax_topology": topo.jax_name,
        "slices": topo.slices, "chips": num_devices // generation.devices_per_chip, "devices": num_devices,
        "hosts": hosts, "mesh": {"data": int(device_mesh.shape["data"]), "fsdp": int(device_mesh.shape["fsdp"])},
        "batch_size": batch_size, "grad_accum_steps": num_micro,
        "micro_batch_per_device": batch_size // num_micro // num_devices,
        "compute_dtype": str(config.get("compute_dtype", "float32")), "params": params,
        "bytes_per_device": {"params": _per_device_bytes(state.params),
                             "ema_params": _per_device_bytes(state.ema_params),
                             "opt_state": _per_device_bytes(state.opt_state)},
        "hbm_bytes_per_device": int(hbm), "peak_tflops_per_device": peak_flops / 1e12,
    }
    state_bytes = sum(plan["bytes_per_device"].values())
    if state_bytes > hbm:  # the state alone must live in HBM: no need to compile
        plan.update(fits=False, compile_seconds=0.0, peak_bytes_per_device=None, compiler_hbm_limit_bytes=None)
        plan["message"] = _does_not_fit(plan, "the training state alone exceeds HBM; not compiled")
        return plan
    start = time.perf_counter()
    try:
        with _captured_stderr():
            compiled = train_step.lower(state, batch_arg).compile()
    except Exception as error:  # jax's XlaRuntimeError / JaxRuntimeError
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        needed, limit = _hbm_used(str(error))
        plan.update(fits=False, compile_seconds=round(time.perf_counter() - start, 2),
                    peak_bytes_per_device=None, compiler_needed_bytes=needed, compiler_hbm_limit_bytes=limit)
        plan["message"] = _does_not_fit(plan, str(error).strip().splitlines()[0])
        return plan
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    flops = float((compiled.cost_analysis() or {}).get("flops", 0.0)) * num_micro
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
    estimate = flops_estimate(stage, task, state.params, batch_size) / num_devices
    plan["bytes_per_device"].update(
        arguments=int(memory.argument_size_in_bytes), outputs=int(memory.output_size_in_bytes),
        aliased=int(memory.alias_size_in_bytes), temporaries=int(memory.temp_size_in_bytes),
        generated_code=int(memory.generated_code_size_in_bytes))
    plan.update(
        fits=peak <= hbm, peak_bytes_per_device=int(peak), headroom_bytes=int(hbm - peak),
        flops_per_step_per_device=flops, flops_6nd_estimate_per_device=estimate,
        flops_to_estimate=round(flops / estimate, 3) if estimate else None,
        step_seconds_at_peak=flops / peak_flops, step_seconds_at_half_peak=2 * flops / peak_flops,
        compile_seconds=round(compile_seconds, 2))
    if not plan["fits"]:
        plan["message"] = _does_not_fit(plan, "the compiled program's memory exceeds the chip's HBM")
    return plan


def _does_not_fit(plan: dict[str, Any], reason: str) -> str:
    state = plan["bytes_per_device"]
    hbm = plan["hbm_bytes_per_device"]
    state_total = state["params"] + state["ema_params"] + state["opt_state"]
    needed = plan.get("peak_bytes_per_device") or plan.get("compiler_needed_bytes")
    needs = (f"needs {needed / GIB:.1f} GiB per device of its {hbm / GIB:.1f} GiB HBM" if needed
             else f"needs more than its {hbm / GIB:.1f} GiB HBM per device")
    mesh, accum = plan["mesh"], plan["grad_accum_steps"]
    fsdp = f"more fsdp (--mesh data=-1,fsdp={mesh['fsdp'] * 2})"
    more_accum = f"gradient accumulation (--accum {accum * 2})"
    # Parameters, EMA and optimizer state shrink with fsdp; activations with accumulation or batch.
    first, second = (fsdp, more_accum) if state_total > hbm / 2 else (more_accum, fsdp)
    return (f"does not fit: the {plan['stage']} step at batch {plan['batch_size']} ({accum} micro-batch"
            f"{'es' if accum > 1 else ''}) on {plan['topology']}, mesh data={mesh['data']} x fsdp={mesh['fsdp']}, "
            f"{needs}; parameters, EMA and optimizer state take "
            f"{state_total / GIB:.2f} GiB per device. Try {first}, {second}, a smaller --batch, or --search. "
            f"({reason})")


# ---------------------------------------------------------------------------------------------
# --search and the report.

def _powers_of_two_dividing(n: int) -> list[int]:
    return [1 << i for i in range(n.bit_length()) if n % (1 << i) == 0]


def search(stage: str, config_spec: str, topology: str | Topology, *, batch: int | None = None,
           overrides: Sequence[str] = (), slices: int = 1, max_accum: int = 64, hbm_gib: float | None = None,
           progress=None) -> dict[str, Any]:
    """Plans over mesh shapes (data x fsdp, fsdp a power of two) and gradient accumulation steps;
    {"plans": [...tried], "best": the fastest plan that fits, or None}. Fastest: the fewest FLOPs per
    device (step time at peak, to 1%), then the smaller fsdp and fewer micro-batches, which
    communicate less and keep the matrix units busier. Walks fsdp upwards, at each trying fewer
    micro-batches than the best so far, and stops at the first plan that fits without accumulating
    (or once the state, which fsdp shrinks, is under 5% of HBM)."""
    from dalle2_jax import config_util

    topo = topology if isinstance(topology, Topology) else parse_topology(topology, slices)
    devices = topology_devices(topo)
    config = config_util.load_config(config_spec, overrides)
    batch_size = int(batch if batch is not None else config.batch_size)
    plans, best = [], None
    for fsdp in _powers_of_two_dividing(len(devices)):
        accum = 1
        while accum <= max_accum and batch_size % (len(devices) * accum) == 0:
            if best is not None and accum >= best["grad_accum_steps"]:
                break
            plan = make_plan(stage, config_spec, topo, batch=batch_size, mesh=(-1, fsdp), accum=accum,
                             overrides=overrides, devices=devices, hbm_gib=hbm_gib)
            plans.append(plan)
            if progress is not None:
                progress(plan)
            if plan["fits"]:
                if best is None or _rank(plan) < _rank(best):
                    best = plan
                break
            if plan["compile_seconds"] == 0.0:  # the state alone does not fit: accumulation cannot help
                break
            accum *= 2
        if best is not None and best["grad_accum_steps"] == 1:
            break
        state = plans[-1]["bytes_per_device"]
        if state["params"] + state["ema_params"] + state["opt_state"] < 0.05 * plans[-1]["hbm_bytes_per_device"]:
            break  # more fsdp shrinks only the state, and it is under 5% of HBM: nothing to gain
    return {"plans": plans, "best": best}


def _rank(plan: dict[str, Any]) -> tuple:
    return (round(math.log(max(plan["step_seconds_at_peak"], 1e-12)) / math.log(1.01)),
            plan["mesh"]["fsdp"], plan["grad_accum_steps"])


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def format_plan(plan: dict[str, Any]) -> str:
    """The human-readable report of one plan."""
    b = plan["bytes_per_device"]
    lines = [
        f"{plan['stage']} {plan['config']} on {plan['topology']} ({plan['jax_topology']} x {plan['slices']} slice(s)): "
        f"{plan['chips']} chips, {plan['devices']} devices, {plan['hosts']} hosts",
        f"  mesh data={plan['mesh']['data']} x fsdp={plan['mesh']['fsdp']}, batch {plan['batch_size']} = "
        f"{plan['grad_accum_steps']} micro-batch(es) x {plan['micro_batch_per_device']} per device, "
        f"{plan['compute_dtype']}, {plan['params'] / 1e6:.1f}M parameters",
        f"  per device (GiB): params {_gib(b['params'])}, EMA {_gib(b['ema_params'])}, optimizer "
        f"{_gib(b['opt_state'])}, arguments {_gib(b.get('arguments'))}, temporaries {_gib(b.get('temporaries'))}, "
        f"peak {_gib(plan.get('peak_bytes_per_device'))} of {_gib(plan['hbm_bytes_per_device'])} HBM",
    ]
    if plan["fits"]:
        lines += [
            f"  headroom {_gib(plan['headroom_bytes'])} GiB; {plan['flops_per_step_per_device'] / 1e12:.3g} TFLOP per "
            f"step per device (6·N·tokens estimate {plan['flops_6nd_estimate_per_device'] / 1e12:.3g}, ratio "
            f"{plan['flops_to_estimate']})",
            f"  step time at the peak {plan['peak_tflops_per_device']:.0f} TFLOP/s: "
            f"{_seconds(plan['step_seconds_at_peak'])} s, at 50%: {_seconds(plan['step_seconds_at_half_peak'])} s; "
            f"compiled in {plan['compile_seconds']:.1f} s",
        ]
    else:
        lines.append("  " + plan["message"])
    return "\n".join(lines)


def format_search(result: dict[str, Any]) -> str:
    """The table of the plans --search tried, the chosen one marked with *."""
    header = (f"{'':1} {'data':>5} {'fsdp':>5} {'accum':>5} {'micro/dev':>9} {'state GiB':>9} {'peak GiB':>8} "
              f"{'HBM GiB':>7} {'fits':>4} {'s@peak':>8} {'s@50%':>8} {'compile s':>9}")
    rows = [header]
    for plan in result["plans"]:
        b = plan["bytes_per_device"]
        state = b["params"] + b["ema_params"] + b["opt_state"]
        rows.append(
            f"{'*' if plan is result['best'] else '':1} {plan['mesh']['data']:>5} {plan['mesh']['fsdp']:>5} "
            f"{plan['grad_accum_steps']:>5} {plan['micro_batch_per_device']:>9} {state / GIB:>9.2f} "
            f"{_gib(plan.get('peak_bytes_per_device')):>8} {plan['hbm_bytes_per_device'] / GIB:>7.1f} "
            f"{'yes' if plan['fits'] else 'no':>4} {_seconds(plan.get('step_seconds_at_peak')):>8} "
            f"{_seconds(plan.get('step_seconds_at_half_peak')):>8} {plan['compile_seconds']:>9.1f}")
    best = result["best"]
    rows.append(f"fastest plan that fits: data={best['mesh']['data']} x fsdp={best['mesh']['fsdp']}, "
                f"{best['grad_accum_steps']} micro-batch(es)" if best else
                "no plan fits: a smaller --batch or a larger topology")
    return "\n".join(rows)


def run_plan(args, overrides: Sequence[str]) -> int:
    """`dalle2-jax plan`: prints the plan (or the --search table), writes --json; 0 when it fits, 1 when not."""
    import json

    mesh = None if args.mesh is None else parse_mesh(args.mesh)
    if args.search:
        if mesh is not None or args.accum is not None:
            raise PlanError("--search: tries the mesh shapes and accumulation steps itself; drop --mesh and --accum")
        result = search(args.stage, args.config, args.topology, batch=args.batch, overrides=overrides,
                        slices=args.slices, hbm_gib=args.hbm_gib, progress=lambda p: print(
                            f"  tried data={p['mesh']['data']} fsdp={p['mesh']['fsdp']} accum={p['grad_accum_steps']}: "
                            f"{'fits' if p['fits'] else 'does not fit'} ({p['compile_seconds']:.1f} s)", flush=True))
        print(format_search(result))
        if result["best"] is not None:
            print(format_plan(result["best"]))
        payload, fits = result, result["best"] is not None
    else:
        payload = make_plan(args.stage, args.config, args.topology, batch=args.batch, mesh=mesh, accum=args.accum,
                            overrides=overrides, slices=args.slices, hbm_gib=args.hbm_gib)
        print(format_plan(payload))
        fits = payload["fits"]
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if fits else 1


def parse_mesh(text: str) -> tuple[int, int]:
    """"data=-1,fsdp=16" -> (-1, 16); either may be left out (data -1, fsdp 1)."""
    sizes = {"data": -1, "fsdp": 1}
    for part in filter(None, str(text).split(",")):
        key, _, value = part.partition("=")
        if key.strip() not in sizes or not re.fullmatch(r"-?\d+", value.strip()):
            raise PlanError(f"--mesh: expected data=N,fsdp=M (N or M may be -1), got {text!r}")
        sizes[key.strip()] = int(value)
    return sizes["data"], sizes["fsdp"]
