"""One job over several processes (one per host, as on a TPU pod slice or a SLURM allocation): the same
decisions in every process, and one clear stop on every host when any process fails.

JAX's multi-controller runtime runs the same program in every process, and every jitted step over a
global mesh is a collective: a process that stops, or that takes another branch (another batch, another
request order), leaves the others waiting inside a collective that has no timeout. :class:`Job` keeps the
processes together through the key-value store of JAX's coordination service (the one
:func:`jax.distributed.initialize` starts in process 0), whose calls do time out:

- :meth:`Job.same` / :meth:`Job.agree`: every process posts a value (a digest of what it is about to run)
  and reads every other's, waiting at most ``sync_s``; differing values raise :class:`ProcessesDisagree`
  in every process, a process that does not arrive raises :class:`PeerTimeout`.
- :meth:`Job.broadcast`: process 0's bytes (the ids already in the output file) in every process.
- a watchdog thread: every ``heartbeat_s`` it bumps this process's counter and reads the others'; a
  counter that stands still for ``peer_s`` (a process killed, crashed or cut off) or a failure posted by
  another process (:meth:`Job.fail`) prints one line and ends this process with ``os._exit`` (the main
  thread may be blocked in a collective that would never return). JAX's own heartbeat timeout is set
  longer than ``peer_s``, so this line, not the runtime's abort, is what a host shows.

A process that fails on its own (a bad file, an exception) prints its line, posts it with
:meth:`Job.fail` and ends with its exit status; every other process prints
``PROG [process j/n]: error: stopped: process i/n failed: <its line>`` and ends with the same status.
In a single process every method is a no-op (``same`` returns at once, no thread runs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable

import jax
from jax._src import distributed as jax_distributed  # the coordination service's key-value client (no public accessor)

#: key prefix of everything this module stores in the coordination service
PREFIX = "purekv"
#: values of the key-value store are sent in pieces of at most this many bytes
CHUNK_BYTES = 1 << 20


class JobError(ValueError):
    """The processes of a multi-process job cannot go on together."""


class ProcessesDisagree(JobError):
    """The processes would run different things (different files, settings or batches)."""


class PeerTimeout(JobError):
    """A process did not reach a point every process must reach, within the timeout."""


@dataclasses.dataclass(frozen=True)
class JobTimeouts:
    """``peer_s``: a process whose heartbeat stands still this long is taken as dead (every host stops);
    ``sync_s``: how long a process waits for the others at an agreement point (a slow host: one batch's
    preprocessing, or the first compile); ``heartbeat_s``: the watchdog's period."""

    peer_s: float = 60.0
    sync_s: float = 1800.0
    heartbeat_s: float = 1.0

    def __post_init__(self):
        for name in ("peer_s", "sync_s", "heartbeat_s"):
            value = getattr(self, name)
            if not value > 0:
                raise JobError(f"JobTimeouts.{name}={value!r} must be > 0")
        if self.peer_s < 3 * self.heartbeat_s:
            raise JobError(f"JobTimeouts.peer_s={self.peer_s:g} must be at least 3 heartbeats "
                           f"(heartbeat_s={self.heartbeat_s:g})")

    @property
    def runtime_heartbeat_s(self) -> int:
        """JAX's own heartbeat timeout: longer than ``peer_s``, so the watchdog reports a dead peer first."""
        return int(self.peer_s * 2 + 30)


def digest(*parts) -> str:
    """A short sha256 of the ``repr`` / bytes of ``parts`` (what :meth:`Job.same` compares)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, (bytes, bytearray, memoryview)) else repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class Job:
    """This process's view of the job: ``index`` of ``count`` processes, the coordination client (None in
    a single process) and the timeouts. See the module doc."""

    def __init__(self, prog: str, timeouts: JobTimeouts = JobTimeouts(), client=None, index: int = 0,
                 count: int = 1):
        self.timeouts = timeouts
        self.client = client
        self.index = index
        self.count = count
        self.prog = f"{prog} [process {index}/{count}]" if count > 1 else prog
        self.round = 0
        self.stop_event = threading.Event()
        self.watchdog: threading.Thread | None = None
        self.exit: Callable[[int], None] = os._exit  # tests replace it

    @classmethod
    def current(cls, prog: str, timeouts: JobTimeouts = JobTimeouts()) -> Job:
        """The job of this process: after :func:`jax.distributed.initialize`, all its processes; else one."""
        client = jax_distributed.global_state.client
        if jax.process_count() == 1:
            return cls(prog, timeouts)
        if client is None:  # e.g. a TPU pod slice whose runtime joined the hosts without jax.distributed
            raise JobError(f"this process is one of {jax.process_count()} but jax.distributed is not initialised, "
                           "so the processes cannot coordinate; add --distributed (or set JAX_COORDINATOR_ADDRESS, "
                           "JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
        return cls(prog, timeouts, client, jax.process_index(), jax.process_count())

    @property
    def multiprocess(self) -> bool:
        return self.count > 1

    @property
    def is_writer(self) -> bool:
        """Process 0 writes the job's files (results, summary)."""
        return self.index == 0

    # -------------------------------------------------------------------------------- agreement
    def agree(self, what: str, value: str) -> list[str]:
        """Every process's ``value`` for this agreement point, by process index (waits for all)."""
        if not self.multiprocess:
            return [value]
        self.round += 1
        key = f"{PREFIX}/agree/{self.round}"
        self.client.key_value_set(f"{key}/{self.index}", value)
        values = [self.wait_for(f"{key}/{p}", what, p) for p in range(self.count)]
        if self.round > 1:  # every process has read round - 1 (it posted this round): drop my old value
            self.client.key_value_delete(f"{PREFIX}/agree/{self.round - 1}/{self.index}")
        return values

    def same(self, what: str, value: str) -> None:
        """Raises :class:`ProcessesDisagree` (in every process) unless all processes hold ``value``."""
        values = self.agree(what, value)
        if len(set(values)) > 1:
            groups: dict[str, list[int]] = {}
            for p, v in enumerate(values):
                groups.setdefault(v, []).append(p)
            shown = "; ".join(f"process {','.join(map(str, ps))}: {v[:120]}" for v, ps in groups.items())
            raise ProcessesDisagree(f"{what} differs between the processes ({shown}); every process must "
                                    "run the same command on the same files")

    def broadcast(self, what: str, data: bytes) -> bytes:
        """Process 0's ``data`` in every process (``data`` of the others is ignored)."""
        if not self.multiprocess:
            return data
        self.round += 1
        key = f"{PREFIX}/broadcast/{self.round}"
        if self.index == 0:
            pieces = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
            for i, piece in enumerate(pieces):
                self.client.key_value_set_bytes(f"{key}/{i}", piece)
            self.client.key_value_set(f"{key}/count", str(len(pieces)))
            return data
        n = int(self.wait_for(f"{key}/count", what, 0))
        return b"".join(self.wait_for(f"{key}/{i}", what, 0, as_bytes=True) for i in range(n))

    def wait_for(self, key: str, what: str, process: int, as_bytes: bool = False):
        get = self.client.blocking_key_value_get_bytes if as_bytes else self.client.blocking_key_value_get
        try:
            return get(key, int(self.timeouts.sync_s * 1000))
        except jax.errors.JaxRuntimeError as err:
            if "DEADLINE_EXCEEDED" not in str(err):
                raise
            raise PeerTimeout(f"process {process} of {self.count} did not reach {what} within "
                              f"{self.timeouts.sync_s:g} s (hung, much slower, or running another command; "
                              "see --sync-timeout)") from None

    # -------------------------------------------------------------------------------- failures
    def start_watchdog(self) -> None:
        """Starts the heartbeat / failure watch (multi-process only; see the module doc)."""
        if not self.multiprocess or self.watchdog is not None:
            return
        self.client.key_value_set(f"{PREFIX}/alive/{self.index}", "0", allow_overwrite=True)
        self.watchdog = threading.Thread(target=self.watch, name="purekv-job-watchdog", daemon=True)
        self.watchdog.start()

    def watch(self) -> None:
        beat = 0
        seen: dict[int, tuple[str, float]] = {}
        while not self.stop_event.wait(self.timeouts.heartbeat_s):
            try:
                beat += 1
                self.client.key_value_set(f"{PREFIX}/alive/{self.index}", str(beat), allow_overwrite=True)
                failed = dict(self.client.key_value_dir_get(f"{PREFIX}/failed/"))
                alive = dict(self.client.key_value_dir_get(f"{PREFIX}/alive/"))
                finished = {k.rsplit("/", 1)[-1] for k, _ in self.client.key_value_dir_get(f"{PREFIX}/finished/")}
            except Exception as err:  # noqa: BLE001 - the coordination service itself is gone
                if self.stop_event.is_set():
                    return
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                self.stop_here(1, f"lost the job's coordination service (process 0 stopped or its host is "
                                  f"unreachable): {first[:200]}")
                return
            others = {k: v for k, v in failed.items() if not k.endswith(f"/{self.index}")}
            if others:
                code, _, line = sorted(others.items())[0][1].partition("|")
                self.stop_here(int(code), f"stopped: {line}")
                return
            now = time.monotonic()
            for p in range(self.count):
                if p == self.index or str(p) in finished:
                    continue
                value = alive.get(f"{PREFIX}/alive/{p}", "")
                if p not in seen or seen[p][0] != value:
                    seen[p] = (value, now)
                elif now - seen[p][1] > self.timeouts.peer_s:
                    self.stop_here(1, f"stopped: process {p}/{self.count} sent no heartbeat for "
                                      f"{self.timeouts.peer_s:g} s (killed, crashed, or its host is gone)")
                    return

    def stop_here(self, code: int, message: str) -> None:
        """Prints ``PROG [process i/n]: error: message; rerun ...`` and ends this process at once."""
        print(f"{self.prog}: error: {message}; rerun the same command on every host to finish (done ids "
              "are skipped)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        self.exit(code)

    def fail(self, code: int, line: str) -> None:
        """This process failed with ``line`` (already printed): posts it for the others, then ends this
        process with ``code`` (skipping JAX's exit barrier, which would wait for processes now stopping)."""
        if not self.multiprocess:
            return
        try:
            self.client.key_value_set(f"{PREFIX}/failed/{self.index}",
                                      f"{code}|process {self.index}/{self.count} failed: {line}")
        except Exception:  # noqa: BLE001 - the service is gone: the others stop on their own watchdog
            pass
        sys.stderr.flush()
        sys.stdout.flush()
        self.exit(code)

    def finish(self) -> None:
        """The end of a run that went well: waits for every process, then stops the watchdog."""
        if not self.multiprocess:
            return
        self.same("the end of the run", "done")
        self.client.key_value_set(f"{PREFIX}/finished/{self.index}", "1")
        self.stop_event.set()
        if self.watchdog is not None:
            self.watchdog.join()
