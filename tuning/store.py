"""Finished jobs, persisted the moment they finish, so a killed run resumes where it stopped.

``<out>/.tune-moe/`` holds ``results.jsonl`` (one JobResult per line, appended, flushed and fsynced),
``run.json`` (per config file, the fingerprint of everything that decided its timings; the workers' GPUs and
software; and the config files written from these results, so a resume can tell a shape a kill kept from its files
from one written and changed since, and write only the first), ``lock``
(held by the one run writing here) and ``before/``: every config file (with its sidecar) as --out held it when
these results began, so a re-tune over a committed set loses nothing it replaced and ``tune-moe verify
--against`` re-times each change beside the entry it replaced, and nothing the run left alone. A result is reused
only under its file's fingerprint; another fingerprint, results with none, or an unreadable ``run.json``
are refused in one line (``--fresh`` discards them, and ``before/``). The run that takes the lock removes the temp
files a kill mid-write left in --out and here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path

from .errors import UsageError
from .files import atomic_write, atomic_write_json, copy_config_files, remove_temp_files, write_folder
from .jobs import JobResult
from .provenance import RunInfo

STATE_DIR = ".tune-moe"
FORMAT = 2


def has_results(out: Path) -> bool:
    """Whether ``out`` holds an earlier run's results (a resume can write its finished files on any machine)."""
    return (Path(out) / STATE_DIR / "results.jsonl").exists()


class Store:
    def __init__(self, out: Path, fresh: bool = False):
        self.dir = Path(out) / STATE_DIR
        self.results_path = self.dir / "results.jsonl"
        self.run_path = self.dir / "run.json"
        self.before_dir = self.dir / "before"
        self.made = [d for d in (self.dir, *self.dir.parents) if not d.exists()]  # deepest first
        self.added = False  # whether this run finished a job
        self.wrote = False  # whether this run wrote a config file from these results
        for path in (self.dir, self.results_path):
            if path.exists() and not (path.is_dir() if path == self.dir else path.is_file()):
                raise UsageError(f"{path} is not the {'folder' if path == self.dir else 'file'} a run keeps there; "
                                 "move it away, or pass another --out")
        self.dir.mkdir(parents=True, exist_ok=True)
        # as this run found the state: a run that finishes no job and writes no file puts it back (``close``)
        self._found = {"run": _read_bytes(self.run_path),
                       "before": self.before_dir.exists(), "lock": _read_bytes(self.dir / "lock")}
        self._lock = _take_lock(self.dir / "lock", Path(out))
        remove_temp_files(Path(out), "E=*.json")  # what a kill mid-write left (config files, sidecars)
        remove_temp_files(self.dir, "run.json")
        if fresh:  # discarded for good: nothing of it is put back
            self._found.update(run=None, before=False)
            for path in (self.results_path, self.run_path):
                path.unlink(missing_ok=True)
            shutil.rmtree(self.before_dir, ignore_errors=True)
        self.fingerprints: dict[str, dict] = {}
        self.run: RunInfo | None = None  # what the workers that made these results ran on
        self.written: set[str] | None = set()  # files written from them; None: results from before it was kept
        try:
            self._read_run()
        except UsageError:
            self.close(drop_unused=True)  # refused: the lock (and a state folder this run made) go
            raise
        self.results: dict[tuple[str, int], JobResult] = self._load()

    def close(self, drop_unused: bool = False) -> None:
        """Release the lock; with ``drop_unused``, a run that finished no job and wrote no file leaves the state as it
        found it: a state folder it made is removed with the folders made for it, one it found gets back its run
        record and its lock file's holder line, and loses the snapshot and lock file this run added (a run refused
        as its workers start, or on a node without the GPUs its jobs need, leaves nothing behind)."""
        unused = drop_unused and not self.added and not self.wrote
        if self._lock is not None:
            if unused:  # the holder line as found (an earlier run's), put back while this run still holds the lock
                if self._found["lock"] is None:
                    (self.dir / "lock").unlink(missing_ok=True)
                else:
                    os.ftruncate(self._lock.fileno(), 0)
                    os.write(self._lock.fileno(), self._found["lock"])  # opened to append: lands at 0
            self._lock.close()  # releases the lock
            self._lock = None
        if not unused:
            return
        if not self._found["before"]:
            shutil.rmtree(self.before_dir, ignore_errors=True)
        if self._found["run"] is None:
            self.run_path.unlink(missing_ok=True)
        elif self.run_path.read_bytes() != self._found["run"]:
            atomic_write(self.run_path, self._found["run"])
        if self.made:
            self.results_path.unlink(missing_ok=True)
            for folder in self.made:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty

    def _read_run(self) -> None:
        if not self.run_path.exists():
            return
        try:
            data = json.loads(self.run_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise UsageError(f"{self.run_path} is unreadable, so the results beside it cannot be checked; "
                             "move the folder away, or pass --fresh to discard them") from None
        if isinstance(data, dict) and (("format" not in data and data) or  # the flat record of the first versions
                                       (isinstance(data.get("format"), int) and data["format"] != FORMAT)):
            raise UsageError(f"{self.dir} holds results of another tune-moe version (its run record's format is "
                             f"{data.get('format', 1)}, this one reads {FORMAT}); pass --fresh to discard them")
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
            raise UsageError(f"{self.run_path} is not a run record tune-moe wrote (damaged or edited), so the results "
                             "beside it cannot be checked; move the folder away, or pass --fresh to discard them")
        self.fingerprints = data["files"]
        try:
            self.run = RunInfo(**data["run"])
        except (KeyError, TypeError):
            self.run = None  # a record it cannot read is none: no file is written from a guess
        written = data.get("written")
        if not all(isinstance(f, str) and isinstance(p, dict) for f, p in data["files"].items()) or \
                (isinstance(written, list) and not all(isinstance(f, str) for f in written)):
            raise UsageError(f"{self.run_path} is not a run record tune-moe wrote (damaged or edited), so the results "
                             "beside it cannot be checked; move the folder away, or pass --fresh to discard them")
        self.written = set(written) if isinstance(written, list) else None

    def _save_run(self) -> None:
        run = {"run": asdict(self.run)} if self.run else {}
        written = {"written": sorted(self.written)} if self.written is not None else {}
        atomic_write_json(self.run_path, {"format": FORMAT, "files": self.fingerprints, **run, **written})

    def note_run(self, run: RunInfo) -> None:
        """Record what this run's workers run on, before their first result is added."""
        self.run = run
        if self.written is None:
            self.written = set()  # kept from this run on: files an older run wrote are told by their content
        self._save_run()

    def note_written(self, file: str) -> None:
        """Record that ``file`` (config and sidecar) holds these results; called once both are in place (after
        ``note_run``, or by a resume that found the record kept)."""
        self.wrote = True
        if file not in self.written:
            self.written.add(file)
            self._save_run()

    def claim(self, file: str, fingerprint: dict) -> None:
        """Record that ``file`` is tuned under ``fingerprint``; refuse results made under another."""
        old = self.fingerprints.get(file)
        if old is None and any(f == file for f, _ in self.results):
            raise UsageError(f"{self.dir} holds results for {file} without their settings; "
                             "pass --fresh to discard them")
        if old is not None and old != fingerprint:
            differ = sorted(k for k in fingerprint if old.get(k) != fingerprint[k])
            shown = ", ".join(f"{k} {old.get(k)!r} -> {fingerprint[k]!r}" for k in differ[:3])
            raise UsageError(f"{self.dir} holds results for {file} made under other settings ({shown}); "
                             "re-run with those settings to resume, or pass --fresh to discard them")
        if old is None:
            self.fingerprints[file] = fingerprint
            self._save_run()

    def keep_before(self) -> None:
        """Snapshot the config files (and sidecars) the --out folder holds into ``before/``, once, when these
        results begin: a file it lacks is one they made, and one no run of them touched reads as it was. Copied
        into a temporary folder and renamed, so a kill mid-copy leaves no half snapshot."""
        if not self.before_dir.exists():
            write_folder(self.before_dir, lambda partial: copy_config_files(self.dir.parent, partial))

    def _load(self) -> dict[tuple[str, int], JobResult]:
        out = {}
        if not self.results_path.exists():
            return out
        for line in self.results_path.read_bytes().splitlines():
            try:
                r = JobResult.from_json(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, ValueError, AttributeError):
                continue  # a line cut short by a kill (or damaged): that job simply runs again
            out[(r.file, r.m)] = r
        return out

    def add(self, result: JobResult) -> None:
        with open(self.results_path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line cut short by a kill: end it, so this one stays whole
                    f.write(b"\n")
            f.write((json.dumps(result.to_json()) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        self.results[(result.file, result.m)] = result
        self.added = True

    def done(self, file: str, m: int) -> bool:
        return (file, m) in self.results

    def for_file(self, file: str) -> dict[int, JobResult]:
        return {m: r for (f, m), r in self.results.items() if f == file}


def _read_bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _take_lock(path: Path, out: Path):
    """An exclusive lock on the output folder for this process's lifetime (the OS drops it if we die)."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"{out} is being written by another tune-moe ({holder}); wait for it to finish, "
                         "or pass another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle
