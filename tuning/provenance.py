"""Provenance: which run tuned a vLLM config file, on what, with which software, and how each batch size did.

vLLM's loader ``int()``s every key of a config file but ``triton_version``, so this lives in a
sidecar ``<name>.provenance.json`` beside it. ``Provenance`` is the one record of it: written by
``outputs`` when a run finishes a shape, read (and validated, one line per problem) by ``report``,
``bake`` and the config-file checks. ``RunInfo`` is what a run's workers report about themselves.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .configs import FIELDS, TileConfig
from .errors import UsageError
from .files import atomic_write_json
from .shapes import MoeShape, parse_layout

TOOL = "tune-moe"
SUFFIX = ".provenance.json"
BATCH_KEY = re.compile(r"[0-9]+")  # a results key; str.isdigit() also takes "²", which int() refuses
VLLM_VERSION = re.compile(r"v?[0-9]+\.[0-9]+(?![0-9])")  # MAJOR.MINOR, then anything (.PATCH, rc1, +cu130)


def sidecar_path(config_path: Path | str) -> Path:
    config_path = Path(config_path)
    return config_path.with_name(config_path.name.removesuffix(".json") + SUFFIX)


@dataclass(frozen=True, kw_only=True)
class RunInfo:
    """The GPUs and software a run's workers ran on (the same for all of them: the driver checks)."""

    gpu_name: str
    device_name: str | None
    driver: str
    count: int  # workers (one per GPU)
    cuda: str
    torch: str
    triton: str
    python: str
    vllm: str
    kernel: str  # human-readable origin of the kernel
    kernel_sha256: str


@dataclass(frozen=True, kw_only=True)
class Target:
    """The Triton the target vLLM runs, and whether a tune under another Triton was allowed anyway."""

    vllm: str
    torch: str | None
    triton: str | None
    how: str
    mismatch_allowed: bool = False


@dataclass(frozen=True, kw_only=True)
class BatchRow:
    m: int
    default: TileConfig
    default_us: float
    tuned: TileConfig
    tuned_us: float
    speedup: float
    roofline_us: float
    default_pct_roofline: float
    tuned_pct_roofline: float
    bound: str = ""
    tuned_p20_us: float | None = None
    tuned_p80_us: float | None = None
    evaluated: int | None = None
    failed: int | None = None
    unit: str | None = None  # NVML's UUID of the board that timed this row (rows from before it lack it)

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "m" and v is not None}
        d["default"], d["tuned"] = self.default.to_dict(), self.tuned.to_dict()
        return d


@dataclass(frozen=True, kw_only=True)
class Provenance:
    file: str
    shape: MoeShape
    layouts: tuple[str, ...]
    gpu_key: str
    run: RunInfo
    search: dict  # strategy, routing, seed, scope, max_evals
    started: str
    finished: str
    tuning_seconds: float
    rows: tuple[BatchRow, ...]
    target: Target | None = None
    tool_version: str = ""
    extra: dict = field(default_factory=dict)  # keys of newer tools, kept as read

    def to_json(self) -> dict:
        s, r = self.shape, self.run
        return {
            "tool": TOOL, "tool_version": self.tool_version, "file": self.file,
            "shape": {"num_experts": s.num_experts, "global_experts": s.global_experts, "n": s.n, "k": s.k,
                      "top_k": s.top_k, "dtype": s.dtype, "block_shape": list(s.block_shape) if s.block_shape else None},
            "layouts": list(self.layouts),
            "gpu": {"key": self.gpu_key, "name": r.gpu_name, "device_name": r.device_name, "driver": r.driver,
                    "count": r.count},
            "software": {"cuda": r.cuda, "torch": r.torch, "triton": r.triton, "vllm": r.vllm, "kernel": r.kernel,
                         "kernel_sha256": r.kernel_sha256, "python": r.python},
            "target": asdict(self.target) if self.target else None,
            "search": dict(self.search), "started": self.started, "finished": self.finished,
            "tuning_seconds": self.tuning_seconds,
            "results": {str(row.m): row.to_json() for row in sorted(self.rows, key=lambda row: row.m)},
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: object, where: Path | str) -> Provenance:
        return _Reader(where).provenance(data)

    @property
    def span(self) -> str:
        """When its results were tuned, as far as it was recorded: with a result from an older store, which kept no
        time per result, only when the last recorded one ended."""
        if self.started and self.finished:
            return f"{self.started} to {self.finished}"
        return f"up to {self.finished}" if self.finished else ""

    @property
    def empty_launches(self) -> tuple[int, ...]:
        """Batch sizes of an expert-parallel file whose config was picked on a launch with no slot on this GPU
        (``roofline_us`` 0: a routing draw that sent every token elsewhere, as a free draw at M = 1 on a
        36-of-288 shard does one time in three). Such a config was picked on noise; the tuner has drawn a
        typical rank since (``inputs.route``)."""
        if not self.shape.expert_parallel:
            return ()
        return tuple(sorted(row.m for row in self.rows if row.roofline_us == 0))

    def empty_launch_note(self) -> str | None:
        """One line naming those batch sizes and the tune that replaces them, or None."""
        ms = self.empty_launches
        if not ms:
            return None
        sizes = ",".join(map(str, ms))
        return (f"M={sizes} tuned on a launch with no slot on this GPU (an old routing draw; its config was picked "
                f"on noise): re-tune with tune-moe --gpu {self.gpu_key} --dtype {self.shape.dtype} --layouts "
                f"{self.layouts[-1]} --batch-sizes {sizes} --vllm-version {self.run.vllm}")


def _finite(value: object) -> bool:
    try:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
    except OverflowError:
        return False


def _short(value: object) -> str:
    """A value read from a file, as one short piece of a line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Reader:
    """Validation of a sidecar: every problem is one line naming the file and the key."""

    def __init__(self, where: Path | str):
        self.where = where

    def fail(self, what: str) -> UsageError:
        return UsageError(f"{self.where}: {what}; regenerate the sidecar with tune-moe")

    def get(self, data: object, path: str) -> object:
        for i, part in enumerate(parts := path.split(".")):
            if not isinstance(data, dict) or part not in data:
                raise self.fail(f"missing required key '{'.'.join(parts[: i + 1])}'")
            data = data[part]
        return data

    def number(self, data: dict, path: str) -> float:
        value = self.get(data, path)
        if not _finite(value):
            raise self.fail(f"key '{path}' is not a finite number")
        return float(value)

    def count(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail("'gpu.count' is not a whole number of GPUs")
        return value

    def tile(self, data: dict, path: str) -> TileConfig:
        values = [self.get(data, f"{path}.{f}") for f in FIELDS]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise self.fail(f"'{path}' holds a non-integer tile field")
        return TileConfig(*values)

    def row(self, data: dict, m: str) -> BatchRow:
        if not BATCH_KEY.fullmatch(m):
            raise self.fail(f"results key {m!r} is not a batch size")
        raw = data["results"][m]
        numbers = {k: self.number(data, f"results.{m}.{k}") for k in (
            "default_us", "tuned_us", "speedup", "roofline_us", "default_pct_roofline", "tuned_pct_roofline")}
        if min(numbers["speedup"], numbers["default_us"], numbers["tuned_us"]) <= 0:
            raise self.fail(f"results.{m} has a non-positive time or speedup")
        optional = {k: raw.get(k) for k in ("tuned_p20_us", "tuned_p80_us", "evaluated", "failed", "unit")}
        return BatchRow(m=int(m), **numbers, **optional, bound=str(raw.get("bound", "")),
                        default=self.tile(data, f"results.{m}.default"), tuned=self.tile(data, f"results.{m}.tuned"))

    def shape(self, data: dict) -> MoeShape:
        keys = ("num_experts", "global_experts", "n", "k", "top_k", "dtype", "block_shape")
        d = {k: self.get(data, f"shape.{k}") for k in keys}
        try:
            block = d["block_shape"]
            return MoeShape(int(d["num_experts"]), int(d["global_experts"]), int(d["n"]), int(d["k"]),
                            int(d["top_k"]), str(d["dtype"]), tuple(int(b) for b in block) if block else None)
        except (TypeError, ValueError, OverflowError):
            raise self.fail("'shape' holds a non-integer field") from None

    def layouts(self, data: dict) -> tuple[str, ...]:
        """The layouts the file was tuned for: every run records at least one (a re-tune command names the last)."""
        value = self.get(data, "layouts")
        if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
            raise self.fail(f"key 'layouts' {_short(value)} is not a list of the layouts it was tuned for "
                            '(e.g. ["TP4"])')
        for x in value:
            try:
                parse_layout(x)
            except UsageError:
                raise self.fail(f"key 'layouts' holds {_short(x)}, which is not a layout (TP4, DP4+EP, ...)") from None
        return tuple(value)

    def vllm(self, data: dict) -> str:
        value = self.get(data, "software.vllm")
        if not isinstance(value, str) or not VLLM_VERSION.match(value):
            raise self.fail(f"key 'software.vllm' {_short(value)} is not a vLLM version (MAJOR.MINOR[.PATCH])")
        return value

    def records(self, data: dict, key: str, many: str, one: str, required: tuple[str, ...]):
        """(where, record) of an optional list of records under ``key``, each an object holding ``required``."""
        value = data.get(key, [])
        if not isinstance(value, list):
            raise self.fail(f"key '{key}' {_short(value)} is not a list of {many}")
        for i, entry in enumerate(value):
            at = f"{key}.{i}"
            if not isinstance(entry, dict):
                raise self.fail(f"key '{at}' {_short(entry)} is not {one} (an object)")
            missing = [k for k in required if k not in entry]
            if missing:
                raise self.fail(f"missing required key '{at}.{missing[0]}'")
            text = next((k for k in ("config", "replaces", "on") if k in required and not isinstance(entry[k], str)),
                        None)
            if text:
                raise self.fail(f"key '{at}.{text}' {_short(entry[text])} is not text")
            yield at, entry

    def confirmed(self, data: dict) -> None:
        """``verify --keep-confirmed``'s record of the entries it took (optional): each with its batch size, the
        configs it replaced and took, the board and the old and new times."""
        for at, entry in self.records(data, "confirmed", "confirmed entries", "a confirmed entry",
                                      ("m", "config", "replaces", "on", "old_us", "new_us")):
            m = entry["m"]
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise self.fail(f"key '{at}.m' {_short(m)} is not a batch size")
            number = next((k for k in ("old_us", "new_us") if not _finite(entry[k])), None)
            if number:
                raise self.fail(f"key '{at}.{number}' is not a finite number")
            also = entry.get("also_confirmed_on", {})
            if not isinstance(also, dict):
                raise self.fail(f"key '{at}.also_confirmed_on' is not an object of boards and their old/new")
            for board, ratio in also.items():
                if not _finite(ratio):
                    raise self.fail(f"key '{at}.also_confirmed_on' holds {_short(board)}, whose old/new is not a "
                                    "finite number")

    def defaulted(self, data: dict) -> None:
        """The entries set back to vLLM's default because the boards that re-timed them found them no faster
        (optional; benchmarks/default_ties.py): each with its batch size, the default it holds now, the entry it
        replaces, and that entry's readings over vLLM's default (how many, on how many boards, their geomean)."""
        for at, entry in self.records(data, "defaulted", "entries set back to vLLM's default",
                                      "an entry set back to vLLM's default",
                                      ("m", "config", "replaces", "readings", "boards", "speedup")):
            count = next((k for k in ("m", "readings", "boards") if isinstance(entry[k], bool)
                          or not isinstance(entry[k], int) or entry[k] < 1), None)
            if count:
                raise self.fail(f"key '{at}.{count}' {_short(entry[count])} is not a positive count")
            if not _finite(entry["speedup"]):
                raise self.fail(f"key '{at}.speedup' is not a finite number")

    def target(self, data: object) -> Target | None:
        if data is None:
            return None
        try:
            return Target(**data)
        except TypeError:
            raise self.fail("'target' is not a vLLM/torch/Triton target record") from None

    def provenance(self, data: object) -> Provenance:
        if not isinstance(data, dict) or data.get("tool") != TOOL:
            raise self.fail(f"not a {TOOL} sidecar")
        for key in ("file", "layouts", "tuning_seconds", "results", "gpu.name", "gpu.device_name", "gpu.driver",
                    "gpu.count", "software.cuda", "software.torch", "software.triton", "software.vllm",
                    "search.strategy", "search.routing"):
            self.get(data, key)
        if not isinstance(data["results"], dict) or not data["results"]:
            raise self.fail("it holds no results")
        layouts, vllm = self.layouts(data), self.vllm(data)
        self.confirmed(data)
        self.defaulted(data)
        shape, gpu, sw = self.shape(data), data["gpu"], data["software"]
        if data["file"] != shape.file_name(str(gpu["device_name"])):
            raise self.fail(f"its 'file' {data['file']!r} does not match its shape and device")
        run = RunInfo(gpu_name=str(gpu["name"]), device_name=gpu["device_name"], driver=str(gpu["driver"]),
                      count=self.count(gpu["count"]), cuda=str(sw["cuda"]), torch=str(sw["torch"]),
                      triton=str(sw["triton"]), python=str(sw.get("python", "")), vllm=vllm,
                      kernel=str(sw.get("kernel", "")), kernel_sha256=str(sw.get("kernel_sha256", "")))
        target = data.get("target")
        known = {"tool", "tool_version", "file", "shape", "layouts", "gpu", "software", "target", "search", "started",
                 "finished", "tuning_seconds", "results"}
        return Provenance(
            file=data["file"], shape=shape, gpu_key=str(gpu.get("key", "")), run=run,
            layouts=layouts,
            search=dict(data["search"]), started=str(data.get("started", "")), finished=str(data.get("finished", "")),
            tuning_seconds=self.number(data, "tuning_seconds"),
            rows=tuple(sorted((self.row(data, m) for m in data["results"]), key=lambda r: r.m)),
            target=self.target(target),
            tool_version=str(data.get("tool_version", "")),
            extra={k: v for k, v in data.items() if k not in known})


def check_file(path: Path, fix: str) -> None:
    """One line, ending with ``fix``, when ``path`` (present, if only as a link) is not a file that can be read:
    a folder, a link to nothing (or to itself), a device or pipe."""
    if path.is_file():
        return
    if path.is_symlink() and not path.exists():
        raise UsageError(f"{path}: a link to {os.readlink(path)}, which does not exist or loops; {fix}")
    raise UsageError(f"{path}: {'a folder' if path.is_dir() else 'a device or pipe'}, not a file; {fix}")


def read(config_path: Path | str) -> Provenance | None:
    """The sidecar of ``config_path``; None when there is none; one-line error when it is corrupt."""
    path = sidecar_path(config_path)
    if not os.path.lexists(path):
        return None
    check_file(path, "remove it or put the sidecar tune-moe wrote there")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable or corrupt JSON ({exc}); regenerate it with tune-moe or delete it "
                         "with its config") from None
    return Provenance.from_json(data, path)


def write(config_path: Path | str, provenance: Provenance) -> None:
    atomic_write_json(sidecar_path(config_path), provenance.to_json())
