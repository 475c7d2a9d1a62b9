"""Batch inference over a JSONL file of requests: static-shape buckets, resumable, one record per request.

Input (one JSON object a line; blank lines are ignored)::

    {"id": "q1", "prompt": "Describe the video.", "videos": ["clip.mp4"]}
    {"id": "q2", "prompt": "What is in the picture?", "image": "a.jpg", "policy": {"name": "snapkv", "budget": 0.3}}
    {"id": "q3", "input_ids": [151644, 872, 198, ...], "policy": "full", "max_new_tokens": 16}

Fields: ``id`` (a string or an integer, kept as given: ``7`` and ``"7"`` are two ids; default
``"line-N"``), the prompt as ``prompt`` (user text, chat template applied, optional ``system``),
``messages`` (chat messages) or ``input_ids`` (token ids as they are), media as ``image`` / ``images`` /
``video`` / ``videos`` (paths), and overrides of the run's settings: ``policy`` (a policy name, or an
object with ``name``, ``budget``, ``window``, ``sink``, ``anchors``, ``st_sparse``, ``st_select``
(``"always"`` runs ST-SpAttn block-sparse even where its cost model would pick dense); missing keys come
from the run) and ``max_new_tokens``. Every field's JSON type is checked (:mod:`purekv_jax.batch_records`).
Media paths (relative ones from there) must lie inside ``media_root`` (default: the requests file's
folder), links resolved; user text is tokenised without special tokens unless the processor allows them.

Output: one JSON object a line, appended as each batch finishes (written with one ``write`` each; fsync
after every batch of results, and at most once a second for error records), under an exclusive lock on
the file (:mod:`purekv_jax.batch_output`: a second run on the same output stops at once). A result::

    {"id": "q1", "index": 1, "text": "...", "tokens": [...], "finish_reason": "stop" | "length",
     "prompt_tokens": 412, "generated_tokens": 17, "policy": "purekv budget=0.2",
     "batch": {"index": 3, "rows": 5, "padded_rows": 8, "prefill_s": ..., "decode_s": ...,
               "kv_bytes_full": ..., "kv_bytes_kept": ..., "st_layers": [...]}}

and a bad request (a line that is not UTF-8 or not JSON, a field of the wrong type, a missing or
undecodable media file, a prompt too long, a policy that cannot work for it; whatever the exception)
becomes ``{"id": ..., "index": ..., "error": "...", "error_type": "MediaFileError"}`` while the run goes
on. ``index`` is the request's 1-based line number (results are written in completion order, not input
order).

Resuming: ids already in the output file (results and error records) are skipped, so rerunning the same
command after a crash or a kill finishes the rest and writes every request exactly once. A line cut by a
crash in the middle of a write is truncated before appending. Duplicate ids in the input: the first
occurrence is run, later ones are counted and skipped.

Buckets: a request's key is (policy, max_new_tokens, prompt length rounded up to ``prompt_bucket``, its
image and video patch grids). Requests wait in their bucket until it holds ``batch_size`` requests; when
more than ``max_pending`` requests wait, the fullest bucket runs; at the end of the input every bucket
runs. A short batch is padded (copies of its first row, dropped afterwards) to the next power of two, a
multiple of the mesh's data axis, so every batch shape is one of a handful and compiles once.
Requests are read and preprocessed (tokenizer, image / video decoding) in a background thread while
the device generates.

Several processes (the hosts of a pod slice, ``docs/pods.md``): every process reads the same requests
file, preprocesses every request and forms the same batches, which run as one SPMD program on the global
mesh (each host feeds its own rows, :func:`purekv_jax.sharding.put`; the generated tokens are gathered to
every host). Process 0 alone owns the output file: it takes the lock, reads the ids already done and
shares them, and writes every record, so the file, the resume rule and the lock are those of one process
and there is nothing to merge. Before anything runs, the processes compare the requests file, the
settings and then each batch (ids, inputs, the error records since the last one) through
:class:`purekv_jax.multihost.Job`, so a host that would run something else stops the job with one line
instead of hanging in a collective.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import sys
import threading
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .batch_output import ResultWriter, check_output_path, read_done_ids
from .batch_records import (RequestError, check_messages, count_requests, id_key, input_id_list, iter_request_lines,
                            media_list, policy_spec, typed, valid_id, with_media)
from .generation import GenerateError, generate
from .multihost import Job, digest, file_digest
from .presets import build_policy, policy_label
from .requests import build_inputs, check_policy, check_prompt, confined_media
from .sharding import DATA
from .value_parsers import parse_budget


class BatchError(ValueError):
    """A problem with the run itself (settings, files): the command stops."""


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    """Run-level settings; a request may override ``policy_*`` (as ``policy``) and ``max_new_tokens``."""

    policy: str = "purekv"
    budget: float | int = 0.2
    window: int = 32
    sink: int = 4
    anchors: tuple[int, ...] = (2,)
    st_sparse: bool = False
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    batch_size: int = 8
    prompt_bucket: int = 64
    max_prompt_tokens: int | None = None
    max_pending: int | None = None  # default 4 * batch_size
    system: str | None = None
    fps: float | None = None
    max_frames: int | None = None
    max_pixels: int | None = None
    min_pixels: int | None = None
    media_root: str | None = None  # default: the requests file's folder

    def __post_init__(self):
        if self.batch_size < 1:
            raise BatchError(f"batch_size={self.batch_size} must be >= 1")
        if self.prompt_bucket < 1:
            raise BatchError(f"prompt_bucket={self.prompt_bucket} must be >= 1")
        if self.max_new_tokens < 1:
            raise BatchError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise BatchError(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 1")


@dataclasses.dataclass
class Prepared:
    """A request turned into model inputs (host arrays), with its bucket key."""

    id: Any
    index: int
    inputs: dict
    n_tokens: int
    policy: Any  # PureKVConfig | None
    policy_label: str
    max_new_tokens: int
    key: tuple


@dataclasses.dataclass
class BatchSummary:
    requests: int = 0  # request lines read (blank lines excluded)
    skipped: int = 0  # already in the output file
    duplicates: int = 0  # ids seen earlier in this input
    completed: int = 0  # results written by this run
    errors: int = 0  # error records written by this run
    batches: int = 0
    padded_rows: int = 0  # padding rows computed (waste)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    compile_s: float = 0.0
    wall_s: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return self.completed / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["requests_per_s"], d["tokens_per_s"] = self.requests_per_s, self.tokens_per_s
        return d

    def format(self) -> str:
        return (f"{self.completed} done, {self.errors} errors, {self.skipped} already in the output, "
                f"{self.duplicates} duplicate ids skipped ({self.requests} requests read); {self.batches} batches "
                f"({self.padded_rows} padding rows); {self.generated_tokens} tokens generated in {self.wall_s:.1f} s: "
                f"{self.tokens_per_s:.1f} tok/s, {self.requests_per_s:.2f} req/s (compile {self.compile_s:.1f} s)")


# ------------------------------------------------------------------------------------------ requests
def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def resolve_policy(spec, settings: BatchSettings, rid=None):
    """A request's ``policy`` field (None / name / object) over the run's settings -> (PureKVConfig | None,
    label), through :func:`purekv_jax.presets.build_policy` like the command line's flags."""
    fields = policy_spec(spec, rid)
    name = fields.get("name", settings.policy)
    budget = parse_budget(str(fields.get("budget", settings.budget)))
    anchors = fields.get("anchors", settings.anchors)
    anchors = (anchors,) if isinstance(anchors, int) else tuple(anchors)
    policy = build_policy(name, budget, fields.get("window", settings.window), fields.get("sink", settings.sink),
                          anchors, fields.get("st_sparse", settings.st_sparse), settings.seed)
    if "st_select" in fields:
        if policy is None or not policy.st_sparse:
            raise RequestError(f"request {rid!r}: policy.st_select needs ST-SpAttn (policy.st_sparse true)")
        policy = dataclasses.replace(policy, st_select=fields["st_select"])
    return policy, policy_label(name, policy)


def media_root(settings: BatchSettings, requests_path) -> str:
    """Where a request's media may lie: ``settings.media_root``, else the requests file's folder."""
    return settings.media_root or os.path.dirname(os.path.realpath(requests_path))


def prepare_request(obj, lineno: int, proc, config, settings: BatchSettings, root: str = ".") -> Prepared:
    """Checks and preprocesses one request (tokenizer, media under ``root``); raises :class:`RequestError`
    (or the processor's / policy's ``ValueError``) for a bad one."""
    if isinstance(obj, BaseException):
        raise obj
    if not isinstance(obj, dict):
        raise RequestError(f"line {lineno}: a request is a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", f"line-{lineno}")
    if not valid_id(rid):
        raise RequestError(f"line {lineno}: id must be a string or an integer, got {rid!r:.80}")
    prompts = [k for k in ("prompt", "messages", "input_ids") if obj.get(k) is not None]
    if len(prompts) != 1:
        raise RequestError(f"request {rid!r}: give exactly one of 'prompt', 'messages', 'input_ids' (got {prompts})")
    max_new = obj.get("max_new_tokens", settings.max_new_tokens)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise RequestError(f"request {rid!r}: max_new_tokens must be an integer >= 1, got {max_new!r:.80}")
    policy, label = resolve_policy(obj.get("policy"), settings, rid)
    images = [confined_media(p, root, "image") for p in media_list(obj, "image", "images", rid)]
    videos = [confined_media(p, root, "video") for p in media_list(obj, "video", "videos", rid)]
    if "input_ids" in prompts:
        if images or videos:
            raise RequestError(f"request {rid!r}: input_ids cannot be combined with media (give 'prompt')")
        arr = np.asarray(input_id_list(obj["input_ids"], config.text.vocab_size, rid), np.int64)[None]
        inputs = {"input_ids": arr, "attention_mask": np.ones_like(arr)}
    elif proc is None:
        raise RequestError(f"request {rid!r}: this run has no tokenizer / processor; give 'input_ids'")
    elif "messages" in prompts:
        messages = with_media(check_messages(obj["messages"], rid), lambda p, kind: confined_media(p, root, kind))
        inputs = proc(messages=messages, images=images or None, videos=videos or None)
    else:
        prompt = typed(obj["prompt"], (str,), "prompt", rid)
        if not prompt.strip():
            raise RequestError(f"request {rid!r}: prompt must be a non-empty string")
        system = obj.get("system", settings.system)
        system = None if system is None else typed(system, (str,), "system", rid)
        inputs = build_inputs(proc, prompt, images, videos, system)
    n = int(inputs["input_ids"].shape[1])
    if settings.max_prompt_tokens is not None and n > settings.max_prompt_tokens:
        raise RequestError(f"request {rid!r}: the prompt has {n} tokens, more than --max-prompt-tokens "
                           f"{settings.max_prompt_tokens}")
    if proc is not None:
        check_prompt(config, proc, inputs, policy, max_new)  # vocabulary, vision ids, positions, the policy
    else:
        _check_token_prompt(config, rid, n, policy, max_new)
    grids = tuple(tuple(map(tuple, np.asarray(inputs[k]).reshape(-1, 3).tolist())) if k in inputs else ()
                  for k in ("image_grid_thw", "video_grid_thw"))
    key = (policy, max_new, _round_up(n, settings.prompt_bucket), *grids)
    return Prepared(rid, lineno, inputs, n, policy, label, max_new, key)


def _check_token_prompt(config, rid, n: int, policy, max_new: int) -> None:
    """Without a processor (``input_ids`` requests): positions, and a policy that resolves for the prompt."""
    limit = config.text.max_position_embeddings
    if n - 1 + max_new >= limit:
        raise RequestError(f"request {rid!r}: {n} prompt tokens + max_new_tokens {max_new} pass the model's "
                           f"max_position_embeddings {limit}")
    if policy is not None:
        check_policy(policy, config.text, n)


# ------------------------------------------------------------------------------------------ batches
def padded_batch_size(n: int, batch_size: int, data: int = 1) -> int:
    """Rows a batch of ``n`` requests runs with: the next power of two (at most ``batch_size``), then a
    multiple of the data axis."""
    rows = min(batch_size, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
    rows = max(rows, n)
    return _round_up(rows, data)


def collate(items: list[Prepared], rows: int) -> dict:
    """Left-padded ``input_ids`` / ``attention_mask`` ``[rows, N]`` and the concatenated media; rows past
    ``len(items)`` copy the first request."""
    rows_items = items + [items[0]] * (rows - len(items))
    n = max(it.n_tokens for it in rows_items)
    ids = np.zeros((rows, n), np.int64)
    mask = np.zeros((rows, n), np.int64)
    for r, it in enumerate(rows_items):
        k = it.n_tokens
        ids[r, n - k:] = it.inputs["input_ids"][0]
        mask[r, n - k:] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        parts = [it.inputs[pix] for it in rows_items if pix in it.inputs]
        if parts:
            out[pix] = np.concatenate(parts, axis=0)
            out[grid] = np.concatenate([it.inputs[grid] for it in rows_items if grid in it.inputs], axis=0)
    ts = [it.inputs["second_per_grid_ts"] for it in rows_items if "second_per_grid_ts" in it.inputs]
    if ts:
        out["second_per_grid_ts"] = np.concatenate([np.asarray(t, np.float64).reshape(-1) for t in ts])
    return out


def generate_batch(params, config, items: list[Prepared], settings: BatchSettings, eos, *, data: int = 1):
    """Runs one bucket's requests together -> (GenerateResult, padded rows)."""
    rows = padded_batch_size(len(items), settings.batch_size, data)
    inputs = collate(items, rows)
    res = generate(
        params, config, inputs["input_ids"], inputs["attention_mask"],
        pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
        pixel_values_videos=inputs.get("pixel_values_videos"), video_grid_thw=inputs.get("video_grid_thw"),
        second_per_grid_ts=inputs.get("second_per_grid_ts"),
        policy=items[0].policy, max_new_tokens=items[0].max_new_tokens, temperature=settings.temperature,
        top_k=settings.top_k, top_p=settings.top_p, seed=settings.seed, eos_token_id=eos,
        prompt_bucket=settings.prompt_bucket,
    )
    return res, rows


def result_records(items: list[Prepared], res, rows: int, batch_index: int, proc, eos) -> list[dict]:
    stop = set(eos)
    st = res.stats
    info = {"index": batch_index, "rows": len(items), "padded_rows": rows,
            "prefill_s": round(st["prefill_s"], 6), "decode_s": round(st["decode_s"], 6),
            "kv_bytes_full": st["kv_bytes_full"], "kv_bytes_kept": st["kv_bytes_kept"],
            "st_layers": [int(layer) for layer in st["st_layers"]]}
    out = []
    for r, it in enumerate(items):
        row = [int(t) for t in np.asarray(res.tokens[r])]
        cut = next((i for i, t in enumerate(row) if t in stop), None)
        toks = row if cut is None else row[:cut]
        out.append({
            "id": it.id, "index": it.index, "text": proc.decode(toks, skip_special_tokens=True) if proc else None,
            "tokens": toks, "finish_reason": "length" if cut is None else "stop",
            "prompt_tokens": it.n_tokens, "generated_tokens": len(row) if cut is None else cut + 1,
            "policy": it.policy_label, "batch": info,
        })
    return out


# ------------------------------------------------------------------------------------------ the run
_END = object()


def _producer(path, todo: queue.Queue, proc, config, settings: BatchSettings, done: set[str], summary: BatchSummary,
              stop: threading.Event):
    """Reads and preprocesses requests into ``todo``: ``("ok", Prepared)``, ``("error", record)``,
    ``("skip", None)``; then ``_END`` (or ``("crash", exc)`` when the requests file itself cannot be read).
    Anything wrong inside one request, whatever the exception, becomes that request's error record."""
    seen: set[str] = set()
    root = media_root(settings, path)
    try:
        for lineno, obj in iter_request_lines(path):
            if stop.is_set():
                break
            summary.requests += 1
            rid = obj.get("id", f"line-{lineno}") if isinstance(obj, dict) else f"line-{lineno}"
            rid = rid if valid_id(rid) else f"line-{lineno}"
            key = id_key(rid)
            if key in seen:
                summary.duplicates += 1
                todo.put(("skip", None))
                continue
            seen.add(key)
            if key in done:
                summary.skipped += 1
                todo.put(("skip", None))
                continue
            try:
                todo.put(("ok", prepare_request(obj, lineno, proc, config, settings, root)))
            except Exception as e:  # noqa: BLE001 - one request's failure of any kind is its error record
                todo.put(("error", error_record(rid, lineno, e)))
        todo.put(_END)
    except BaseException as e:  # pragma: no cover - surfaced in the main thread
        todo.put(("crash", e))


def error_record(rid, index: int, err: BaseException) -> dict:
    msg = " ".join(str(err).split()) or type(err).__name__
    return {"id": rid, "index": index, "error": msg, "error_type": type(err).__name__}


def run_batch(params, config, proc, requests_path, out_path, settings: BatchSettings = BatchSettings(), *,
              mesh=None, eos=None, progress: bool = True, job: Job | None = None) -> BatchSummary:
    """Runs every request of ``requests_path`` not yet in ``out_path``; see the module doc.

    ``params`` may live on ``mesh`` (see :mod:`purekv_jax.sharding`); batches are padded to a multiple of
    its data axis. ``eos``: EOS ids (default: the config's); ``()`` generates ``max_new_tokens`` always.
    ``progress``: a tqdm bar on stderr with tokens/s and requests/s. A failure inside ``generate`` that is
    a ``ValueError`` reruns that batch's requests one by one (only the bad one becomes an error record);
    any other exception stops the run (rerun to resume).

    ``job``: the processes of a multi-process run (:class:`purekv_jax.multihost.Job`; default: this one).
    Every process reads the same requests and runs the same batches on the global ``mesh``; process 0
    alone holds the output file (its lock, the ids already done, every record) and shares the done ids;
    the requests file, the settings and each batch's inputs are checked to be the same in every process
    before anything runs on the devices (:meth:`~purekv_jax.multihost.Job.same`).
    """
    job = job or Job("purekv batch")
    eos = tuple(config.eos_token_id if eos is None else eos)
    data = int(mesh.shape.get(DATA, 1)) if mesh is not None else 1
    if not os.path.isfile(requests_path):
        raise BatchError(f"requests file not found: {requests_path}")
    check_output_path(requests_path, out_path)
    check_same_run(job, requests_path, settings, config, mesh, eos)
    with ResultWriter(out_path, enabled=job.is_writer) as writer:  # the lock, before the file is read
        done = read_done_ids(out_path) if job.is_writer else set()
        done = set(json.loads(job.broadcast("the ids already done", json.dumps(sorted(done)).encode())))
        summary = _run(params, config, proc, requests_path, settings, writer, done, eos, data, progress, job)
        job.same("the run's counts", f"{summary.completed} results, {summary.errors} errors, {summary.skipped} "
                                     f"already done, {summary.duplicates} duplicates")
        return summary


def check_same_run(job: Job, requests_path, settings: BatchSettings, config, mesh, eos) -> None:
    """Every process of ``job`` has the same requests file (sha256), settings, model config, mesh and EOS
    ids, else :class:`~purekv_jax.multihost.ProcessesDisagree` in every process (the command checks this
    before loading the weights too)."""
    job.same(f"the requests file {requests_path}", f"sha256 {file_digest(requests_path)}")
    job.same("the run's settings", digest(settings, tuple(eos), config, None if mesh is None else dict(mesh.shape)))


def inputs_digest(inputs: dict) -> str:
    """A digest of one request's model inputs (every array's dtype, shape and bytes)."""
    parts = []
    for name in sorted(inputs):
        arr = np.ascontiguousarray(np.asarray(inputs[name]))
        parts += [name, str(arr.dtype), arr.shape, arr.tobytes()]
    return digest(*parts)


def batch_fingerprint(items: list[Prepared], errors: list[str]) -> str:
    """What a batch is about to run, for the processes to compare: the requests' ids, bucket keys and input
    digests, and the error records written since the last batch (as ``id_key:error type``)."""
    ids = json.dumps([it.id for it in items])
    return (f"inputs {digest(*((it.key, it.index, inputs_digest(it.inputs)) for it in items))}, "
            f"errors {digest(*errors)}, ids {ids}")


def _run(params, config, proc, requests_path, settings: BatchSettings, writer: ResultWriter, done: set[str], eos,
         data: int, progress: bool, job: Job) -> BatchSummary:
    total = count_requests(requests_path)
    summary = BatchSummary()
    max_pending = settings.max_pending or 4 * settings.batch_size
    todo: queue.Queue = queue.Queue(maxsize=max(2 * settings.batch_size, 8))
    stop = threading.Event()
    thread = threading.Thread(target=_producer, daemon=True, name="purekv-batch-reader",
                              args=(requests_path, todo, proc, config, settings, done, summary, stop))
    bar = None
    if progress:
        bar = tqdm(total=total, unit="req", desc="purekv batch", dynamic_ncols=True, file=sys.stderr,
                   disable=not writer.enabled)
    buckets: dict[tuple, list[Prepared]] = {}
    errors_since: list[str] = []  # error records since the last batch (compared across processes with it)
    t0 = time.perf_counter()

    def emit(records: list[dict], results: bool = True) -> None:
        for rec in records:
            writer.write(rec)
            if "error" in rec:
                errors_since.append(f"{id_key(rec['id'])}:{rec['error_type']}")
        if results:
            writer.sync()
        else:  # error records: fsync at most once per interval (and with the next results / at the end)
            writer.sync_if_due()
        if bar is not None:
            bar.update(len(records))
            el = time.perf_counter() - t0
            bar.set_postfix_str(f"{summary.generated_tokens / el:.1f} tok/s, {summary.completed / el:.2f} req/s, "
                                f"{summary.errors} err", refresh=False)

    def run(items: list[Prepared]) -> None:
        job.same(f"batch {summary.batches + 1} ({len(items)} requests from line {items[0].index})",
                 batch_fingerprint(items, errors_since))
        errors_since.clear()
        try:
            res, rows = generate_batch(params, config, items, settings, eos, data=data)
        except (GenerateError, ValueError) as e:
            if len(items) > 1:  # one bad request must not sink the others: run them one by one
                for it in items:
                    run([it])
                return
            summary.errors += 1
            emit([error_record(items[0].id, items[0].index, e)], results=False)
            return
        recs = result_records(items, res, rows, summary.batches, proc, eos)
        summary.batches += 1
        summary.padded_rows += rows - len(items)
        summary.completed += len(items)
        summary.prompt_tokens += sum(it.n_tokens for it in items)
        summary.generated_tokens += sum(r["generated_tokens"] for r in recs)
        summary.compile_s += res.stats["prefill_compile_s"] + res.stats["decode_compile_s"]
        emit(recs)

    def pending() -> int:
        return sum(len(v) for v in buckets.values())

    thread.start()
    try:
        while True:
            msg = todo.get()
            if msg is _END:
                break
            kind, value = msg
            if kind == "crash":
                raise value
            if kind == "skip":
                if bar is not None:
                    bar.update(1)
                continue
            if kind == "error":
                summary.errors += 1
                emit([value], results=False)
                continue
            bucket = buckets.setdefault(value.key, [])
            bucket.append(value)
            if len(bucket) >= settings.batch_size:
                run(buckets.pop(value.key))
            elif pending() > max_pending:
                key = max(buckets, key=lambda k: len(buckets[k]))  # the fullest (oldest on ties)
                run(buckets.pop(key))
        for key in list(buckets):  # end of input: every bucket, in order of its first request
            run(buckets.pop(key))
    finally:
        stop.set()
        if bar is not None:
            bar.close()
    summary.wall_s = time.perf_counter() - t0
    return summary
