"""One process per cell: a lock file in the cell directory while the cell is computed.

Researchers share result trees: two people start one sweep into one `out_dir`, a SLURM array and a local rerun
overlap, dense listed at two ratios becomes two array tasks of the same cell. `CellLock` makes every cell computed
by one process at a time:

    with CellLock(cell_dir, stale_s=600, refresh_s=30) as lock:
        if lock.busy:                      # another live process holds it: lock.busy is its Owner
            ...                            # skip the cell (or wait: `wait_for`)
        ...                                # compute; the lock is refreshed in the background

The lock is `<cell>/cell.lock`, a JSON file naming its owner (host, pid, the pid's start time, the SLURM task and
its restart count, when it started and when it was last refreshed). It is made atomically and without fcntl, so it
holds on a shared filesystem (NFS): the content is written to a temporary file first and hard-linked to the lock's
name, which fails when the name exists (`link` is atomic on NFS, `O_EXCL` is not on old clients). A background
thread rewrites `refreshed` every `refresh_s` seconds while the owner lives.

A lock whose owner is gone is taken over with a warning:
    - same host: the pid is not alive (or is alive as another process: a different start time);
    - the same SLURM task, restarted (SLURM_RESTART_COUNT higher than the lock's): a requeued task takes over
      its own cell wherever it lands;
    - another host: not refreshed for `stale_s` seconds (the owner's wall clock against this host's: keep the
      hosts' clocks in sync, as NTP does, and `stale_s` far above `refresh_s`).
A takeover renames the stale lock away (atomic), checks that what it moved is the lock it judged stale (else it
puts a fresh owner's lock back) and then takes the lock as above, so two processes taking over at once end with one
owner. The lock is released (removed, if it is still this process's) when the cell ends, also on an exception,
SIGTERM or SystemExit (submitit's requeue); a SIGKILL leaves it behind for the next run to take over.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("bench.lock")
LOCK = "cell.lock"


def pid_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22), or None where /proc
    does not say: with the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int, start: int | None) -> bool:
    """Whether process `pid` on this host is alive and is the one that started at `start` (when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    now = pid_start(pid)
    return start is None or now is None or now == start


def slurm_task() -> tuple[str | None, int]:
    """(this process's SLURM task id, e.g. `12_3` in an array or `12`, its restart count) inside a submitit task,
    else (None, 0): a plain process inside an allocation is not a task and never takes over by job id."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None, 0
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    task = f"{array}_{index}" if array and index else os.environ.get("SLURM_JOB_ID")
    return task, int(os.environ.get("SLURM_RESTART_COUNT") or 0)


@dataclass(frozen=True)
class Owner:
    """Who holds a cell: written into cell.lock. Times are Unix seconds of the owner's clock."""

    host: str
    pid: int
    pid_start: int | None
    slurm_task: str | None
    slurm_restart: int
    started_s: float
    refreshed_s: float
    token: str  # this acquisition's own id: a takeover checks it moved the lock it judged stale

    @classmethod
    def me(cls) -> "Owner":
        now = time.time()
        task, restart = slurm_task()
        return cls(platform.node(), os.getpid(), pid_start(os.getpid()), task, restart, now, now, uuid.uuid4().hex)

    def describe(self) -> str:
        """host:pid since <local time>, for log lines."""
        return f"{self.host}:{self.pid} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started_s))}"

    def gone(self, stale_s: float) -> str | None:
        """Why this owner no longer holds the cell (a phrase for the warning), or None while it may."""
        me = Owner.me()
        if self.host == me.host and not pid_alive(self.pid, self.pid_start):
            return f"pid {self.pid} is not running on {self.host}"
        if self.slurm_task and self.slurm_task == me.slurm_task and me.slurm_restart > self.slurm_restart:
            return f"SLURM task {self.slurm_task} was requeued (restart {me.slurm_restart})"
        age_s = time.time() - self.refreshed_s
        if self.host != me.host and age_s > stale_s:
            return f"not refreshed for {age_s:.0f} s (stale after {stale_s:g} s)"
        return None


def read_owner(path: Path) -> Owner | None:
    """The owner written in a lock file, or None when there is no file. A file that does not parse (written by
    hand, or by another version) is an owner that is gone."""
    try:
        data = json.loads(Path(path).read_text())
        return Owner(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return Owner("?", -1, None, None, 0, 0.0, 0.0, "unreadable")


def _link_new(path: Path, owner: Owner) -> bool:
    """Create `path` holding `owner` if no file has that name; True if this call created it."""
    tmp = path.with_name(f".{path.name}.{owner.token}.tmp")
    try:
        tmp.write_text(json.dumps(asdict(owner)))
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:  # a full disk: name the lock, not its temporary file
        raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        tmp.unlink(missing_ok=True)


class CellLock:
    """The lock of one cell directory (module docstring). `busy` after entering: None when this process holds the
    cell, else the live owner that does."""

    def __init__(self, cell: Path, stale_s: float = 600.0, refresh_s: float = 30.0):
        self.path = Path(cell) / LOCK
        self.stale_s, self.refresh_s = float(stale_s), float(refresh_s)
        self.owner: Owner | None = None
        self.busy: Owner | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> Owner | None:
        """Take the lock, taking over one whose owner is gone; returns None when taken, else the live owner."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # each round either takes the lock, finds a live owner, or sees the file change
            me = Owner.me()
            if _link_new(self.path, me):
                self.owner = me
                self._start_refresh()
                return None
            held = read_owner(self.path)
            if held is None:
                continue  # released in between
            why = held.gone(self.stale_s)
            if why is None:
                return held
            self._take_over(held, why)
        return read_owner(self.path)

    def _take_over(self, stale: Owner, why: str) -> None:
        aside = self.path.with_name(f".{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else moved it first
        moved = read_owner(aside)
        if moved is not None and moved.token != stale.token:  # a fresh owner's lock: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            log.warning("%s: taking over the lock of %s: %s", self.path.parent, stale.describe(), why)
        aside.unlink(missing_ok=True)

    def _start_refresh(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh_loop, name=f"lock {self.path.parent}", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            held = read_owner(self.path)
            if held is None or held.token != self.owner.token:
                log.warning("%s: lost the cell's lock to %s; the cell goes on, its files are written atomically",
                            self.path.parent, held.describe() if held else "nobody")
                return
            tmp = self.path.with_name(f".{self.path.name}.{self.owner.token}.tmp")
            try:
                tmp.write_text(json.dumps(asdict(self.owner) | {"refreshed_s": time.time()}))
                os.replace(tmp, self.path)
            except OSError as e:  # a full disk: the lock ages; the cell itself reports its own write failures
                log.warning("%s: could not refresh the lock (%s)", self.path, e)
                tmp.unlink(missing_ok=True)

    def release(self) -> None:
        """Stop refreshing; remove the lock if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.owner is not None:
            held = read_owner(self.path)
            if held is not None and held.token == self.owner.token:
                self.path.unlink(missing_ok=True)
            self.owner = None

    def abandoned(self) -> bool:
        """True when no live process holds the cell: no lock file, or one whose owner is gone, which is removed
        (a SIGKILL after the cell's records were written leaves it behind)."""
        held = read_owner(self.path)
        if held is None:
            return True
        why = held.gone(self.stale_s)
        if why is not None:
            self._take_over(held, why)
            self.path.unlink(missing_ok=True)  # nothing to compute: the lock is not kept
        return why is not None

    def wait_for(self, poll_s: float = 5.0) -> None:
        """Block until this process holds the lock (the owner released it or is gone)."""
        while self.busy is not None:
            time.sleep(poll_s)
            self.busy = self.acquire()

    def __enter__(self) -> "CellLock":
        self.busy = self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
