"""vLLM's tuned-config file contract: schema, atomic write, read, merge.

A file maps batch sizes (string keys) to six integer fields, plus ``triton_version``.
vLLM's loader pops ``triton_version`` and ``int()``s every other key, so anything
else lives in a sidecar (``provenance``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UsageError
from .files import atomic_write_json
from .shapes import parse_version

CONFIGS_ROOT = Path("kernels_configs")  # the project's configs: kernels_configs/vllm-<major.minor>/<device name>/
RELEASE_PREFIX = "vllm-"
RELEASE = re.compile(r"vllm-\d+\.\d+")
TUNED_VAR = "VLLM_TUNED_CONFIG_FOLDER"  # where vLLM looks for tuned files before its own
FIELDS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


def release_folder(vllm_version: str, root: Path = CONFIGS_ROOT) -> Path:
    """The folder of the files one vLLM release reads (``root/vllm-0.34`` for 0.34.x): a release can launch
    the kernel otherwise than the one before (0.34 reads block-FP8 weights through TMA), and vLLM's file names
    do not say which release a file was tuned for."""
    major, minor = parse_version(vllm_version)
    return root / f"{RELEASE_PREFIX}{major}.{minor}"


def default_folder(device_name: str, vllm_version: str, root: Path = CONFIGS_ROOT) -> Path:
    """``kernels_configs/vllm-<major.minor>/<device_name>``: what vLLM ``vllm_version`` reads on that GPU."""
    return release_folder(vllm_version, root) / device_name


def releases_present(root: Path = CONFIGS_ROOT) -> list[str]:
    """The release folders under ``root`` (``vllm-0.33``, ...), oldest first."""
    found = [d.name for d in root.iterdir() if d.is_dir() and RELEASE.fullmatch(d.name)] if root.is_dir() else []
    return sorted(found, key=lambda name: parse_version(name[len(RELEASE_PREFIX):]))


def tuned_elsewhere(folder: Path) -> str:
    """For a release folder with no files: where the same device's files for other releases are, as advice."""
    root, device = folder.parent.parent, folder.name
    others = [r.removeprefix(RELEASE_PREFIX) for r in releases_present(root)
              if (root / r / device).is_dir() and root / r != folder.parent]
    return f" ({device} is tuned for vLLM {', '.join(others)} here: pass --vllm-version or --configs)" if others else ""


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
        if not (key.isascii() and key.isdigit()):
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
