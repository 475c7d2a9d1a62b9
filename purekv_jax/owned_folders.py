"""Which folders this project may replace or delete, and the temporary folders of runs in progress.

A folder is replaced (``purekv convert --force``, ``purekv demo --save``) only when it is empty or carries
one of our marker files (:func:`replace_refusal` says why not otherwise).

A conversion writes into a hidden sibling ``.NAME.tmp-XXXX`` (:class:`OwnedTempFolder`) that holds
``.purekv-owner.lock``, ``flock``-ed by the converting process for as long as it runs; the kernel drops
the lock when the process ends, even after ``kill -9``. A later conversion into the same parent
(:func:`sweep_temp_folders`) removes the folders whose lock is free (their run is dead) and leaves the
ones whose lock is held (a live run) or that have no lock file (an older version's, or a run renaming its
folder into place); those are reported, never called safe to delete. The lock file appears by a rename
after it is locked, so no sweep can find it unlocked while its owner lives.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import tempfile

OWNER_LOCK = ".purekv-owner.lock"


def replace_refusal(path: str, markers: tuple[str, ...], what: str) -> str | None:
    """Why the existing ``path`` may not be replaced (None: it may): not a folder, or a folder that is not
    empty and has none of ``markers`` (``what`` names the kind of folder the markers mark)."""
    if not os.path.lexists(path):
        return None
    if os.path.islink(path) or not os.path.isdir(path):
        return f"{path} exists and is not a folder; refusing to replace it"
    if os.listdir(path) and not any(os.path.isfile(os.path.join(path, m)) for m in markers):
        return (f"{path} is not empty and is not {what} (it has no {' or '.join(markers)}); refusing to replace "
                "it: move it away or give another path")
    return None


def temp_pattern(parent: str, base: str) -> str:
    return os.path.join(glob.escape(parent), f".{glob.escape(base)}.tmp-*")


class OwnedTempFolder:
    """A hidden temporary folder ``parent/.BASE.tmp-XXXX`` whose owner lock this process holds until
    :meth:`close`; call :meth:`disown` right before renaming the folder into place."""

    def __init__(self, parent: str, base: str):
        self.path = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
        part = os.path.join(self.path, OWNER_LOCK + ".part")
        self.fd = os.open(part, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.rename(part, os.path.join(self.path, OWNER_LOCK))

    def disown(self) -> None:
        """Removes the lock file (the folder is about to become the result); the lock itself is kept."""
        os.remove(os.path.join(self.path, OWNER_LOCK))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _owner_is_dead(folder: str) -> bool | None:
    """True: the lock file is there and free (its owner is gone); False: held by a live run; None: no lock file."""
    lock = os.path.join(folder, OWNER_LOCK)
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return os.path.exists(lock) and os.path.samestat(os.fstat(fd), os.stat(lock))
    finally:
        os.close(fd)


def sweep_temp_folders(parent: str, base: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(removed, left)``: the temporary folders of dead runs into ``parent/base``, removed, and the others
    (live runs, or no owner lock), left alone."""
    removed, left = [], []
    for folder in sorted(glob.glob(temp_pattern(parent, base))):
        if _owner_is_dead(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        else:
            left.append(folder)
    return tuple(removed), tuple(left)


def write_marker(folder: str, name: str, doc) -> None:
    """Writes the JSON ``doc`` as ``folder/name`` durably: a ``.part`` file, flushed and fsynced, then renamed, so
    a folder's marker is either whole or absent (what marks the folder's contents as complete)."""
    path = os.path.join(folder, name)
    with open(path + ".part", "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(path + ".part", path)


def install_folder(tmp: str, dst: str) -> None:
    """Renames the finished folder ``tmp`` to ``dst``; an existing ``dst`` (the caller checked it may be replaced)
    is swapped out first and removed after, so ``dst`` is at every moment the old folder or the new one."""
    parent, base = os.path.split(dst)
    if os.path.lexists(dst):
        old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
        os.rename(dst, os.path.join(old, base))
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
