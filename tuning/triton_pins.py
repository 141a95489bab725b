"""The Triton a vLLM release runs (vLLM pins torch, torch pins Triton), and the one this process compiles with."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

KNOWN = {"0.33": ("0.33.0", "2.14.0", "3.8.0")}


@dataclass(frozen=True, kw_only=True)
class Pin:
    vllm: str
    torch: str | None
    triton: str | None
    how: str


def target_triton(vllm_version: str, source: str | None = None) -> Pin | None:
    key = ".".join(vllm_version.split(".")[:2])
    if key not in KNOWN:
        return None
    v, t, tr = KNOWN[key]
    return Pin(vllm=v, torch=t, triton=tr, how="known table")


def compiling_triton() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def mismatch(pin: Pin, compiling: str) -> str | None:
    if pin.triton is None or pin.triton == compiling:
        return None
    return f"vLLM {pin.vllm} runs Triton {pin.triton} (torch {pin.torch} pins it) but this node compiles with Triton {compiling}"
