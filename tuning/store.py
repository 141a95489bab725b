"""Finished jobs, persisted the moment they finish, so a killed run resumes where it stopped.

``<out>/.tune-moe/results.jsonl`` holds one JobResult per line (appended, flushed and
fsynced); ``run.json`` holds the fingerprint of the settings that produced them. A
run with other settings refuses to mix its results in, unless told ``--fresh``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .configs import atomic_write_json
from .errors import UsageError
from .jobs import JobResult

STATE_DIR = ".tune-moe"


class Store:
    def __init__(self, out: Path, fingerprint: dict, fresh: bool = False):
        self.dir = Path(out) / STATE_DIR
        self.results_path = self.dir / "results.jsonl"
        self.run_path = self.dir / "run.json"
        if fresh and self.dir.exists():
            shutil.rmtree(self.dir)
        self._check_fingerprint(fingerprint)
        self.results: dict[tuple[str, int], JobResult] = self._load()

    def _check_fingerprint(self, fingerprint: dict) -> None:
        if self.run_path.exists():
            try:
                old = json.loads(self.run_path.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != fingerprint:
                diff = sorted(k for k in fingerprint if not isinstance(old, dict) or old.get(k) != fingerprint[k])
                raise UsageError(f"{self.dir} holds results of a run with other settings ({', '.join(diff) or 'unreadable'}); "
                                 "re-run with those settings to resume, or pass --fresh to discard them")
        else:
            atomic_write_json(self.run_path, fingerprint)

    def _load(self) -> dict[tuple[str, int], JobResult]:
        out = {}
        if not self.results_path.exists():
            return out
        for line in self.results_path.read_text().splitlines():
            try:
                r = JobResult.from_json(json.loads(line))
            except (json.JSONDecodeError, TypeError, KeyError, ValueError):
                continue  # a line cut short by a kill: that job simply runs again
            out[(r.file, r.m)] = r
        return out

    def add(self, result: JobResult) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
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

    def done(self, file: str, m: int) -> bool:
        return (file, m) in self.results

    def for_file(self, file: str) -> dict[int, JobResult]:
        return {m: r for (f, m), r in self.results.items() if f == file}
