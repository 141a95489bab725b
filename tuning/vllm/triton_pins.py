"""Which Triton (and FlashInfer) a vLLM release runs, and whether this node compiles with the same Triton.

A config tuned for a vLLM release must be compiled with the Triton that release runs: vLLM pins
torch exactly and torch pins Triton. ``target_triton`` finds that chain for a vLLM version,
``compiling_triton`` says which Triton this process would compile with, and ``mismatch`` puts
the two side by side in one line. Nothing here imports torch, vLLM or Triton, and nothing
touches the network: pins come from a wheel's METADATA, from installed package metadata, or
from the table below.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

try:
    from packaging.markers import default_environment
    from packaging.requirements import InvalidRequirement, Requirement
except ImportError:  # the regex below reads the simple requirement lines vLLM and torch write
    Requirement = None


@dataclass(frozen=True, kw_only=True)
class Pin:
    vllm: str
    torch: str
    triton: str
    how: str  # where the pins were read, e.g. "installed vLLM's requirements" or "known table"


# Built 2026-11-30 from PyPI: the Requires-Dist lines (what the JSON API at
# /pypi/<name>/<version>/json lists as requires_dist) of each release's manylinux x86_64
# wheel METADATA. vLLM: the x.y.0 release of every minor 0.16 to 0.34 (all exist), its
# "torch==X" line. torch: the cp311 manylinux_2_28_x86_64 wheel, its triton line whose
# marker holds on Linux x86_64. torch 2.14.0 writes "triton~=3.8.0", and 3.8.0 is the only
# 3.8.x on PyPI; every other torch here writes "triton==X". Checked again for the validation serve's vLLM:
# vllm 0.26.0's wheel writes "torch==2.11.0", and torch 2.11.0's 'triton==3.6.0; platform_system == "Linux"'.
VLLM_TORCH = {
    "0.16.0": "2.9.1",
    "0.17.0": "2.10.0",
    "0.18.0": "2.10.0",
    "0.19.0": "2.10.0",
    "0.20.0": "2.11.0",
    "0.21.0": "2.11.0",
    "0.22.0": "2.11.0",
    "0.23.0": "2.11.0",
    "0.24.0": "2.11.0",
    "0.25.0": "2.11.0",
    "0.26.0": "2.11.0",
    "0.27.0": "2.13.0",
    "0.28.0": "2.13.0",
    "0.29.0": "2.13.0",
    "0.30.0": "2.13.0",
    "0.31.0": "2.13.0",
    "0.32.0": "2.13.0",
    "0.33.0": "2.14.0",
    "0.34.0": "2.14.0",
}
TORCH_TRITON = {
    "2.9.1": "3.5.1",
    "2.10.0": "3.6.0",
    "2.11.0": "3.6.0",
    "2.13.0": "3.7.1",
    "2.14.0": "3.8.0",
}
KNOWN = {
    vllm: Pin(vllm=vllm, torch=torch, triton=TORCH_TRITON[torch], how="known table")
    for vllm, torch in VLLM_TORCH.items()
}

# vLLM release -> its "flashinfer-python==X" Requires-Dist line (the same wheels' METADATA): the FlashInfer whose
# fused MoE a serve runs, which a bake-off names when it timed another (backend_advice.flashinfer_note).
FLASHINFER_PINS = {
    "0.33.0": "0.7.2.post1",
    "0.34.0": "0.7.3",
}


def flashinfer_pin(vllm_version: str) -> str | None:
    """The FlashInfer vLLM ``vllm_version`` pins (by MAJOR.MINOR), None when the table does not know the release."""
    return _by_release(FLASHINFER_PINS, vllm_version)


def _by_release(table: dict, vllm_version: str):
    """A table's value for the release ``vllm_version`` belongs to (its MAJOR.MINOR), None when it has none."""
    return next((v for known, v in table.items() if _release(known)[:2] == _release(vllm_version)[:2]), None)


# The platform the tuned kernels run on; the marker of the requirement we pick must hold there.
PLATFORM = {"platform_system": "Linux", "platform_machine": "x86_64", "sys_platform": "linux"}

# name [extras] (op version) ; marker -- only the one-specifier pins this module wants
_REQ = re.compile(
    r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?\s*(===|==|~=)\s*([^\s,;)]+)\s*\)?\s*(?:;(.*))?$"
)
_MARKER_TERM = re.compile(r"""(platform_system|platform_machine|sys_platform|extra)\s*(==|!=)\s*["']([^"']*)["']""")


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version: "0.33.0rc1" -> (0, 33, 0), "2.14.0+cu130" -> (2, 14, 0)."""
    m = re.match(r"\d+(?:\.\d+)*", version.strip().lstrip("vV"))
    return tuple(int(p) for p in m.group().split(".")) if m else ()


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pinned_version(requirements: list[str] | None, name: str) -> str | None:
    """The version ``name`` is pinned to (==, === or ~=) by the first requirement whose marker holds on Linux x86_64."""
    for line in requirements or []:
        pinned = _parse_with_packaging(line, name) if Requirement is not None else _parse_with_regex(line, name)
        if pinned:
            return pinned
    return None


def _parse_with_packaging(line: str, name: str) -> str | None:
    try:
        req = Requirement(line)
    except InvalidRequirement:
        return None
    if _name(req.name) != _name(name):
        return None
    if req.marker is not None and not req.marker.evaluate({**default_environment(), "extra": "", **PLATFORM}):
        return None
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator in ("==", "===", "~=") and "*" not in specs[0].version:
        return specs[0].version
    return None


def _parse_with_regex(line: str, name: str) -> str | None:
    m = _REQ.match(line)
    if not m or _name(m.group(1)) != _name(name) or "*" in m.group(3):
        return None
    for key, op, value in _MARKER_TERM.findall(m.group(4) or ""):  # markers read as "and" of these terms
        wanted = PLATFORM.get(key, "")  # extra: no extra is asked for
        if (value == wanted) != (op == "=="):
            return None
    return m.group(3)


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_triton(torch: str) -> tuple[str | None, str]:
    """The Triton ``torch`` pins, and where that was read: the installed torch when it is that version, else the table."""
    installed = _installed_version("torch")
    if installed and _public(installed) == _public(torch):
        triton = _pinned_version(importlib.metadata.requires("torch"), "triton")
        if triton:  # a CPU build of torch names no Triton: the table still knows the CUDA build's
            return triton, "installed torch's requirements"
    return TORCH_TRITON.get(_public(torch)), "the known table"


def _wheel_metadata(wheel: Path) -> tuple[str, list[str]]:
    """(Version, Requires-Dist lines) of a wheel's top-level *.dist-info/METADATA."""
    fix = "pass the path of a vLLM .whl file"
    if not wheel.is_file():
        raise UsageError(f"vLLM wheel {wheel}: no such file; {fix}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            if not names:
                raise UsageError(f"vLLM wheel {wheel}: has no *.dist-info/METADATA; {fix}")
            text = zf.read(names[0]).decode("utf-8", errors="replace")
    except zipfile.BadZipFile:
        raise UsageError(f"vLLM wheel {wheel}: not a zip file; {fix}") from None
    headers = text.split("\n\n", 1)[0].splitlines()  # the body (long description) is not read
    values = {"Version": [], "Requires-Dist": []}
    for line in headers:
        key, _, value = line.partition(":")
        if key in values:
            values[key].append(value.strip())
    return (values["Version"] or [""])[0], values["Requires-Dist"]


def _same_release(wanted: str, have: str) -> bool:
    """"0.33" matches any 0.33.x; "0.33.0" matches 0.33.0 (and 0.33.0+local); "0.33.0rc1" only itself."""
    want = _release(wanted)
    if _release(have)[: len(want)] != want:
        return False
    return _public(wanted) == _public(have) if re.search(r"[A-Za-z]", _public(wanted)) else True


def _chain(vllm: str, torch: str, how: str) -> Pin | None:
    triton, triton_how = _torch_triton(torch)
    if triton is None:
        return None
    if triton_how != "installed torch's requirements" or how != "installed vLLM's requirements":
        how = f"{how}; Triton from {triton_how}"
    return Pin(vllm=vllm, torch=torch, triton=triton, how=how)


def target_triton(vllm_version: str, source: str | None = None) -> Pin | None:
    """The torch and Triton that vLLM ``vllm_version`` runs, or None when nothing here knows.

    Read from, in order: the vLLM wheel ``source``; the installed vLLM when its version matches
    (MAJOR.MINOR, or the full version when one is given); the known table (by MAJOR.MINOR).
    """
    if len(_release(vllm_version)) < 2:
        raise UsageError(f"vLLM version {vllm_version!r} is not MAJOR.MINOR[.PATCH]; pass e.g. 0.33.0")
    if source is not None:
        wheel = Path(source)
        if wheel.suffix != ".whl":
            raise UsageError(f"vLLM source {source}: not a .whl file; pass a vLLM wheel path or leave it out")
        version, requires = _wheel_metadata(wheel)
        if not _same_release(vllm_version, version):
            raise UsageError(
                f"vLLM wheel {wheel} is vLLM {version}, not {vllm_version}; pass the wheel of vLLM {vllm_version}"
            )
        torch = _pinned_version(requires, "torch")
        if torch is None:
            raise UsageError(f"vLLM wheel {wheel}: METADATA pins no torch==X; pass a vLLM release wheel")
        return _chain(version, torch, f"vLLM wheel METADATA {wheel}")
    installed = _installed_version("vllm")
    if installed and _same_release(vllm_version, installed):
        torch = _pinned_version(importlib.metadata.requires("vllm"), "torch")
        if torch:  # a Triton unknown for this torch is unknown: the table's torch may not be this one
            return _chain(installed, torch, "installed vLLM's requirements")
    return _by_release(KNOWN, vllm_version)


def compiling_triton() -> str | None:
    """The version of the Triton this process would compile with, found without importing it.

    An imported triton answers for itself. Otherwise the version is read from the dist-info that
    sits beside the package ``import triton`` would load (sys.path order, so a PYTHONPATH folder
    from ``pip install --target`` wins over site-packages); failing that, from
    ``importlib.metadata.version``, which also takes the first triton dist-info on sys.path.
    """
    module = sys.modules.get("triton")
    if isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        spec = importlib.util.find_spec("triton")  # locates the package; runs none of its code
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        folder = str(Path(list(spec.submodule_search_locations)[0]).parent)
        for dist in importlib.metadata.distributions(name="triton", path=[folder]):
            return dist.version
    return _installed_version("triton")


def mismatch(pin: Pin, compiling: str) -> str | None:
    """One line naming the drift when ``compiling`` is not the pinned Triton's MAJOR.MINOR.PATCH, else None."""
    def patch(version: str) -> tuple[int, ...]:
        return (_release(version) + (0, 0, 0))[:3]

    if patch(pin.triton) == patch(compiling):
        return None
    return (
        f"vLLM {pin.vllm} runs Triton {pin.triton} (torch {pin.torch} pins it) "
        f"but this node compiles with Triton {compiling}"
    )
