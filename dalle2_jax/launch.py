"""`dalle2-jax launch --processes N -- COMMAND ...`: N local processes that form one JAX run.

Each process runs `python -m dalle2_jax.cli COMMAND ...` with JAX_COORDINATOR_ADDRESS (a free
port on 127.0.0.1), JAX_NUM_PROCESSES and JAX_PROCESS_ID set, so `dalle2-jax train` initialises
`jax.distributed` and the processes share one mesh, as the hosts of a pod slice do (CPU
processes talk through gloo). Their output is prefixed with the process index; when one
process fails the others are stopped and the launcher exits with the failed process's status.
`--devices-per-process K` gives each process K simulated CPU devices (XLA_FLAGS).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

STOP_GRACE_SECONDS = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _with_device_count(xla_flags: str, count: int) -> str:
    kept = [flag for flag in xla_flags.split() if not flag.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={count}"])


def process_env(index: int, num_processes: int, coordinator: str, devices_per_process: int | None,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of process `index`."""
    env = dict(os.environ if base is None else base)
    env.update(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
    if devices_per_process is not None:
        env["XLA_FLAGS"] = _with_device_count(env.get("XLA_FLAGS", ""), devices_per_process)
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _pump(index: int, stream, lock: threading.Lock) -> None:
    prefix = f"[{index}] "
    for line in iter(stream.readline, ""):
        with lock:
            sys.stdout.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            sys.stdout.flush()
    stream.close()


def _stop(processes: Sequence[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def launch(command: Sequence[str], num_processes: int, *, devices_per_process: int | None = None,
           port: int | None = None) -> int:
    """Run `dalle2-jax COMMAND...` as `num_processes` processes; returns the exit status
    (0 when all succeeded, else the first failure's)."""
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"processes: expected a positive int, got {num_processes!r}")
    if devices_per_process is not None and (isinstance(devices_per_process, bool)
                                            or not isinstance(devices_per_process, int) or devices_per_process < 1):
        raise ValueError(f"devices_per_process: expected a positive int, got {devices_per_process!r}")
    command = list(command)
    if not command:
        raise ValueError("command: expected a dalle2-jax command after '--', e.g. -- train clip --config ...")
    if command[0] in ("launch", "dalle2-jax"):
        raise ValueError(f"command: expected a dalle2-jax command such as 'train', got {command[0]!r}")
    coordinator = f"127.0.0.1:{port or free_port()}"
    lock = threading.Lock()
    processes, pumps = [], []
    for index in range(num_processes):
        process = subprocess.Popen(
            [sys.executable, "-m", "dalle2_jax.cli", *command],
            env=process_env(index, num_processes, coordinator, devices_per_process),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        processes.append(process)
        pump = threading.Thread(target=_pump, args=(index, process.stdout, lock), daemon=True)
        pump.start()
        pumps.append(pump)

    previous = {sig: signal.signal(sig, lambda *_: _stop(processes)) for sig in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        running = set(range(num_processes))
        while running:
            for index in sorted(running):
                code = processes[index].poll()
                if code is None:
                    continue
                running.discard(index)
                if code != 0 and status == 0:
                    status = code
                    with lock:
                        print(f"[launch] process {index} exited with status {code}; stopping the others",
                              file=sys.stderr, flush=True)
                    _stop(processes)
            time.sleep(0.1)
    finally:
        _stop(processes)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for pump in pumps:
            pump.join(timeout=5)
    if status < 0:  # killed by a signal: report it the way a shell does
        status = 128 - status
    return status


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1:]
    else:
        own, command = argv, []
    parser = argparse.ArgumentParser(
        prog="dalle2-jax launch",
        description="Run a dalle2-jax command as N local processes forming one JAX run (multi-host "
                    "behaviour on one machine): dalle2-jax launch --processes 2 -- train clip --config ...")
    parser.add_argument("--processes", type=int, required=True, help="number of processes")
    parser.add_argument("--devices-per-process", type=int, default=None,
                        help="simulated CPU devices per process (sets XLA_FLAGS); default: the environment's")
    parser.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(own)
    if not command:
        parser.error("expected the command after '--', e.g. -- train clip --config configs/clip.py:tiny ...")
    try:
        return launch(command, args.processes, devices_per_process=args.devices_per_process, port=args.port)
    except ValueError as error:
        parser.error(str(error))
