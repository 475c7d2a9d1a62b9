"""``purekv batch`` as a multi-process job (two "hosts" of four CPU devices, gloo collectives), against the
single-process run; and the job's coordination (:mod:`purekv_jax.multihost`) on an in-memory key-value
store.

In process (fast): agreement, timeouts, broadcast and the watchdog of :class:`Job` over a fake coordination
client; the launcher's environment and argument handling.

Subprocesses (the tiny checkpoint, six requests: two full-cache, two with the default policy, one
ST-SpAttn video request forced block-sparse, one missing video): the reference is one process on one
device; then two processes x four devices with the mesh data=4,model=2 (through ``--processes 2``, from
an orbax copy of the checkpoint restored shard by shard), and
with data=8 where process 1 is SIGKILLed once the first result is written: process 0 must stop with one
line naming process 1 (its watchdog, not a hang), and the rerun must finish with every id exactly once
and every record equal to the reference.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import pytest

from conftest import jsonl_records, sample_video_path
from purekv_jax import launcher as L
from purekv_jax import multihost as M
from purekv_jax.checkpoint import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ in process
class FakeClient:
    """The coordination service's key-value calls that :class:`~purekv_jax.multihost.Job` uses, in memory."""

    def __init__(self):
        self.store: dict[str, object] = {}
        self.cond = threading.Condition()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.cond:
            if key in self.store and not allow_overwrite:
                raise jax.errors.JaxRuntimeError(f"ALREADY_EXISTS: {key}")
            self.store[key] = value
            self.cond.notify_all()

    key_value_set_bytes = key_value_set

    def blocking_key_value_get(self, key, timeout_in_ms):
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.store, timeout_in_ms / 1000):
                raise jax.errors.JaxRuntimeError(f"DEADLINE_EXCEEDED: {key}")
            return self.store[key]

    blocking_key_value_get_bytes = blocking_key_value_get

    def key_value_delete(self, key):
        with self.cond:
            self.store.pop(key, None)

    def key_value_dir_get(self, prefix):
        with self.cond:
            return [(k, v) for k, v in self.store.items() if k.startswith(prefix)]


def fake_jobs(n: int, **timeouts) -> list[M.Job]:
    client = FakeClient()
    jobs = [M.Job("purekv batch", M.JobTimeouts(**timeouts), client, i, n) for i in range(n)]
    for job in jobs:
        job.exited = []
        job.exit = job.exited.append  # instead of os._exit
    return jobs


def in_threads(fns) -> list:
    """Runs each ``fn()`` in its own thread -> its result or the exception it raised."""
    out = [None] * len(fns)

    def call(i):
        try:
            out[i] = fns[i]()
        except Exception as err:  # noqa: BLE001 - returned for the test to check
            out[i] = err

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_same_passes_when_every_process_agrees_and_names_the_odd_one_out():
    jobs = fake_jobs(3, sync_s=5)
    assert in_threads([lambda j=j: j.agree("start", f"v{j.index}") for j in jobs]) == [["v0", "v1", "v2"]] * 3
    assert in_threads([lambda j=j: j.same("the requests file", "sha256 ab") for j in jobs]) == [None] * 3
    errs = in_threads([lambda j=j: j.same("batch 3", "inputs 1f" if j.index != 1 else "inputs 9c") for j in jobs])
    for err in errs:  # every process raises, and the message shows who holds what
        assert isinstance(err, M.ProcessesDisagree)
        assert "batch 3 differs" in str(err) and "process 0,2: inputs 1f" in str(err)
        assert "process 1: inputs 9c" in str(err)
    assert not any(k.startswith("purekv/agree/1/") for k in jobs[0].client.store)  # old rounds are dropped


def test_a_process_that_never_arrives_is_a_timeout_naming_it():
    jobs = fake_jobs(2, sync_s=0.3, peer_s=3, heartbeat_s=1)
    t0 = time.monotonic()
    with pytest.raises(M.PeerTimeout, match=r"process 1 of 2 did not reach batch 1 within 0.3 s"):
        jobs[0].same("batch 1", "x")
    assert time.monotonic() - t0 < 5


def test_broadcast_sends_process_0s_bytes_in_pieces(monkeypatch):
    monkeypatch.setattr(M, "CHUNK_BYTES", 7)
    jobs = fake_jobs(3, sync_s=5)
    payload = os.urandom(50)
    got = in_threads([lambda j=j: j.broadcast("done ids", payload if j.index == 0 else b"ignored") for j in jobs])
    assert got == [payload] * 3
    assert jobs[0].client.store["purekv/broadcast/1/count"] == "8"  # ceil(50 / 7) pieces


def test_watchdog_stops_the_others_on_a_failure_and_on_a_silent_process(capsys):
    jobs = fake_jobs(3, peer_s=0.6, heartbeat_s=0.1, sync_s=5)
    for job in jobs:
        job.start_watchdog()
    jobs[2].fail(2, "purekv batch [process 2/3]: error: --model x: no such folder")
    assert jobs[2].exited == [2]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (jobs[0].exited and jobs[1].exited):
        time.sleep(0.05)
    assert jobs[0].exited == [2] and jobs[1].exited == [2]  # the failing process's status everywhere
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err  # one line per stopped process
    for i in (0, 1):
        line = next(l for l in err if l.startswith(f"purekv batch [process {i}/3]: error: stopped: process 2/3 "
                                                   "failed: purekv batch [process 2/3]: error: --model x"))
        assert "rerun the same command" in line

    quiet = fake_jobs(2, peer_s=0.5, heartbeat_s=0.1)
    quiet[0].start_watchdog()  # process 1 never beats
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not quiet[0].exited:
        time.sleep(0.05)
    assert quiet[0].exited == [1]
    assert "process 1/2 sent no heartbeat for 0.5 s" in capsys.readouterr().err
    for job in jobs + quiet:
        job.stop_event.set()


def test_timeouts_are_checked():
    with pytest.raises(M.JobError, match="peer_s"):
        M.JobTimeouts(peer_s=0)
    with pytest.raises(M.JobError, match="at least 3 heartbeats"):
        M.JobTimeouts(peer_s=2, heartbeat_s=1)
    assert M.JobTimeouts(peer_s=60).runtime_heartbeat_s > 60  # JAX's own abort comes after the watchdog


def test_single_process_job_is_a_no_op():
    job = M.Job("purekv batch")
    assert not job.multiprocess and job.is_writer and job.prog == "purekv batch"
    job.same("anything", "x")
    assert job.broadcast("x", b"abc") == b"abc"
    job.start_watchdog()
    assert job.watchdog is None


def test_launcher_environment_and_arguments():
    env = L.process_env(1, 2, 4567, 4, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1",
                                         "PATH": "/bin"})
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4567" and env["JAX_NUM_PROCESSES"] == "2"
    assert env["JAX_PROCESS_ID"] == "1" and env["JAX_PLATFORMS"] == "cpu" and env["PATH"] == "/bin"
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=4"]
    argv = ["batch", "--processes", "2", "--model", "m", "--devices-per-process=4", "--mesh", "data=8"]
    assert L.strip_options(argv, ("--processes", "--devices-per-process")) == ["batch", "--model", "m", "--mesh",
                                                                              "data=8"]
    with pytest.raises(L.LaunchError, match="--processes 0"):
        L.launch_local(["batch"], 0)


# ------------------------------------------------------------------------------------------ subprocesses
REQUESTS = [
    {"id": "f1", "prompt": "Say something about 1.", "policy": "full"},
    {"id": "f2", "prompt": "Say something about the sea.", "policy": "full"},
    {"id": "p1", "prompt": "Count: " + " ".join(str(1 + j) for j in range(40))},  # the run's default policy
    {"id": "e1", "prompt": "x", "video": "missing.mp4"},
    {"id": "p2", "prompt": "Count: " + " ".join(str(7 + j) for j in range(40))},
    {"id": "v1", "prompt": "Describe the video.", "video": "clip.mp4",
     "policy": {"name": "purekv", "budget": 0.5, "st_sparse": True, "st_select": "always"}},
]
#: what must be equal to the reference (padding rows and timings differ by mesh)
COMPARED = ("id", "index", "text", "tokens", "finish_reason", "prompt_tokens", "generated_tokens", "policy",
            "error", "error_type")
#: the processes' environment: opt level 0 (about half the XLA:CPU compile time), the same for every run
BASE_ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0",
                PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def job_files(tiny_model_dir, tmp_path_factory):
    """The requests file (media beside it) and the command every run shares -> (folder, argv)."""
    folder = tmp_path_factory.mktemp("pods")
    shutil.copy(sample_video_path(), folder / "clip.mp4")
    req = folder / "in.jsonl"
    req.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    argv = ["batch", "--model", tiny_model_dir, "--requests", str(req), "--batch-size", "2", "--max-new-tokens",
            "4", "--window", "8", "--sink", "2", "--anchors", "0", "--fps", "2", "--max-frames", "4",
            "--max-pixels", "12544", "--peer-timeout", "10", "-q"]
    return folder, argv


def cli(argv, env=BASE_ENV, **kw):
    return subprocess.Popen([sys.executable, "-m", "purekv_jax.cli", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finished(proc, what: str) -> str:
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{what}: status {proc.returncode}\n{err[-4000:]}"
    return err


def by_id(records: list[dict]) -> dict:
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), ids  # every id exactly once
    return {r["id"]: {k: r.get(k) for k in COMPARED} for r in records}


@pytest.fixture(scope="module")
def reference(job_files):
    folder, argv = job_files
    out = folder / "single.jsonl"
    finished(cli([*argv, "--out", str(out)]), "single process")
    records = jsonl_records(out)
    v1 = next(r for r in records if r["id"] == "v1")
    assert v1["batch"]["st_layers"] == [1], v1  # ST-SpAttn ran block-sparse in layer 1
    assert sorted(r["id"] for r in records if "error" in r) == ["e1"]
    return by_id(records)


@pytest.mark.slow
def test_two_processes_on_a_data4_model2_mesh_write_the_single_process_records(job_files, reference, tiny_model_dir):
    """From an orbax copy of the checkpoint (float32): each process restores its shards of the global mesh."""
    folder, argv = job_files
    orbax = folder / "tiny-orbax"
    convert(tiny_model_dir, orbax, dtype="float32", progress=False)
    argv = [str(orbax) if a == tiny_model_dir else a for a in argv]
    out = folder / "mesh4x2.jsonl"
    err = finished(cli([*argv, "--out", str(out), "--processes", "2", "--devices-per-process", "4",
                        "--mesh", "data=4,model=2"]), "2 processes, data=4,model=2")
    assert "purekv batch [process 1/2]: " in err and "mesh data=4,model=2 (8 devices)" in err
    assert by_id(jsonl_records(out)) == reference


@pytest.mark.slow
def test_a_killed_process_stops_the_job_with_one_line_and_the_rerun_finishes_it(job_files, reference, tmp_path):
    folder, argv = job_files
    out = folder / "mesh8.jsonl"
    argv = [*argv, "--out", str(out), "--mesh", "data=8"]
    env = dict(BASE_ENV, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),  # the rerun reuses the programs
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    port = L.free_port()
    procs = [cli(argv, env=L.process_env(i, 2, port, 4, env)) for i in range(2)]
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and procs[1].poll() is None:
        if any("text" in r for r in jsonl_records(out)):
            procs[1].send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    procs[1].communicate(timeout=60)
    assert procs[1].returncode == -signal.SIGKILL, "process 1 finished before it could be killed"
    killed_at = time.monotonic()
    _, err0 = procs[0].communicate(timeout=TIMEOUT_S)
    assert procs[0].returncode == 1, err0[-4000:]
    assert time.monotonic() - killed_at < 120  # the watchdog (10 s), not JAX's exit barrier or a hang
    lines = [l for l in err0.splitlines() if "error" in l.lower() and "Gloo" not in l]
    assert len(lines) == 1 and lines[0].startswith("purekv batch [process 0/2]: error: stopped: process 1/2 sent "
                                                   "no heartbeat for 10 s"), err0[-4000:]
    first = jsonl_records(out)
    assert 1 <= len(first) < len(REQUESTS), first

    err = finished(cli([*argv, "--processes", "2", "--devices-per-process", "4"], env=env), "rerun")
    assert f"{len(first)} already in the output" in err
    assert by_id(jsonl_records(out)) == reference
