"""One live run per workdir: a lease that `train` takes before its first read or write of the
workdir and gives back when it ends, however it ends (finished, error, preemption, Ctrl-C).

    with lease.hold(workdir):      # every process calls it; process 0 takes the lease
        ...                        # a second run on this workdir meanwhile gets LeaseError

A second run is refused with one line naming the holder (host, pid, start time, heartbeat age)
and the file to delete if that holder is in fact gone. A lease whose holder is gone is taken
over with a warning:
  * same machine (hostname, boot id and pid namespace all match): its process is not running
    (or the pid now belongs to a process that started later);
  * another machine: its heartbeat (rewritten every `heartbeat_s` by a daemon thread, clock of
    the holder) is older than `stale_s` (default 300 s; clocks must agree to well within that),
    or lies more than `stale_s` in the future (a clock that far ahead, or a forged file).
A holder that finds its lease taken over (it was stalled for longer than `stale_s`) logs an
error, and its train loop stops at the next step with a LeaseError (`check_held`; with several
processes only the error is logged, since process 0 alone cannot leave a collective).

A workdir is a local folder or a gs:// path: <workdir>/lease.json is created complete and
atomically only if no such file exists (files.create_new: a hard-linked temp file locally, the
precondition ifGenerationMatch=0 on Cloud Storage, whose writes and listings Google documents
as strongly consistent). Taking over a stale lease is serialised by a short-lived break lock
(lease.json.break, created the same way), so of two runs that find the same stale lease
exactly one wins; a break lock that stays for `_BREAK_WAIT_S` while younger than 60 s is a
LeaseError naming its age (delete it if no other run is starting). A `lease.json` or break
lock that is a symlink or not a regular file is refused at once. Tested on local disks and
on a GCS emulator (fake-gcs-server). Other stores (memory://, s3://, ...) have no exclusive
create: a workdir there is refused with one line.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import socket
import stat
import sys
import threading
import time
import uuid
from typing import Iterator, Optional

from absl import logging

from lpt_jax.errors import Input, LeaseError
from lpt_jax.run import process_identity
from lpt_jax.storage import files

LEASE_FILE = "lease.json"
HEARTBEAT_S = 30.0
STALE_S = 300.0
_BREAK_STALE_S = 60.0            # a break lock older than this was left by a crashed run
_BREAK_WAIT_S = 5.0              # how long a younger one may stay while its run takes over
_ACQUIRE_TIMEOUT_S = 30.0

_HELD: dict = {}                 # workdir -> lease held by this process (nested hold() calls)


def _heartbeat(rec: dict) -> Optional[float]:
    """The record's heartbeat (seconds since the epoch), None if it is not a finite number."""
    value = rec.get("heartbeat")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _describe(rec: dict, now: float) -> str:
    beat = _heartbeat(rec)
    if beat is None:
        when = f"heartbeat {rec.get('heartbeat')!r}"
    elif beat > now + 1:
        when = f"heartbeat {beat - now:.0f} s in the future"
    else:
        when = f"heartbeat {max(now - beat, 0):.0f} s ago"
    return (f"host {rec.get('host', '?')}, pid {rec.get('pid', '?')}, started "
            f"{rec.get('started', '?')}, {when}")


def _not_a_file(path: str) -> str:
    """What a local `path` is if it is there and not a regular file ('' otherwise): a lease
    or break lock that is a symlink (dangling or not), a folder or a FIFO is no run's."""
    if files.is_remote(path):
        return ""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return ""
    if stat.S_ISLNK(mode):
        try:
            return f"a symlink (to {os.readlink(path)})"
        except OSError:  # removed meanwhile
            return "a symlink"
    if stat.S_ISREG(mode):
        return ""
    return "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"


# ------------------------------------------------------------------------------------------

class WorkdirLease:
    """The lease of one workdir (see the module docstring). `acquire` / `release`, or use it
    as a context manager."""

    def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S):
        self.workdir = files.absolute(workdir)
        self.remote = files.is_remote(self.workdir)
        self.heartbeat_s, self.stale_s = float(heartbeat_s), float(stale_s)
        self.token = uuid.uuid4().hex
        self.machine = process_identity.machine_id()
        self.path = os.path.join(self.workdir, LEASE_FILE)
        self.held = False
        self._created = False
        self.lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._record = {
            "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S UTC"),
            "heartbeat": time.time(), "machine": self.machine,
            "pid_start": process_identity.process_start(os.getpid()), "token": self.token,
            "command": " ".join(sys.argv)[:500]}

    # -- public -----------------------------------------------------------------------------

    def acquire(self) -> "WorkdirLease":
        """Takes the lease, or raises LeaseError naming the live holder."""
        if not files.can_create_new(self.workdir):
            raise LeaseError(Input("workdir", self.workdir), " must be a local folder or a "
                             "gs:// path: this store cannot create a file only if it is absent, "
                             "so two runs could both write the workdir")
        self._created = not files.isdir(self.workdir)
        files.makedirs(self.workdir)
        try:
            self._acquire_exclusive()
        except BaseException:
            self._remove_if_created_and_empty()
            raise
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="lpt-lease-heartbeat",
                                        daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Gives the lease back (removes its file if it is still this run's)."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            rec = self._read(self.path)
            if rec is not None and rec.get("token") == self.token:
                files.remove(self.path)
        except Exception as e:  # noqa: BLE001 - never hide the error the run ends with
            logging.warning("could not remove the lease file %s (%s): the next run will find "
                            "it stale and take it over", self.path, e)
        self._remove_if_created_and_empty()

    def _remove_if_created_and_empty(self) -> None:
        """A local workdir this lease created and nothing else used goes again (os.rmdir
        removes only an empty folder, so another run's files are never touched)."""
        if self._created and not self.remote:
            with contextlib.suppress(OSError):
                os.rmdir(self.workdir)

    def check(self) -> None:
        """Raises LeaseError if another run has taken this lease over."""
        if self.lost:
            raise LeaseError(self.lost)

    def __enter__(self) -> "WorkdirLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- records ----------------------------------------------------------------------------

    def _encode(self) -> bytes:
        self._record["heartbeat"] = time.time()
        return json.dumps(self._record, sort_keys=True).encode()

    @staticmethod
    def _read(path: str, patience_s: float = 2.0) -> Optional[dict]:
        """The lease record at `path`; None if there is no file. A file that stays unreadable
        (not JSON with a token) for `patience_s` is a LeaseError: it may be a holder's."""
        deadline = time.time() + patience_s
        while True:
            try:
                raw = files.read_bytes(path)
            except Exception as e:  # noqa: BLE001 - whatever the store says: ask exists()
                if not files.exists(path):
                    return None
                raw, error = b"", e
            try:
                rec = json.loads(raw.decode())
                if isinstance(rec, dict) and "token" in rec:
                    return rec
                error = "not a lease record"
            except (ValueError, UnicodeDecodeError) as e:  # empty or partly written
                error = e
            if time.time() > deadline:
                raise LeaseError(f"unreadable lease file {path} ({error}): if no run uses this "
                                 "workdir, delete that file")
            time.sleep(0.1)

    def _stale(self, rec: dict) -> Optional[str]:
        """Why the holder `rec` is gone, or None if it may still run."""
        if rec.get("machine") == self.machine:
            pid = rec.get("pid")
            if isinstance(pid, bool) or not isinstance(pid, int) or not process_identity.running(
                    pid, rec.get("pid_start")):
                return f"process {pid} no longer runs on this machine"
            return None
        beat = _heartbeat(rec)
        if beat is None:
            return f"its heartbeat {rec.get('heartbeat')!r} is not a time"
        age = time.time() - beat
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s (> {self.stale_s:.0f} s)"
        if -age > self.stale_s:
            return (f"its heartbeat lies {-age:.0f} s in the future: the holder's clock is ahead "
                    f"by {-age:.0f} s (> {self.stale_s:.0f} s; or the file was forged)")
        return None

    def _refuse(self, rec: dict, path: str) -> LeaseError:
        return LeaseError(
            f"{self.workdir} is in use by another run ({_describe(rec, time.time())}): wait for "
            "it to end or use another ", Input("workdir"), f"; if that run is gone, delete {path}",
            path=path)

    # -- taking the lease: atomic create ----------------------------------------------------

    def _refuse_odd(self, path: str) -> None:
        """A LeaseError at once if `path` is there but is not a regular file."""
        what = _not_a_file(path)
        if what:
            raise LeaseError(f"{path} is {what}, not a lease file that a run wrote: no run can "
                             f"take the lease of {self.workdir} while it is there; delete it",
                             path=path)

    def _acquire_exclusive(self) -> None:
        deadline = time.time() + _ACQUIRE_TIMEOUT_S
        while not files.create_new(self.path, self._encode()):
            self._refuse_odd(self.path)
            if time.time() > deadline:
                raise LeaseError(f"could not take the lease {self.path} within "
                                 f"{_ACQUIRE_TIMEOUT_S:.0f} s (other runs keep taking it): "
                                 "retry")
            rec = self._read(self.path)
            if rec is None:  # given back meanwhile: try again
                continue
            if rec.get("token") == self.token:  # a retried upload whose first try had landed
                return
            why = self._stale(rec)
            if why is None:
                raise self._refuse(rec, self.path)
            self._break(rec, why)

    def _break(self, stale: dict, why: str) -> None:
        """Removes the stale lease `stale` if it is still the one there, under the break
        lock (if another run holds that lock, it is breaking it: wait a moment)."""
        lock = f"{self.path}.break"
        if not files.create_new(lock, b""):
            self._wait_for_break_lock(lock, why)
            return
        try:
            current = self._read(self.path)
            if current is not None and current.get("token") == stale.get("token"):
                files.remove(self.path)
                self._warn_gone(stale, why)
        finally:
            files.remove(lock)

    def _wait_for_break_lock(self, lock: str, why: str) -> None:
        """Returns once the break lock `lock` is gone (its run has taken over the stale lease,
        or it was older than `_BREAK_STALE_S`: left by a run that crashed, removed here);
        LeaseError if a younger one stays for `_BREAK_WAIT_S`."""
        deadline = time.time() + _BREAK_WAIT_S
        while True:
            self._refuse_odd(lock)
            try:
                age = time.time() - files.mtime(lock)
            except FileNotFoundError:
                return
            if age > _BREAK_STALE_S:
                with contextlib.suppress(FileNotFoundError):
                    files.remove(lock)  # left by a run that crashed while breaking
                return
            if time.time() > deadline:
                raise LeaseError(
                    f"the lease of {self.workdir} is stale ({why}) but {lock} (created "
                    f"{max(age, 0):.0f} s ago) says another run is taking it over right now, "
                    f"and it stayed for {_BREAK_WAIT_S:g} s: retry in a minute; if no other "
                    "run is starting on this workdir, delete that file", path=lock)
            time.sleep(0.05)

    def _warn_gone(self, rec: dict, why: str) -> None:
        logging.warning("removed the lease of %s left by a run that is gone (%s; %s)",
                        self.workdir, _describe(rec, time.time()), why)

    # -- heartbeat --------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                rec = self._read(self.path)
            except Exception as e:  # noqa: BLE001 - a transient read error: try next time
                logging.warning("lease heartbeat: cannot read %s (%s)", self.path, e)
                continue
            if self._stop.is_set():
                return
            if rec is None or rec.get("token") != self.token:
                self.lost = (f"the lease of {self.workdir} was taken over by another run ("
                             f"{_describe(rec, time.time()) if rec else 'file removed'}): two "
                             "runs now write this workdir; stop one of them")
                logging.error("%s", self.lost)
                return
            try:
                files.write_bytes(self.path, self._encode())
            except Exception as e:  # noqa: BLE001
                logging.warning("lease heartbeat: cannot write %s (%s)", self.path, e)


# ------------------------------------------------------------------------------------------

def check_held(workdir: str) -> None:
    """Raises LeaseError if this process holds `workdir`'s lease and another run has taken it
    over meanwhile (the train loop asks before every step, so it writes nothing more)."""
    held = _HELD.get(files.absolute(workdir))
    if held is not None:
        held.check()


@contextlib.contextmanager
def hold(workdir: str, **kwargs) -> Iterator[Optional[WorkdirLease]]:
    """Holds the workdir's lease for the block: process 0 takes it (the others learn whether
    it did, and raise LeaseError with it); gives it back at exit, also on errors. Re-entrant:
    a nested hold of the same workdir in this process is a no-op."""
    import jax  # the lease itself does not need JAX; only the multi-process agreement
    key = files.absolute(workdir)
    if key in _HELD:
        yield _HELD[key]
        return
    lease, error = None, None
    if jax.process_index() == 0:
        lease = WorkdirLease(workdir, **kwargs)
        try:
            lease.acquire()
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the others
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils
        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            raise LeaseError(f"process 0 could not take the lease of {workdir} (see its log)")
    if error is not None:
        raise error
    _HELD[key] = lease
    try:
        yield lease
    finally:
        _HELD.pop(key, None)
        if lease is not None:
            lease.release()
