"""Run a command as the leader of its own process group, and always end the whole group.

SIGINT and SIGTERM become ``Interrupted`` so callers unwind through their ``finally``
blocks; while a group is being started or stopped they are held and re-raised after.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path


def say(text: str) -> None:
    print(f"validate-serve: {text}", flush=True)


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalGate:
    """SIGINT/SIGTERM raise Interrupted, except while ``held()``: then they are kept and raised on leaving."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.holding = 0

    def _handle(self, signum, frame) -> None:
        if not self.holding:
            raise Interrupted(signum)
        self.pending = signum

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    @contextmanager
    def held(self):
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
            if not self.holding and self.pending is not None:
                signum, self.pending = self.pending, None
                raise Interrupted(signum)


GATE = SignalGate()


class ProcessGroup:
    """Runs ``argv`` as the leader of a new session, stdout+stderr to ``log``; ``stop()`` ends every member."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, grace: float = 30.0):
        self.argv, self.env, self.log, self.grace = argv, env, log, grace
        self.proc: subprocess.Popen | None = None
        self.stopped = False

    def __enter__(self) -> ProcessGroup:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        try:
            with GATE.held(), open(self.log, "wb") as log:
                self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        except BaseException:  # a signal held during the start: __exit__ will not run, so stop here
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def members(self) -> list[int]:
        self.proc.poll()  # reap the leader so it does not linger as a zombie
        return group_members(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after ``grace`` s (or at once on a second Ctrl-C); waits until it is empty."""
        if self.proc is None or self.stopped:
            return
        with GATE.held():
            if self.members():
                _killpg(self.proc.pid, signal.SIGTERM)
            if not self._wait_empty(self.grace):
                _killpg(self.proc.pid, signal.SIGKILL)
                self._wait_empty(10.0, hurry=False)
            left = self.members()
            self.stopped = not left  # once empty, the group id may be reused: never signal it again
            if left:
                say(f"warning: processes {left} of group {self.proc.pid} outlived SIGKILL; end them by hand")

    def _wait_empty(self, seconds: float, hurry: bool = True) -> bool:
        deadline = time.monotonic() + seconds
        while self.members():
            if time.monotonic() >= deadline or (hurry and GATE.pending is not None):
                return False
            time.sleep(0.05)
        return True


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from /proc; elsewhere, [pgid] while any is left."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found
