"""tandem.procinfo: a process's identity and whether it is exiting, from /proc."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

from tandem.procinfo import (
    ProcessIdentity,
    ProcessState,
    StatReader,
    own_identity,
    pid_namespace,
    probe,
    process_from_meta,
    process_meta,
)

CHILD = ("import dataclasses, json, time; from tandem.procinfo import own_identity; "
         "print(json.dumps(dataclasses.asdict(own_identity())), flush=True); time.sleep(600)")


def test_this_process_is_running_and_known() -> None:
    me = own_identity()
    assert me.known and me.pid_namespace == pid_namespace() and me.start_ticks > 0
    assert probe(me) is ProcessState.RUNNING


def test_a_killed_process_is_exiting_or_gone_and_a_reused_pid_is_not_mistaken() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    identity = ProcessIdentity(**json.loads(child.stdout.readline()))
    assert identity.pid == child.pid
    assert probe(identity) is ProcessState.RUNNING
    # The same PID with another start time is another process (the PID was reused).
    assert probe(dataclasses.replace(identity, start_ticks=identity.start_ticks + 1)) is ProcessState.GONE
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert probe(identity) in (ProcessState.EXITING, ProcessState.GONE)


def test_a_zombie_counts_as_exiting() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    identity = ProcessIdentity(**json.loads(child.stdout.readline()))
    child.send_signal(signal.SIGKILL)
    # Not reaped yet: the kernel keeps it as a zombie, which serves nothing.
    deadline = time.monotonic() + 5
    while probe(identity) is ProcessState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.001)
    assert probe(identity) is ProcessState.EXITING
    child.wait()
    assert probe(identity) is ProcessState.GONE


def test_another_host_or_namespace_is_unknown() -> None:
    me = own_identity()
    assert probe(dataclasses.replace(me, pid_namespace="other-boot/pid:[1]")) is ProcessState.UNKNOWN
    assert probe(ProcessIdentity("", me.pid, me.start_ticks)) is ProcessState.UNKNOWN


def test_the_identity_round_trips_through_consul_metadata() -> None:
    me = own_identity()
    assert process_from_meta(process_meta(me)) == me
    assert process_from_meta({"model": "m"}) is None
    assert process_from_meta({**process_meta(me), "process_pid": "not a number"}) is None


def test_a_kept_open_stat_file_follows_its_process_not_its_pid() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    reader = StatReader(ProcessIdentity(**json.loads(child.stdout.readline())))
    try:
        assert reader.state() is ProcessState.RUNNING
        assert reader.state() is ProcessState.RUNNING  # re-read in place
        child.send_signal(signal.SIGKILL)
        child.wait()  # reaped: its PID may now go to anyone, the open file reads ESRCH
        assert reader.state() is ProcessState.GONE
        assert reader.state() is ProcessState.GONE
    finally:
        reader.close()
