"""tandem.kv.transfer.sweep: KV files a killed process left in shared memory are removed, nothing else."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.engine.types import KVLayout
from tandem.kv.transfer.shared_pool import SharedKvPool
from tandem.kv.transfer.shm import SegmentPool
from tandem.kv.transfer.sweep import (
    FileOwner,
    SweepResult,
    namespace_hash,
    owner_token,
    parse_owner,
    sweep_orphans,
)
from tandem.procinfo import ProcessIdentity, ProcessState, own_identity, probe

# A prefill worker's staging side: it makes one segment, says who it is, and waits to be killed.
CHILD = ("import dataclasses, json, sys, time; from tandem.kv.transfer.shm import SegmentPool; "
         "from tandem.procinfo import own_identity; segment = SegmentPool(sys.argv[1], 0).acquire('t', 1); "
         "print(json.dumps({'identity': dataclasses.asdict(own_identity()), 'segment': segment.name}), flush=True); "
         "time.sleep(600)")


@dataclasses.dataclass
class Child:
    process: subprocess.Popen[str]
    identity: ProcessIdentity
    segment: str


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Child]:
    process = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        said = json.loads(process.stdout.readline())
        yield Child(process, ProcessIdentity(**said["identity"]), said["segment"])
    finally:
        process.kill()
        process.wait()


def kill(child: Child, *, reap: bool) -> None:
    child.process.send_signal(signal.SIGKILL)
    if reap:
        child.process.wait()
        return
    deadline = time.monotonic() + 5  # unreaped, it stays a zombie once the kill has landed
    while probe(child.identity) is ProcessState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.001)


def touch(directory: Path, name: str, size: int = 10) -> Path:
    path = directory / name
    path.write_bytes(b"x" * size)
    return path


@pytest.mark.parametrize("reap", [True, False], ids=["reaped", "zombie"])
def test_a_killed_workers_segment_is_removed_and_its_other_files_stay(tmp_path: Path, child: Child,
                                                                     reap: bool) -> None:
    assert parse_owner(child.segment) == FileOwner(namespace_hash(child.identity.pid_namespace), child.identity.pid,
                                                   child.identity.start_ticks)
    # The same PID and start time seen from another PID namespace, or from one /proc could not name,
    # is some other process; a name without a namespace (the older naming) cannot be placed at all.
    kept = [touch(tmp_path, f"tandem-kv-{owner_token(dataclasses.replace(child.identity, pid_namespace=other))}-1")
            for other in ("other-boot/pid:[4026531836]", "")]
    kept += [touch(tmp_path, f"tandem-kv-{child.identity.pid}-0123abcd-1"),
             touch(tmp_path, f"tandem-kv-pool-{child.identity.pid}-0123abcd")]
    assert sweep_orphans(tmp_path) == SweepResult(0, 0)  # still running
    kill(child, reap=reap)
    assert sweep_orphans(tmp_path) == SweepResult(1, 1 << 20)  # segments are rounded up to 1 MiB
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_a_reused_pid_does_not_keep_a_dead_processs_files(tmp_path: Path) -> None:
    me = own_identity()
    mine = touch(tmp_path, f"tandem-kv-pool-{owner_token(me)}")
    earlier = touch(tmp_path, f"tandem-kv-pool-{owner_token(dataclasses.replace(me, start_ticks=me.start_ticks - 1))}",
                    size=7)
    assert sweep_orphans(tmp_path) == SweepResult(1, 7)
    assert not earlier.exists() and mine.exists()


def test_files_not_named_by_a_maker_stay(tmp_path: Path) -> None:
    dead = owner_token(dataclasses.replace(own_identity(), start_ticks=own_identity().start_ticks - 1))
    foreign = [touch(tmp_path, name) for name in
               ("notes.txt", "tandem-kv-", "tandem-kv-garbage", f"tandem-kv-{dead}", f"tandem-kv-pool-{dead}-1",
                f"tandem-kv-{dead}-1.bak", f"other-{dead}-1", f"tandem-kv-{dead.upper()}-1")]
    (tmp_path / f"tandem-kv-{dead}-2").mkdir()  # not a file
    (tmp_path / f"tandem-kv-{dead}-3").symlink_to(foreign[0])
    assert sweep_orphans(tmp_path) == SweepResult(0, 0)
    assert len(list(tmp_path.iterdir())) == len(foreign) + 2 and foreign[0].read_bytes() == b"x" * 10


def test_a_missing_directory_is_no_error(tmp_path: Path) -> None:
    assert sweep_orphans(tmp_path / "absent") == SweepResult(0, 0)
    assert sweep_orphans(touch(tmp_path, "a-file")) == SweepResult(0, 0)


def test_segments_and_shared_pools_are_named_for_this_process_and_kept_while_it_runs(tmp_path: Path) -> None:
    me = own_identity()
    segments = SegmentPool(str(tmp_path), max_free_bytes=0)
    segment = segments.acquire("t", 1)
    pool = SharedKvPool(str(tmp_path), KVLayout(2, 1, 8, 4, "float32"), 16)
    owner = FileOwner(namespace_hash(me.pid_namespace), me.pid, me.start_ticks)
    assert parse_owner(segment.name) == owner and parse_owner(pool.path.name) == owner
    assert sweep_orphans(tmp_path) == SweepResult(0, 0)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([segment.name, pool.path.name])
    pool.close()
    segments.close()
