"""Which process a service runs as, and whether that process is exiting, read from ``/proc`` (Linux).

A SIGKILLed worker's sockets close only after the kernel has torn down its address space: 100-300 ms
for a process holding a model and a KV pool. The kernel marks the process as exiting (``PF_EXITING``
in ``/proc/<pid>/stat``) before that teardown starts, within a millisecond of the signal. A router on
the same host (same kernel, same PID namespace) reads that flag to take a dying worker out of routing
long before its connections break. Elsewhere (another host, another container) nothing here applies
and detection falls back to the connections.
"""

from __future__ import annotations

import enum
import functools
import os
from dataclasses import dataclass

from tandem.proto.router.v1 import router_pb2

_PF_EXITING = 0x4  # include/linux/sched.h: "getting shut down"


@dataclass(slots=True, frozen=True)
class ProcessIdentity:
    """A process as seen from its own host. ``pid_namespace`` is empty where ``/proc`` cannot say."""

    pid_namespace: str
    pid: int
    start_ticks: int  # clock ticks after boot at which it started: a reused PID has another

    @property
    def known(self) -> bool:
        return bool(self.pid_namespace) and self.pid > 0


class ProcessState(enum.Enum):
    RUNNING = "running"  # alive and not exiting (it may still be stopped or hung)
    EXITING = "exiting"  # killed or exiting: its sockets close once the kernel has freed its memory
    GONE = "gone"  # no such process, or the PID now belongs to another process
    UNKNOWN = "unknown"  # not on this host, or /proc is unreadable


@functools.cache
def pid_namespace() -> str:
    """The kernel boot and PID namespace this process runs in; '' off Linux.

    Two processes can see each other's PIDs in /proc exactly when these are equal.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            boot_id = file.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return f"{boot_id}/{namespace}"


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` split after the command name (which may hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            raw = file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(b")") + 2:].decode("ascii").split()


def own_identity() -> ProcessIdentity:
    """This process's identity, to send along with a registration."""
    pid = os.getpid()
    try:
        fields = _stat_fields(pid)
    except (OSError, ValueError):
        fields = None
    if not fields or not pid_namespace():
        return ProcessIdentity("", pid, 0)
    return ProcessIdentity(pid_namespace(), pid, int(fields[19]))  # field 22 of stat: starttime


def probe(identity: ProcessIdentity) -> ProcessState:
    """What ``identity`` is doing now, as far as this host can tell; one small /proc read."""
    if not identity.known or identity.pid_namespace != pid_namespace():
        return ProcessState.UNKNOWN
    try:
        fields = _stat_fields(identity.pid)
    except (OSError, ValueError):
        return ProcessState.UNKNOWN
    if fields is None or int(fields[19]) != identity.start_ticks:
        return ProcessState.GONE
    # fields[0] is the state letter (field 3), fields[6] the kernel's task flags (field 9).
    if fields[0] in ("Z", "X", "x") or int(fields[6]) & _PF_EXITING:
        return ProcessState.EXITING
    return ProcessState.RUNNING


def process_to_proto(identity: ProcessIdentity) -> router_pb2.ProcessIdentity:
    """``identity`` as it travels in a ``WorkerInfo`` registration."""
    return router_pb2.ProcessIdentity(pid_namespace=identity.pid_namespace, pid=identity.pid,
                                      start_ticks=identity.start_ticks)


# The same identity as Consul service metadata (string values only).
_META_KEYS = ("process_pid_namespace", "process_pid", "process_start_ticks")


def process_meta(identity: ProcessIdentity) -> dict[str, str]:
    values = (identity.pid_namespace, str(identity.pid), str(identity.start_ticks))
    return dict(zip(_META_KEYS, values, strict=True))


def process_from_meta(meta: dict[str, str]) -> ProcessIdentity | None:
    """The identity ``process_meta`` wrote, or None when the metadata lacks it or is malformed."""
    try:
        host, pid, ticks = (meta[key] for key in _META_KEYS)
        return ProcessIdentity(host, int(pid), int(ticks))
    except (KeyError, ValueError):
        return None
