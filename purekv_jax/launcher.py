"""A local multi-process job: N copies of one ``purekv`` command on this machine, tied together by JAX's
coordination service the way the hosts of a pod slice are (for tests, benchmarks, and trying a pod job
before renting one).

Each process gets the environment a cluster launcher would give it (:func:`process_env`):
``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, and a CPU backend
with ``--xla_force_host_platform_device_count`` devices (``JAX_PLATFORMS=cpu``; collectives through gloo),
so ``--processes 2 --devices-per-process 4`` behaves like two hosts of four chips. The processes share
this terminal; each one's error line names its process.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

#: XLA flag that sets the number of simulated CPU devices
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


class LaunchError(ValueError):
    """A launcher setting that cannot work (process or device counts)."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for the coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, count: int, port: int, devices_per_process: int,
                base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of process ``index`` of ``count``: ``base`` (default: this process's) with the
    JAX multi-process variables and ``devices_per_process`` CPU devices (any earlier device-count flag in
    ``XLA_FLAGS`` is replaced; other flags are kept)."""
    env = dict(os.environ if base is None else base)
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", env.get("XLA_FLAGS", "")).split()
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(index),
        JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices_per_process}"]),
    )
    return env


def strip_options(argv: Sequence[str], options: Sequence[str]) -> list[str]:
    """``argv`` without each of ``options`` and its value (``--opt V`` or ``--opt=V``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif not any(arg.startswith(opt + "=") for opt in options):
            out.append(arg)
    return out


def launch_local(argv: Sequence[str], processes: int, devices_per_process: int = 4, *, grace_s: float = 90.0,
                 base_env: Mapping[str, str] | None = None) -> int:
    """Runs ``python -m purekv_jax.cli *argv`` as ``processes`` processes of one job and waits for them.

    Returns 0 when every process succeeds, else the exit status of the first one that failed. A process
    that fails stops the others through the job (:mod:`purekv_jax.multihost`); any still running
    ``grace_s`` seconds later are killed. Ctrl-C reaches every process (one process group).
    """
    if processes < 1:
        raise LaunchError(f"--processes {processes} must be >= 1")
    if devices_per_process < 1:
        raise LaunchError(f"--devices-per-process {devices_per_process} must be >= 1")
    port = free_port()
    cmd = [sys.executable, "-m", "purekv_jax.cli", *argv]
    procs = [subprocess.Popen(cmd, env=process_env(i, processes, port, devices_per_process, base_env))
             for i in range(processes)]
    first_failure: int | None = None
    failed_at: float | None = None
    while True:
        try:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            for c in codes:
                if c not in (None, 0) and first_failure is None:
                    first_failure, failed_at = c, time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        print(f"purekv launcher: process {i}/{processes} still running {grace_s:g} s after "
                              "another failed; killed", file=sys.stderr, flush=True)
                        p.send_signal(signal.SIGKILL)
            time.sleep(0.1)
        except KeyboardInterrupt:  # the processes got it too: wait for them to stop
            failed_at = failed_at or time.monotonic()
            first_failure = first_failure or 130
    for c in codes:
        if c != 0 and first_failure is None:
            first_failure = c
    if first_failure is None:
        return 0
    return 128 - first_failure if first_failure < 0 else first_failure
