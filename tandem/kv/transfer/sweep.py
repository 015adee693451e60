"""Shared-memory KV files say which process made them, so those a killed prefill worker left can be removed.

A SIGKILLed worker never unlinks its staging segments or its KV pool, and the shared-memory
directory keeps them until the host reboots. A PID alone cannot tell whose a file is: containers
with their own PID namespaces may share one /dev/shm, and PIDs are reused. So each name carries a
hash of its maker's PID namespace (boot id included), its PID and its start time, and a sweep
removes only files made in its own namespace by a process that no longer runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import structlog

from tandem.procinfo import ProcessIdentity, ProcessState, own_identity, pid_namespace, probe

log = structlog.get_logger(__name__)

# 48 bits: two namespaces that share a directory will not collide, and names stay short enough
# for the 64 characters ``shm._VALID_NAME`` allows after its prefix.
_NAMESPACE_HEX_DIGITS = 12
_OWNER = r"(?P<namespace>[0-9a-f]{12})-(?P<pid>[1-9][0-9]*)-(?P<start_ticks>[0-9]+)-[0-9a-f]{8}"
# A staging segment (``shm.SegmentPool``) ends in a counter; a whole pool (``shared_pool``) does not.
_OWNED_NAMES = (re.compile(rf"^tandem-kv-{_OWNER}-[0-9]+$"), re.compile(rf"^tandem-kv-pool-{_OWNER}$"))
_GONE = (ProcessState.EXITING, ProcessState.GONE)  # once exiting (or a zombie) no code of its own runs


@dataclass(slots=True, frozen=True)
class FileOwner:
    """The maker of a KV file, as its name gives it."""

    namespace_hash: str
    pid: int
    start_ticks: int


@dataclass(slots=True, frozen=True)
class SweepResult:
    num_files: int
    num_bytes: int


def namespace_hash(namespace: str) -> str:
    """A short, stable stand-in for ``procinfo.pid_namespace()`` (which is too long for a file name)."""
    return hashlib.sha256(namespace.encode()).hexdigest()[:_NAMESPACE_HEX_DIGITS]


def owner_token(identity: ProcessIdentity | None = None) -> str:
    """The middle of a new KV file's name: ``<namespace hash>-<pid>-<start ticks>-<8 random hex>``.

    ``identity`` defaults to this process. The random part keeps apart several pools of one process.
    Where ``/proc`` cannot name the namespace the hash is of '', which no sweep ever matches.
    """
    identity = own_identity() if identity is None else identity
    return (f"{namespace_hash(identity.pid_namespace)}-{identity.pid}-{identity.start_ticks}-"
            f"{secrets.token_hex(4)}")


def parse_owner(name: str) -> FileOwner | None:
    """Who made the file ``name``; None for anything not named by ``owner_token`` (older names included)."""
    for pattern in _OWNED_NAMES:
        match = pattern.match(name)
        if match is not None:
            return FileOwner(match["namespace"], int(match["pid"]), int(match["start_ticks"]))
    return None


def sweep_orphans(shm_dir: str | Path) -> SweepResult:
    """Unlink the KV files in ``shm_dir`` made in this PID namespace by processes that no longer run.

    Called when a prefill worker starts, before it makes files of its own. Files of other
    namespaces, of running processes, in the older naming (which cannot tell containers apart) and
    everything else stay. Never raises: a missing directory, a file that vanishes or one this
    process may not remove is skipped.
    """
    namespace = pid_namespace()
    if not namespace:  # no /proc: no way to tell a dead maker from a live one
        return SweepResult(0, 0)
    own_hash = namespace_hash(namespace)
    try:
        with os.scandir(shm_dir) as scan:
            entries = list(scan)
    except OSError:
        return SweepResult(0, 0)
    states: dict[tuple[int, int], ProcessState] = {}  # one probe per maker, however many files it left
    num_files = num_bytes = 0
    makers: set[int] = set()
    for entry in entries:
        owner = parse_owner(entry.name)
        if owner is None or owner.namespace_hash != own_hash:
            continue
        key = (owner.pid, owner.start_ticks)
        if key not in states:
            states[key] = probe(ProcessIdentity(namespace, owner.pid, owner.start_ticks))
        if states[key] not in _GONE:  # running, or UNKNOWN: /proc could not say
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            size = entry.stat(follow_symlinks=False).st_size
            os.unlink(entry.path)
        except OSError:
            continue
        num_files += 1
        num_bytes += size
        makers.add(owner.pid)
    if num_files:
        log.info("removed shared-memory KV files of exited processes", shm_dir=str(shm_dir),
                 num_files=num_files, num_bytes=num_bytes, pids=sorted(makers))
    return SweepResult(num_files, num_bytes)
