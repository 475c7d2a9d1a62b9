"""The batch output file: one writer at a time, one record per ``write``, and the ids already in it.

:class:`ResultWriter` takes an exclusive ``flock`` on the output file for the whole run (a second run on the
same file stops at once with :class:`OutputLockedError`; the lock goes away with the process, even after
``kill -9``), appends each record with a single ``os.write`` (``O_APPEND``) and fsyncs when asked: after
every batch of results, and for error records at most once per ``sync_interval_s`` (and when the file is
closed), so a file of bad lines is not one fsync per line. A record lost to a power cut before its fsync
is not in the file, so a rerun runs that request again: nothing is written twice and nothing is lost.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

from .batch_records import id_key


class OutputFileError(ValueError):
    """An output path that cannot be used (the requests file itself, a folder, not writable)."""


class OutputLockedError(OutputFileError):
    """Another process is writing the same output file."""


def check_output_path(requests_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """``--out`` is not the requests file (same path, link or hard link) and is not a folder."""
    req, out = os.fspath(requests_path), os.fspath(out_path)
    same = os.path.realpath(req) == os.path.realpath(out)
    if not same and os.path.exists(req) and os.path.exists(out):
        same = os.path.samefile(req, out)
    if same:
        raise OutputFileError(f"--out {out} is the requests file; give another output file")
    if os.path.isdir(out):
        raise OutputFileError(f"--out {out} is a folder; give a file path")


def make_output_folder(out_path: str | os.PathLike) -> None:
    """The folder of ``--out``, made if missing (as the writer would), or an :class:`OutputFileError`."""
    parent = os.path.dirname(os.path.abspath(out_path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise OutputFileError(f"--out {out_path}: its folder {parent} cannot be made ({e.strerror})") from None


def read_done_ids(path: str | os.PathLike, repair: bool = True) -> set[str]:
    """Ids (as :func:`~purekv_jax.batch_records.id_key`) recorded in an output file, results and errors. A
    last line without its newline (a write cut by a crash) is truncated away when ``repair`` (it is not
    counted: that request runs again); other unparsable lines are ignored."""
    path = os.fspath(path)
    done: set[str] = set()
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
    for line in data[:end].splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and "id" in rec:
            done.add(id_key(rec["id"]))
    return done


def encode_record(record: dict) -> bytes:
    """One JSON line; text that is not valid Unicode (a lone surrogate from a ``\\ud800`` escape) is
    written escaped, so every line stays UTF-8."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(record) + "\n").encode()


class ResultWriter:
    """Appends one JSON record per ``write`` call under an exclusive lock on the file (see the module doc).
    Only process 0 of a multi-process job writes (``enabled``)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True, sync_interval_s: float = 1.0):
        self.path = os.fspath(path)
        self.enabled = enabled
        self.sync_interval_s = sync_interval_s
        self.fd = None
        self.unsynced = False
        self.last_sync = time.monotonic()
        if enabled:
            make_output_folder(self.path)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                self.fd = None
                raise OutputLockedError(f"--out {self.path} is being written by another purekv batch run; wait for "
                                        "it to finish (then rerun to resume) or give another --out") from None

    def write(self, record: dict) -> None:
        if self.fd is None:
            return
        view = memoryview(encode_record(record))
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.unsynced = True

    def sync(self) -> None:
        if self.fd is not None and self.unsynced:
            os.fsync(self.fd)
            self.unsynced = False
            self.last_sync = time.monotonic()

    def sync_if_due(self) -> None:
        """fsync when the last one is older than ``sync_interval_s``."""
        if time.monotonic() - self.last_sync >= self.sync_interval_s:
            self.sync()

    def close(self) -> None:
        if self.fd is not None:
            self.sync()
            os.close(self.fd)  # releases the lock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def probe_output_lock(path: str | os.PathLike) -> None:
    """Raises :class:`OutputLockedError` when another run holds ``path`` now (checked before the weights are
    loaded; the run's own :class:`ResultWriter` takes the lock for good)."""
    if os.path.exists(path):
        ResultWriter(path).close()
