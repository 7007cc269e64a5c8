"""Spool directories of the DICOM listeners: each belongs to the process that made it.

A process that receives C-STOREs spools them into a directory of its own below the store's
``spool_dir``, ``listener-<pid>`` (``listener-<pid>-<random>`` if that name is taken by a
live process, e.g. a gateway with the same process ID in another container on a shared data
directory). It holds an exclusive ``flock`` of the directory's ``.owner`` file for as long
as it lives; the kernel lets go when it dies, however it dies.

Partial receptions in a directory whose owner died are deleted (their senders were never
answered and send again): at a gateway's start-up, and by a listener pool when one of its
processes ends. A directory whose ``.owner`` lock is held is never touched, so a second
gateway on the same data directory leaves the first one's receptions alone. A directory
without an ``.owner`` file (made by an older version, or being made this instant) is
deleted only when no process with its ID lives.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import threading
from pathlib import Path

__all__ = [
    "LISTENER_SPOOL_PREFIX",
    "claim_spool_dir",
    "listener_spool_dir",
    "remove_abandoned_spools",
]

log = logging.getLogger(__name__)

LISTENER_SPOOL_PREFIX = "listener-"
OWNER_FILE = ".owner"

_claimed: dict[Path, tuple[int, Path, int]] = {}  # spool_dir -> (pid, directory, lock fd)
_claim_lock = threading.Lock()


def listener_spool_dir(spool_dir: Path, pid: int) -> Path:
    """The directory below the store's ``spool_dir`` that process ``pid`` receives into first."""
    return spool_dir / f"{LISTENER_SPOOL_PREFIX}{pid}"


def claim_spool_dir(spool_dir: Path) -> Path:
    """This process's receiving directory below ``spool_dir``: made and locked on first call,
    the same directory afterwards (for as long as the process lives)."""
    pid = os.getpid()
    with _claim_lock:
        found = _claimed.get(spool_dir)
        if found is not None and found[0] == pid:
            return found[1]
        spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for attempt in range(8):
            name = listener_spool_dir(spool_dir, pid)
            if attempt:
                name = name.with_name(f"{name.name}-{secrets.token_hex(4)}")
            fd = _try_claim(spool_dir, name)
            if fd is not None:
                _claimed[spool_dir] = (pid, name, fd)
                return name
        raise OSError(f"cannot make a spool directory of its own below {spool_dir}")


def _try_claim(spool_dir: Path, directory: Path) -> int | None:
    """The held lock of ``directory``, made now or taken over from a dead owner; None when
    the name belongs to a live process or was taken meanwhile."""
    try:
        directory.mkdir(mode=0o700)  # patient data: the owner only
    except FileExistsError:
        fd = _lock_owner(directory)
        if fd is None:
            return None
        # A dead process's directory under our name (process IDs repeat, e.g. in a
        # container): its partial files are of no one now.
        for leftover in directory.glob(".rx-*"):
            leftover.unlink(missing_ok=True)
        return fd
    # The lock file is made and locked under a temporary name, then renamed into the new
    # directory: once the directory has an owner file, that file is locked.
    temporary = spool_dir / f".owner-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(temporary, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(temporary, directory / OWNER_FILE)
    except OSError:  # the directory went meanwhile (removed as ownerless by another gateway)
        os.close(fd)
        temporary.unlink(missing_ok=True)
        return None
    return fd


def _lock_owner(directory: Path) -> int | None:
    """The owner lock of ``directory`` taken by this call (its owner is dead), or None (its
    owner lives, or it has no owner file)."""
    try:
        fd = os.open(directory / OWNER_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _process_lives(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_of(directory: Path) -> int | None:
    digits = directory.name[len(LISTENER_SPOOL_PREFIX) :].split("-", 1)[0]
    return int(digits) if digits.isdigit() else None


def remove_abandoned_spools(spool_dir: Path, *, pid: int | None = None) -> list[Path]:
    """Delete the listener spool directories below ``spool_dir`` whose owner is dead (only
    those of process ``pid`` with it); returns what was deleted. Directories of live
    processes, this one's included, stay."""
    if not spool_dir.is_dir():
        return []
    pattern = f"{LISTENER_SPOOL_PREFIX}*" if pid is None else f"{LISTENER_SPOOL_PREFIX}{pid}*"
    removed = []
    for directory in spool_dir.glob(pattern):
        if not directory.is_dir() or (pid is not None and _pid_of(directory) != pid):
            continue
        if (directory / OWNER_FILE).exists():
            fd = _lock_owner(directory)
            if fd is None:
                continue  # its owner lives
            try:
                shutil.rmtree(directory, ignore_errors=True)
            finally:
                os.close(fd)
        else:
            owner = _pid_of(directory)
            if owner is None or _process_lives(owner):
                continue  # an older version's directory of a live process, or being made
            shutil.rmtree(directory, ignore_errors=True)
        log.info("removed the partial receptions of a dead process: %s", directory)
        removed.append(directory)
    with contextlib.suppress(OSError):  # owner files of claims that failed half-way
        for stray in spool_dir.glob(".owner-*"):
            fd = os.open(stray, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                stray.unlink(missing_ok=True)
            except OSError:
                pass
            finally:
                os.close(fd)
    return removed
