"""The workdir lease: a second live run is refused with one line naming the holder, a gone
holder's lease is taken over with a warning, the lease is given back however the run ends, of
two processes racing for one workdir exactly one wins, and a workdir on a store without an
exclusive create is refused (gs:// buckets: tests/test_gcs.py, against an emulator)."""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from lpt_jax.errors import ConfigError, LeaseError, Preempted
from lpt_jax.run import lease, process_identity
from lpt_jax.run.lease import WorkdirLease
from lpt_jax.storage import files

from helpers import REPO


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _plant(path, **fields):
    """Writes a lease record as another run would have (this machine, fresh heartbeat, unless
    `fields` say otherwise)."""
    rec = {"host": "elsewhere", "pid": 4242, "started": "2020-01-02 03:04:05 UTC",
           "heartbeat": time.time(), "machine": process_identity.machine_id(), "pid_start": None,
           "token": uuid.uuid4().hex, "command": "run.py"}
    rec.update(fields)
    files.makedirs(os.path.dirname(path))
    files.write_text(path, json.dumps(rec))
    return rec


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------------------
# Local disk.

def test_second_live_run_is_refused_naming_the_holder(tmp_path):
    workdir = str(tmp_path / "w")
    with WorkdirLease(workdir) as first:
        with pytest.raises(LeaseError) as err:
            WorkdirLease(workdir).acquire()
        msg = str(err.value)
        assert isinstance(err.value, ConfigError)
        assert "\n" not in msg
        assert f"host {socket.gethostname()}" in msg and f"pid {os.getpid()}" in msg
        assert f"started {first._record['started']}" in msg
        assert "UTC" in msg and os.path.join(workdir, "lease.json") in msg
    assert not os.path.exists(os.path.join(workdir, "lease.json"))
    WorkdirLease(workdir).acquire().release()  # free again


def test_live_holder_on_another_machine_is_refused(tmp_path):
    workdir = str(tmp_path / "w")
    _plant(os.path.join(workdir, "lease.json"), machine="other-host|x|y", pid=7)
    with pytest.raises(LeaseError, match="host elsewhere, pid 7, started 2020-01-02"):
        WorkdirLease(workdir).acquire()


@pytest.mark.parametrize("case", ["dead_pid", "reused_pid", "old_heartbeat_elsewhere"])
def test_gone_holder_is_taken_over_with_a_warning(tmp_path, caplog, case):
    workdir = str(tmp_path / "w")
    path = os.path.join(workdir, "lease.json")
    fields = {"dead_pid": dict(pid=_dead_pid()),
              # this process's pid, but a start time that is not this process's
              "reused_pid": dict(pid=os.getpid(), pid_start="1"),
              "old_heartbeat_elsewhere": dict(machine="other-host|x|y",
                                              heartbeat=time.time() - 3600)}[case]
    old = _plant(path, **fields)
    caplog.set_level(logging.WARNING)
    with WorkdirLease(workdir) as held:
        assert json.loads(files.read_text(path))["token"] == held.token
    warned = [w for w in _warnings(caplog) if "left by a run that is gone" in w]
    assert len(warned) == 1, _warnings(caplog)
    assert f"pid {old['pid']}" in warned[0] and "started 2020-01-02 03:04:05 UTC" in warned[0]
    assert ("no longer runs" in warned[0]) if case != "old_heartbeat_elsewhere" else (
        "no heartbeat for" in warned[0])


@pytest.mark.parametrize("error", [RuntimeError("boom"), Preempted("stopped at step 3", 15),
                                   KeyboardInterrupt()])
def test_hold_gives_the_lease_back_on_errors(tmp_path, error):
    workdir = str(tmp_path / "w")
    with pytest.raises(type(error)):
        with lease.hold(workdir) as held:
            assert os.path.exists(held.path)
            with lease.hold(workdir) as nested:  # re-entrant in one process
                assert nested is held
            raise error
    assert not os.path.exists(workdir)  # it created the workdir, and nothing else used it
    assert not held._thread.is_alive()
    with lease.hold(workdir):
        pass


def test_heartbeat_advances_and_a_lost_lease_is_noticed(tmp_path, caplog):
    workdir = str(tmp_path / "w")
    path = os.path.join(workdir, "lease.json")
    held = WorkdirLease(workdir, heartbeat_s=0.05).acquire()
    try:
        first = json.loads(files.read_text(path))["heartbeat"]
        time.sleep(0.5)
        assert json.loads(files.read_text(path))["heartbeat"] > first
        held.check()
        caplog.set_level(logging.ERROR)
        # Another run takes it over. A heartbeat that read the record just before may write
        # it back once (read, then write: no compare-and-swap on a plain file); plant again
        # until the other run's record stands.
        for _ in range(50):
            planted = _plant(path, machine="other-host|x|y")
            time.sleep(0.2)
            if json.loads(files.read_text(path))["token"] == planted["token"]:
                break
        with pytest.raises(LeaseError, match="taken over by another run"):
            held.check()
    finally:
        held.release()
    assert os.path.exists(path)  # the release leaves the other run's lease alone


def test_unreadable_lease_file_is_refused_not_overwritten(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "lease.json").write_text("{not json")
    with pytest.raises(LeaseError, match="unreadable lease file .* delete that file"):
        WorkdirLease(str(workdir)).acquire()
    assert (workdir / "lease.json").read_text() == "{not json"


def _within(seconds, fn):
    """fn()'s result or exception, failing the test if it takes longer than `seconds` (it runs
    in a daemon thread, so a call that would hang forever does not hang the test run)."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    t0 = time.time()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"], time.time() - t0


@pytest.fixture
def quick_break(monkeypatch):
    """A break lock may stay 0.5 s (not 5 s) and the lease be sought 3 s (not 30 s)."""
    monkeypatch.setattr(lease, "_BREAK_WAIT_S", 0.5, raising=False)
    monkeypatch.setattr(lease, "_ACQUIRE_TIMEOUT_S", 3.0)


def test_a_young_break_lock_that_stays_is_one_prompt_line(tmp_path, quick_break):
    """A stale lease and a break lock younger than 60 s that no run removes (its run crashed
    a moment ago, or someone made it): one line with the lock's age, not 'other runs'."""
    workdir = str(tmp_path / "w")
    _plant(os.path.join(workdir, "lease.json"), pid=_dead_pid())
    lock = tmp_path / "w" / "lease.json.break"
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - 20, time.time() - 20))
    with pytest.raises(LeaseError) as err:
        _within(10, WorkdirLease(workdir).acquire)
    msg = str(err.value)
    assert "\n" not in msg and "other runs" not in msg, msg
    assert re.search(re.escape(str(lock)) + r" \(created 2[01] s ago\) says another run is "
                     r"taking it over right now, and it stayed for 0.5 s", msg), msg
    assert "no longer runs" in msg and "if no other run is starting" in msg and "delete" in msg
    assert lock.exists() and (tmp_path / "w" / "lease.json").exists()  # nothing removed


def test_a_break_lock_that_goes_meanwhile_is_waited_for(tmp_path, quick_break, caplog):
    """The run holding the break lock finishes its take-over within the wait: this run then
    takes the lease (here the other run removed the break lock but not yet the stale lease,
    which this run then removes itself)."""
    workdir = str(tmp_path / "w")
    _plant(os.path.join(workdir, "lease.json"), pid=_dead_pid())
    lock = tmp_path / "w" / "lease.json.break"
    lock.write_bytes(b"")
    threading.Timer(0.2, lock.unlink).start()
    caplog.set_level(logging.WARNING)
    held, _ = _within(10, WorkdirLease(workdir).acquire)
    held.release()
    assert any("left by a run that is gone" in w for w in _warnings(caplog))


def test_an_old_break_lock_is_removed(tmp_path, quick_break):
    workdir = str(tmp_path / "w")
    _plant(os.path.join(workdir, "lease.json"), pid=_dead_pid())
    lock = tmp_path / "w" / "lease.json.break"
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - 120, time.time() - 120))
    held, _ = _within(10, WorkdirLease(workdir).acquire)
    held.release()
    assert not lock.exists()


@pytest.mark.parametrize("name", ["lease.json", "lease.json.break"])
@pytest.mark.parametrize("kind", ["dangling_symlink", "symlink_to_a_lease", "folder", "fifo"])
def test_a_lease_or_break_lock_that_is_no_file_is_refused_at_once(tmp_path, quick_break, name,
                                                                 kind):
    workdir = tmp_path / "w"
    workdir.mkdir()
    if name == "lease.json.break":  # met while taking over a stale lease
        _plant(str(workdir / "lease.json"), pid=_dead_pid())
    path = workdir / name
    if kind == "dangling_symlink":
        path.symlink_to(tmp_path / "nowhere")
    elif kind == "symlink_to_a_lease":
        _plant(str(tmp_path / "elsewhere.json"), pid=_dead_pid())
        path.symlink_to(tmp_path / "elsewhere.json")
    elif kind == "folder":
        path.mkdir()
    else:
        os.mkfifo(path)
    with pytest.raises(LeaseError) as err:
        _within(10, WorkdirLease(str(workdir)).acquire)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path} is "), msg
    assert msg.endswith("; delete it"), msg
    assert {"dangling_symlink": "is a symlink (to ", "symlink_to_a_lease": "is a symlink (to ",
            "folder": "is a folder", "fifo": "is not a regular file"}[kind] in msg, msg
    assert os.path.lexists(path)  # refused, not removed


def test_a_heartbeat_from_the_future_is_stale(tmp_path, caplog):
    """Another machine's heartbeat an hour ahead (its clock, or a forged file) is taken over,
    saying by how much the holder's clock is ahead."""
    workdir = str(tmp_path / "w")
    _plant(os.path.join(workdir, "lease.json"), machine="other-host|x|y",
           heartbeat=time.time() + 3600)
    caplog.set_level(logging.WARNING)
    held, _ = _within(10, WorkdirLease(workdir).acquire)
    held.release()
    warned = [w for w in _warnings(caplog) if "left by a run that is gone" in w]
    assert len(warned) == 1, _warnings(caplog)
    assert "heartbeat 3600 s in the future" in warned[0], warned
    assert "the holder's clock is ahead by 3600 s" in warned[0], warned


def test_a_heartbeat_slightly_ahead_or_a_live_local_holder_is_not_stale(tmp_path):
    workdir = str(tmp_path / "w")
    path = os.path.join(workdir, "lease.json")
    _plant(path, machine="other-host|x|y", heartbeat=time.time() + 60)  # within stale_s
    with pytest.raises(LeaseError, match="is in use by another run"):
        WorkdirLease(workdir).acquire()
    # this machine, a process that runs (this one): alive, whatever its heartbeat says
    _plant(path, pid=os.getpid(), pid_start=process_identity.process_start(os.getpid()),
           heartbeat=time.time() + 3600)
    with pytest.raises(LeaseError, match="heartbeat 3600 s in the future"):
        WorkdirLease(workdir).acquire()


@pytest.mark.parametrize("beat", ["soon", None, float("nan")])
def test_a_heartbeat_that_is_no_time_is_stale(tmp_path, caplog, beat):
    workdir = str(tmp_path / "w")
    path = os.path.join(workdir, "lease.json")
    rec = _plant(path, machine="other-host|x|y")
    rec["heartbeat"] = beat
    files.write_text(path, json.dumps(rec))  # NaN: json writes it, Python reads it back
    caplog.set_level(logging.WARNING)
    held, _ = _within(10, WorkdirLease(workdir).acquire)
    held.release()
    assert any("is not a time" in w for w in _warnings(caplog)), _warnings(caplog)


# ------------------------------------------------------------------------------------------
# Two processes at once.

_RACER = """
import sys, time
from lpt_jax.run.lease import WorkdirLease
from lpt_jax.errors import LeaseError
workdir, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    pass
try:
    held = WorkdirLease(workdir).acquire()
except LeaseError as e:
    print("REFUSED", e, flush=True)
else:
    print("WON", flush=True)
    time.sleep(1.5)  # hold it while the other one looks
    held.release()
"""


def _race(workdir, n=2):
    start = time.time() + 2.0  # both interpreters are up and spinning by then
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, workdir, repr(start)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(n)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return outs


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale_lease"])
def test_two_processes_racing_exactly_one_wins(tmp_path, stale):
    for attempt in range(2):
        workdir = str(tmp_path / f"w{attempt}")
        if stale:  # both find the same dead holder's lease and try to take it over
            _plant(os.path.join(workdir, "lease.json"), pid=_dead_pid())
        outs = _race(workdir)
        won = [o for o in outs if "WON" in o]
        assert len(won) == 1, outs
        refused = [o for o in outs if "REFUSED" in o]
        assert len(refused) == 1 and "is in use by another run" in refused[0], outs
        if stale:  # whichever removed the dead holder's lease said so, once
            assert sum("left by a run that is gone" in o for o in outs) == 1, outs
        assert not os.path.exists(os.path.join(workdir, "lease.json"))
        if os.path.exists(workdir):  # no temp or break files left
            assert os.listdir(workdir) == [], os.listdir(workdir)


# ------------------------------------------------------------------------------------------
# Stores without an exclusive create (gs:// is tested against an emulator in test_gcs.py).

def test_workdir_on_a_store_without_exclusive_create_is_refused():
    workdir = f"memory://lease_test/{uuid.uuid4().hex}/run"
    assert files.is_remote(workdir) and not files.can_create_new(workdir)
    with pytest.raises(LeaseError) as err:
        WorkdirLease(workdir).acquire()
    assert isinstance(err.value, ConfigError)
    line = err.value.text(cli=True)
    assert "\n" not in line and f"--workdir={workdir} must be a local folder or a gs://" in line
    assert not files.exists(workdir)  # refused before anything is written
