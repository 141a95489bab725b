"""vLLM's tuned-config file contract: name, schema, atomic write, read, merge, provenance.

A file maps batch sizes (string keys) to six integer fields, plus ``triton_version``.
vLLM's loader pops ``triton_version`` and ``int()``s every other key, so anything
else (provenance included) lives in a sidecar ``<name>.provenance.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UsageError
from .files import atomic_write_json

FIELDS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
PROVENANCE_SUFFIX = ".provenance.json"
TOOL = "tune-moe"


@dataclass(frozen=True, order=True)
class TileConfig:
    BLOCK_SIZE_M: int
    BLOCK_SIZE_N: int
    BLOCK_SIZE_K: int
    GROUP_SIZE_M: int
    num_warps: int
    num_stages: int

    @classmethod
    def from_dict(cls, d: dict) -> "TileConfig":
        return cls(**{f: int(d[f]) for f in FIELDS})

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_short(cls, short: str) -> "TileConfig":
        """Inverse of ``short``: 'M16-N64-K128-G1-w4-s3'."""
        v = {p[0]: int(p[1:]) for p in short.split("-")}
        return cls(v["M"], v["N"], v["K"], v["G"], v["w"], v["s"])

    @property
    def short(self) -> str:
        return (f"M{self.BLOCK_SIZE_M}-N{self.BLOCK_SIZE_N}-K{self.BLOCK_SIZE_K}-G{self.GROUP_SIZE_M}"
                f"-w{self.num_warps}-s{self.num_stages}")


def to_vllm_json(configs: dict[int, TileConfig], triton_version: str) -> dict:
    data: dict = {str(m): configs[m].to_dict() for m in sorted(configs)}
    data["triton_version"] = triton_version
    return data


def write_config_file(path: Path, configs: dict[int, TileConfig], triton_version: str) -> None:
    if not configs:
        raise ValueError(f"refusing to write {path}: no batch sizes")
    atomic_write_json(path, to_vllm_json(configs, triton_version))


def parse_config_json(data: object, where: str) -> dict[int, TileConfig]:
    """Validate a vLLM tuned-config object; the errors say what vLLM would choke on."""
    if not isinstance(data, dict):
        raise UsageError(f"{where}: not a vLLM MoE config (a JSON object of batch sizes); move it away or fix it")
    out = {}
    for key, value in data.items():
        if key == "triton_version":
            continue
        if not key.isdigit():
            raise UsageError(f"{where}: key {key!r} is not a batch size, and vLLM's loader would fail on it; remove it")
        if not isinstance(value, dict) or set(value) != set(FIELDS) or not all(type(v) is int for v in value.values()):
            raise UsageError(f"{where}: batch {key} must hold exactly the integer fields {', '.join(FIELDS)}; fix or remove it")
        out[int(key)] = TileConfig.from_dict(value)
    if not out:
        raise UsageError(f"{where}: holds no batch sizes; remove the file")
    return out


def read_config_file(path: Path) -> dict[int, TileConfig]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable or corrupt JSON ({exc}); move it away or delete it") from None
    return parse_config_json(data, str(path))


def merge(old: dict[int, TileConfig], new: dict[int, TileConfig]) -> dict[int, TileConfig]:
    """New entries win; batch sizes only in ``old`` are kept."""
    return {**old, **new}


def provenance_path(config_path: Path) -> Path:
    config_path = Path(config_path)
    return config_path.with_name(config_path.name.removesuffix(".json") + PROVENANCE_SUFFIX)


def write_provenance(config_path: Path, provenance: dict) -> None:
    atomic_write_json(provenance_path(config_path), {"tool": TOOL, **provenance})


def read_provenance(config_path: Path) -> dict | None:
    path = provenance_path(config_path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: corrupt provenance ({exc}); delete it and its config, or restore them") from None
    return data if isinstance(data, dict) and data.get("tool") == TOOL else None


def check_writable(config_path: Path, overwrite: bool = False) -> dict[int, TileConfig]:
    """Existing entries we may merge into, or a refusal for corrupt and foreign files."""
    config_path = Path(config_path)
    if not config_path.exists():
        return {}
    existing = read_config_file(config_path)
    if read_provenance(config_path) is None and not overwrite:
        raise UsageError(
            f"{config_path} exists and was not written by {TOOL} (no {provenance_path(config_path).name}); "
            "move it away, choose another --out, or pass --overwrite"
        )
    return existing
