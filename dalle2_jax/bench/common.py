"""Timing helpers shared by the benchmarks: compile timing, medians, XLA cost analysis, matmul ceiling."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


class Timing(list):
    """Wall seconds of each timed call; `.cpu` holds this process's CPU seconds of each call.

    On a shared machine the wall time includes waiting for cores; CPU seconds
    divided by the core count is what the run would take on an idle machine.
    """

    cpu: list[float]


def compile_timed(jitted: Callable, *args, **kwargs) -> tuple[Any, float]:
    """(compiled executable, wall seconds spent lowering + compiling)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


def time_calls(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5) -> Timing:
    """Seconds of `repeats` calls of `fn` after `warmup` untimed ones (results blocked on)."""
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    for _ in range(warmup):
        block(fn())
    times, cpu = Timing(), []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        block(fn())
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    times.cpu = cpu
    return times


def cpu_cores() -> int:
    """Cores this process may run on (what CPU seconds are divided by)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def flops_of(stage: Any) -> float:
    """FLOPs of one execution from XLA's cost analysis of a compiled or lowered computation (0.0 when none)."""
    analysis = stage.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def matmul_rates(n: int = 2048, *, dtype=jnp.float32, warmup: int = 2, repeats: int = 5) -> Timing:
    """GFLOP/s of an n x n @ n x n matmul per timed call; `.cpu`: the same from CPU seconds per core."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(jnp.matmul).lower(a, b).compile()
    times = time_calls(lambda: matmul(a, b), warmup=warmup, repeats=repeats)
    flops, cores = 2.0 * n**3, cpu_cores()
    rates = Timing(flops / s / 1e9 for s in times)
    rates.cpu = [flops / (c / cores) / 1e9 for c in times.cpu]
    return rates


def matmul_gflops_per_s(n: int = 2048, *, dtype=jnp.float32, warmup: int = 2, repeats: int = 5) -> float:
    """The machine's practical ceiling: median GFLOP/s of an n x n @ n x n matmul."""
    return median(matmul_rates(n, dtype=dtype, warmup=warmup, repeats=repeats))


# Dense bf16 peak of one device in TFLOP/s (vendor data sheets, no structured sparsity), matched as
# substrings of jax's `device_kind` in this order, so "H100 PCIe" precedes "H100" and "L40S" "L4".
# A jax TPU device is a chip for these generations (v2 and v3 expose cores, hence left out).
PEAK_BF16_TFLOPS = (
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
    ("B200", 2250.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
    ("L40S", 362.0), ("L4", 121.0),
)


def peak_tflops(platform: str, device_kind: str, override: float | None = None) -> float | None:
    """One device's bf16 peak TFLOP/s: `override` if given, else the table's; None on CPU or when unknown."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"--peak-tflops: expected a positive TFLOP/s figure, got {override}")
        return float(override)
    if platform == "cpu":
        return None
    return next((tflops for name, tflops in PEAK_BF16_TFLOPS if name.lower() in device_kind.lower()), None)


def device_info() -> dict[str, Any]:
    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def emit(result: dict[str, Any], stream=None) -> None:
    """Prints the one JSON object of a benchmark run."""
    stream = stream or sys.stdout
    stream.write(json.dumps(result, sort_keys=False) + "\n")
    stream.flush()
