"""``purekv batch``: a JSONL file of requests through a checkpoint, in static-shape batches, on a device mesh.

The format of the requests and of the results, the bucketing and the resume rule are in
:mod:`purekv_jax.batch`; the mesh and the sharding rule in :mod:`purekv_jax.sharding`; a job over several
processes (hosts) in :mod:`purekv_jax.multihost` and ``docs/pods.md``; ``--processes N`` starts one on
this machine (:mod:`purekv_jax.launcher`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from models.qwen2_5_vl import Qwen25VLConfig
from purekv_jax import sharding as S
from purekv_jax.batch import BatchSettings, check_same_run, run_batch
from purekv_jax.batch_output import check_output_path, make_output_folder, probe_output_lock
from purekv_jax.checkpoint import load_checkpoint
from purekv_jax.launcher import launch_local, strip_options
from purekv_jax.multihost import Job, JobTimeouts
from purekv_jax.presets import CLI_POLICIES, build_policy
from purekv_jax.requests import check_checkpoint_folder, check_output_file, check_text, eos_ids, make_processor
from purekv_jax.value_parsers import parse_anchors, parse_budget, parse_pixels

from .errors import ArgumentsError, one_line, one_line_errors, run_guarded

EPILOG = """\
requests (one JSON object a line):
  {"id": "q1", "prompt": "Describe the video.", "video": "clip.mp4"}
  {"id": "q2", "prompt": "What is shown?", "images": ["a.jpg", "b.jpg"], "policy": {"name": "snapkv", "budget": 0.3}}
  {"id": "q3", "input_ids": [151644, 872, 198], "policy": "full", "max_new_tokens": 16}

Each result (or error record, for a missing file, a prompt that is too long, a bad field) is appended to
--out as its batch finishes. Rerunning the same command skips the ids already in --out, so a crashed or
killed run is finished by running it again; every request is written exactly once. One run at a time
writes --out (a second one stops at once). Media paths are taken from --media-root (default: the
requests file's folder) and must lie inside it.

examples:
  purekv batch --model ~/models/qwen25vl-7b-orbax --requests in.jsonl --out out.jsonl --batch-size 8
  purekv batch --model ~/models/qwen25vl-72b-orbax --requests in.jsonl --out out.jsonl --mesh data=4,model=2
  XLA_FLAGS=--xla_force_host_platform_device_count=8 purekv batch ... --mesh data=4,model=2   # CPU test
  purekv batch --processes 2 --devices-per-process 4 ... --mesh data=4,model=2   # two "hosts" on this CPU

several hosts (a TPU pod slice, a SLURM job): the same command on every host, with JAX's multi-process
variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or a cluster JAX detects (SLURM,
Open MPI, Kubernetes; --distributed on Cloud TPU VMs); process 0 writes --out. See docs/pods.md."""

INTERRUPTED = "interrupted; rerun the same command to finish (done ids are skipped)"
#: the launcher's own options, not passed on to the processes it starts
LAUNCHER_OPTIONS = ("--processes", "--devices-per-process")


def add_parser(sub) -> argparse.ArgumentParser:
    """Registers ``batch`` on the ``purekv`` sub-command action ``sub``."""
    p = sub.add_parser(
        "batch", help="run a JSONL file of requests in batches (resumable; optionally on a device mesh)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read requests (id, prompt, image / video paths, policy overrides) from a JSONL file, group "
                    "them into\nstatic-shape buckets, generate in batches and append one JSON record per request "
                    "to --out.",
        epilog=EPILOG,
    )
    one_line_errors(p)
    io = p.add_argument_group("files and devices")
    io.add_argument("--model", required=True, metavar="DIR",
                    help="checkpoint folder (Hugging Face or `purekv convert` orbax), with tokenizer.json")
    io.add_argument("--requests", required=True, metavar="IN.jsonl", help="requests, one JSON object a line")
    io.add_argument("--out", required=True, metavar="OUT.jsonl", help="results, appended (resumable)")
    io.add_argument("--mesh", default=None, metavar="SPEC",
                    help="device mesh, e.g. data=4,model=2 (batch over data; heads and MLP over model); "
                         "default: one device")
    io.add_argument("--dtype", choices=("auto", "float32", "bf16"), default="auto",
                    help="params dtype (default auto: as stored)")
    io.add_argument("--media-root", default=None, metavar="DIR",
                    help="media paths of the requests must lie inside DIR (relative ones are taken from it; "
                         "links resolved); default: the requests file's folder")
    io.add_argument("--summary-json", default=None, metavar="PATH", help="also write the run's summary as JSON")
    io.add_argument("--no-verify", action="store_true",
                    help="skip the checksums of an orbax checkpoint's files at load (sizes are still checked)")
    io.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    job = p.add_argument_group("several processes (hosts)")
    job.add_argument("--processes", type=int, default=None, metavar="N",
                     help="start N processes of this command on this machine, as N hosts of one job (CPU "
                          "devices, gloo collectives; for testing a pod job)")
    job.add_argument("--devices-per-process", type=int, default=4, metavar="N",
                     help="with --processes: CPU devices each process simulates (default 4)")
    job.add_argument("--distributed", action="store_true",
                     help="always call jax.distributed.initialize() (Cloud TPU VMs: JAX finds the workers "
                          "itself); by default only when the environment shows a multi-process job")
    job.add_argument("--peer-timeout", type=float, default=60.0, metavar="S",
                     help="a process silent this long is taken as dead: every process stops (default 60)")
    job.add_argument("--sync-timeout", type=float, default=1800.0, metavar="S",
                     help="how long a process waits for the others before each batch (default 1800)")

    b = p.add_argument_group("batching")
    b.add_argument("--batch-size", type=int, default=8, metavar="N", help="requests per batch (default 8)")
    b.add_argument("--prompt-bucket", type=int, default=64, metavar="N",
                   help="prompt lengths are rounded up to a multiple of N (default 64)")
    b.add_argument("--max-pending", type=int, default=None, metavar="N",
                   help="run the fullest bucket when more than N requests wait (default 4 x batch size)")
    b.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N",
                   help="longer prompts become error records (default: only the model's positions limit)")

    media = p.add_argument_group("media sampling")
    media.add_argument("--fps", type=float, default=None, help="video frames sampled per second")
    media.add_argument("--max-frames", type=int, default=None, metavar="N", help="at most N frames per video")
    media.add_argument("--max-pixels", type=parse_pixels, default=None, metavar="PX", help="pixel cap per image / frame")
    media.add_argument("--min-pixels", type=parse_pixels, default=None, metavar="PX", help="pixel floor per image / frame")
    media.add_argument("--system", default=None, metavar="TEXT", help="system prompt for 'prompt' requests")
    media.add_argument("--allow-special", action="store_true",
                       help="honour special-token strings (<|im_start|>, ...) in user and system text (default: "
                            "tokenised as plain text)")

    kv = p.add_argument_group("KV cache (defaults for requests without 'policy')")
    kv.add_argument("--policy", default="purekv", metavar="NAME", help="one of: " + ", ".join(CLI_POLICIES))
    kv.add_argument("--budget", type=str, default="0.2", metavar="B", help="fraction in (0, 1] or a count (0.2)")
    kv.add_argument("--window", type=int, default=32, metavar="W", help="observation window (32)")
    kv.add_argument("--sink", type=int, default=4, metavar="N", help="first tokens always kept (4)")
    kv.add_argument("--anchors", type=parse_anchors, default=(2,), metavar="L[,L...]", help="CLIE anchor layers (2)")
    kv.add_argument("--st-sparse", action="store_true", help="ST-SpAttn sparse prefill for video tokens")

    gen = p.add_argument_group("decoding")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="per request (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=None, metavar="K")
    gen.add_argument("--top-p", type=float, default=None, metavar="P")
    gen.add_argument("--seed", type=int, default=0, metavar="N")
    p.set_defaults(func=run)
    return p


def settings_from_args(args: argparse.Namespace) -> BatchSettings:
    """The run's settings; the default policy is built once here, so a bad one stops the run at once."""
    budget = parse_budget(args.budget)
    build_policy(args.policy, budget, args.window, args.sink, args.anchors, args.st_sparse, args.seed)
    return BatchSettings(
        policy=args.policy, budget=budget, window=args.window, sink=args.sink, anchors=tuple(args.anchors),
        st_sparse=args.st_sparse, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
        prompt_bucket=args.prompt_bucket, max_prompt_tokens=args.max_prompt_tokens, max_pending=args.max_pending,
        system=None if args.system is None else check_text(args.system, "--system"), fps=args.fps,
        max_frames=args.max_frames, max_pixels=args.max_pixels, min_pixels=args.min_pixels,
        media_root=args.media_root,
    )


def check_files(args: argparse.Namespace, job: Job) -> None:
    """The run's own files, before the weights are read: the requests, the media root, an output that is
    not the requests file, writable and not held by another run, a writable summary path (the last three in
    process 0, which writes them)."""
    if not os.path.isfile(args.requests):
        raise FileNotFoundError(f"--requests {args.requests}: no such file")
    if args.media_root is not None and not os.path.isdir(args.media_root):
        raise FileNotFoundError(f"--media-root {args.media_root}: no such folder")
    check_output_path(args.requests, args.out)
    if job.is_writer:
        probe_output_lock(args.out)
        make_output_folder(args.out)
        check_output_file(args.out, "--out")
        if args.summary_json:
            check_output_file(args.summary_json, "--summary-json")


def run(args: argparse.Namespace) -> int:
    """The ``purekv batch`` command (exit statuses: :func:`~purekv_jax.commands.errors.run_guarded`).

    With ``--processes N``: the local launcher. Otherwise this process joins the job the environment
    describes (a single process when it describes none); a failure in any process stops every process
    with one line each (:class:`~purekv_jax.multihost.Job`)."""
    if args.processes is not None:
        return run_guarded("purekv batch", lambda: launch(args))
    started: list[Job] = []
    status = run_guarded("purekv batch", lambda: started.append(start_job(args)) or 0, interrupted=INTERRUPTED)
    if status:
        return status
    job = started[0]
    try:
        status = run_guarded(job.prog, lambda: batch(args, job), interrupted=INTERRUPTED, on_error=job.fail)
    except BaseException as err:  # a bug: its traceback here, and every other process stops too
        if job.multiprocess:
            traceback.print_exc()
            job.fail(1, f"{job.prog}: crashed: {type(err).__name__}: {one_line(err)}")
        raise
    return status


def job_timeouts(args: argparse.Namespace) -> JobTimeouts:
    for flag, value in (("--peer-timeout", args.peer_timeout), ("--sync-timeout", args.sync_timeout)):
        if not value >= 5:
            raise ArgumentsError(f"{flag} {value:g} must be at least 5 seconds")
    return JobTimeouts(peer_s=args.peer_timeout, sync_s=args.sync_timeout)


def launch(args: argparse.Namespace) -> int:
    """``--processes N``: this command without the launcher's options, as N local processes of one job."""
    timeouts = job_timeouts(args)
    return launch_local(strip_options(args.argv, LAUNCHER_OPTIONS), args.processes, args.devices_per_process,
                        grace_s=timeouts.peer_s + 30)


def start_job(args: argparse.Namespace) -> Job:
    """Joins the multi-process job the environment describes (before any device is touched) and starts
    its watchdog; a single-process :class:`Job` otherwise."""
    timeouts = job_timeouts(args)
    S.initialize_distributed(force=args.distributed, heartbeat_timeout_s=timeouts.runtime_heartbeat_s)
    job = Job.current("purekv batch", timeouts)
    job.start_watchdog()
    return job


def batch(args: argparse.Namespace, job: Job) -> int:
    """Checks everything, loads the weights, runs the requests and prints the summary."""
    prog = job.prog
    settings = settings_from_args(args)
    check_checkpoint_folder(args.model)
    check_files(args, job)
    config = Qwen25VLConfig.from_json(args.model)
    mesh_spec = args.mesh or ("data=-1" if job.multiprocess else None)  # several processes: all devices
    mesh = S.make_mesh(mesh_spec) if mesh_spec else None
    proc = make_processor(args.model, fps=args.fps, max_frames=args.max_frames, max_pixels=args.max_pixels,
                          min_pixels=args.min_pixels, allow_special=args.allow_special)
    eos = eos_ids(args.model, config)
    check_same_run(job, args.requests, settings, config, mesh, eos)  # before the (long) load on every host
    dtype = None if args.dtype == "auto" else args.dtype
    shardings = None if mesh is None else S.sharding_for_leaf(config, mesh)
    config, params = load_checkpoint(args.model, dtype=dtype, shardings=shardings, verify=not args.no_verify)

    where = "1 device" if mesh is None else f"mesh {S.mesh_str(mesh)} ({mesh.size} devices)"
    print(f"{prog}: {args.model} on {where}; batch size {settings.batch_size}", file=sys.stderr, flush=True)
    summary = run_batch(params, config, proc, args.requests, args.out, settings, mesh=mesh,
                        eos=eos, progress=not args.quiet, job=job)
    print(f"{prog}: {summary.format()}", file=sys.stderr)
    if args.summary_json and job.is_writer:
        try:
            with open(args.summary_json, "w") as f:
                json.dump(summary.as_dict(), f, indent=2)
        except OSError as e:  # it was writable at the start: say what happened, the results are in --out
            raise OSError(f"--summary-json {args.summary_json}: {e.strerror} (the results are in --out)") from None
    job.finish()  # every process ends together (then JAX's own exit barrier)
    return 0
