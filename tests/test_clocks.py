"""The GPU's state beside a timing (tuning.clocks): NVML's clock-event bits named as nvidia-smi names them, which
of them hold the clock down, the one-line form verify prints, and a sample on this host."""

import pytest

from tuning import clocks


def test_clock_event_bits_are_named_and_the_limiting_ones_known():
    # the masks the H200's nvidia-smi reported beside the verify runs of benchmarks/README §2m
    assert clocks.reason_names(0x0) == ()
    assert clocks.reason_names(0x1) == ("idle",)
    assert clocks.reason_names(0x4) == ("sw-power-cap",)
    assert clocks.reason_names(0x1 | 0x4 | 0x40) == ("idle", "sw-power-cap", "hw-thermal")
    capped = clocks.GpuState(1470, 682.4, 700.0, clocks.reason_names(0x4))
    assert capped.limited and capped.short() == "SM 1470 MHz, 682/700 W, sw-power-cap"
    idle = clocks.GpuState(345, 76.4, 700.0, clocks.reason_names(0x1))
    assert not idle.limited and idle.short() == "SM 345 MHz, 76/700 W, idle"
    assert clocks.GpuState(1980, 150.5, 700.0, ()).short() == "SM 1980 MHz, 150/700 W, no limit"
    assert capped.to_json() == {"sm_mhz": 1470, "power_w": 682.4, "limit_w": 700.0, "reasons": ["sw-power-cap"]}


def test_a_sample_is_the_gpus_state_or_none_without_a_driver():
    """Where NVML answers (a GPU host), the SM clock and the power limit are real numbers; on a host without a
    driver (CI) there is no state, and no exception reaches the timing."""
    import torch

    state = clocks.sample()
    if not torch.cuda.is_available():
        assert state is None
        return
    assert state is not None and 100 <= state.sm_mhz <= 4000 and 0 < state.power_w and 100 <= state.limit_w <= 2000
    assert set(state.reasons) <= set(clocks.REASONS.values())


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs an NVIDIA GPU")
def test_sustained_timing_moves_the_state():
    """Two seconds of a large matmul on the GPU: afterwards the GPU is not idle and draws more than at rest."""
    import time

    import torch

    rest = clocks.sample()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
    busy = clocks.sample()
    assert "idle" not in busy.reasons and busy.power_w > rest.power_w
