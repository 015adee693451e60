"""Which host (and shared-memory namespace) a worker runs in, so peers can pick the shm transport."""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from pathlib import Path


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


@functools.cache
def host_id(shm_dir: str = "/dev/shm") -> str:
    """Equal for two processes exactly when they can open each other's files under ``shm_dir``.

    The machine and boot ids name the host; the device and inode of ``shm_dir`` tell apart
    containers on one host that each mount their own /dev/shm.
    """
    try:
        stat = os.stat(shm_dir)
        namespace = f"{stat.st_dev}:{stat.st_ino}"
    except OSError:
        namespace = "no-shm"
    parts = [_read("/etc/machine-id") or socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"),
             namespace]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
