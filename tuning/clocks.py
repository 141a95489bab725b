"""The GPU's clock and power while it times, read through NVML (pynvml).

Large batches run vLLM's fused MoE kernel into the H200's power limit: within a few seconds of sustained
timing the board reaches its 700 W cap, NVML reports the sw-power-cap clock-event reason, and the SM clock falls
from 1980 MHz to 1260-1620 MHz. There a speedup moves by 1-3% from one run to the next, warm GPU or cold
(benchmarks/README §2m), so a timing carries the state it ran under: ``verify`` prints it beside each batch size,
and each job's result records it after the job's last timing (``JobResult.gpu_state``), with the memory clock
and the GPU's NVML UUID: two H200s can differ by 2-7% on the same config at small batches while agreeing on
others (benchmarks/README §2o), so results from different sessions are compared unit by unit.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

# nvml.h's nvmlClocksEventReason* bits (nvidia-smi's clocks_event_reasons)
REASONS = {0x1: "idle", 0x2: "app-clocks", 0x4: "sw-power-cap", 0x8: "hw-slowdown", 0x10: "sync-boost",
           0x20: "sw-thermal", 0x40: "hw-thermal", 0x80: "hw-power-brake", 0x100: "display-clocks"}
LIMITING = frozenset({"sw-power-cap", "hw-slowdown", "sw-thermal", "hw-thermal", "hw-power-brake"})


def reason_names(mask: int) -> tuple[str, ...]:
    return tuple(name for bit, name in REASONS.items() if mask & bit)


def held_down_note(limited: int, timed: int, what: str) -> str | None:
    """The line under a verify or a tune whose timings ran with the clock held down (None when none did)."""
    if not limited:
        return None
    return (f"{limited} of {timed} {what} with the GPU's clock held down by its power or heat: there a speedup "
            "moves by 1-3% from run to run (benchmarks/README §2m)")


@dataclass(frozen=True)
class GpuState:
    sm_mhz: int
    power_w: float
    limit_w: float
    reasons: tuple[str, ...]
    mem_mhz: int = 0  # 0: not recorded (results from before it was)
    unit: str = ""  # NVML's UUID of the GPU: which board timed it

    @property
    def limited(self) -> bool:
        """Whether power or heat held the clock down."""
        return bool(LIMITING & set(self.reasons))

    @classmethod
    def from_json(cls, d: dict) -> GpuState | None:
        return cls(d["sm_mhz"], d["power_w"], d["limit_w"], tuple(d["reasons"]), d.get("mem_mhz", 0),
                   d.get("unit", "")) if d else None

    def short(self) -> str:
        return f"SM {self.sm_mhz} MHz, {self.power_w:.0f}/{self.limit_w:.0f} W, {'+'.join(self.reasons) or 'no limit'}"

    def to_json(self) -> dict:
        return {**asdict(self), "reasons": list(self.reasons)}


_handle = None
_unit: str | None = None  # the board's UUID, read once


def sample() -> GpuState | None:
    """The state of the GPU this process times on (the first of CUDA_VISIBLE_DEVICES), or None without NVML."""
    global _handle, _unit
    try:
        import pynvml

        if _handle is None:
            pynvml.nvmlInit()
            first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
            _handle = (pynvml.nvmlDeviceGetHandleByIndex(int(first)) if first.isascii() and first.isdigit()
                       else pynvml.nvmlDeviceGetHandleByUUID(first))
            _unit = _optional(lambda: _text(pynvml.nvmlDeviceGetUUID(_handle)), "")
        events = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return GpuState(sm_mhz=int(pynvml.nvmlDeviceGetClockInfo(_handle, pynvml.NVML_CLOCK_SM)),
                        power_w=pynvml.nvmlDeviceGetPowerUsage(_handle) / 1000,
                        limit_w=pynvml.nvmlDeviceGetEnforcedPowerLimit(_handle) / 1000,
                        reasons=reason_names(int(events(_handle))),
                        mem_mhz=_optional(lambda: int(pynvml.nvmlDeviceGetClockInfo(_handle, pynvml.NVML_CLOCK_MEM)), 0),
                        unit=_unit or "")
    except Exception:  # no pynvml, no driver, or a GPU that does not report: the timing stands without it
        return None


def _optional(read, missing):
    """A reading the state can do without: a board that does not answer it loses that field, not the state."""
    try:
        return read()
    except Exception:
        return missing


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older pynvml answers bytes
