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
    assert capped.to_json() == {"sm_mhz": 1470, "power_w": 682.4, "limit_w": 700.0, "reasons": ["sw-power-cap"],
                                "mem_mhz": 0, "unit": ""}
    board = clocks.GpuState(1980, 150.5, 700.0, (), 3201, "GPU-0f3e")
    assert clocks.GpuState.from_json(board.to_json()) == board
    old = {"sm_mhz": 1980, "power_w": 150.5, "limit_w": 700.0, "reasons": []}  # a result from before mem and unit
    assert clocks.GpuState.from_json(old) == clocks.GpuState(1980, 150.5, 700.0, ())


def test_a_sample_is_the_gpus_state_or_none_without_a_driver():
    """Where NVML answers (a GPU host), the SM and memory clocks and the power limit are real numbers and the
    board is named by its UUID; on a host without a driver (CI) there is no state, and no exception reaches the
    timing."""
    import torch

    state = clocks.sample()
    if not torch.cuda.is_available():
        assert state is None
        return
    assert state is not None and 100 <= state.sm_mhz <= 4000 and 0 < state.power_w and 100 <= state.limit_w <= 2000
    assert set(state.reasons) <= set(clocks.REASONS.values())
    assert 100 <= state.mem_mhz <= 20000 and state.unit.startswith("GPU-")


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


def test_a_tune_says_how_many_jobs_ended_with_the_clock_held_down():
    """The tune's summary ends with the count of jobs whose last timing ran with the clock held down (from each
    result's gpu_state); no such line where none did, or where no state was recorded (a CPU host, old results)."""
    from dataclasses import replace

    from tuning.configs import TileConfig
    from tuning.gpus import get_gpu
    from tuning.jobs import JobResult
    from tuning.models import DEFAULT_MODEL, load_model
    from tuning.outputs import summary
    from tuning.plan import make_plan
    from tuning.shapes import parse_layout

    capped = clocks.GpuState(1470, 682.4, 700.0, ("sw-power-cap",)).to_json()
    assert clocks.GpuState.from_json(capped).limited and clocks.GpuState.from_json({}) is None
    plan = make_plan(load_model(DEFAULT_MODEL), get_gpu("H200"), "bf16", [parse_layout("DP8+EP")], 8,
                     (1, 2048, 4096), vllm_version="0.33.0")
    (shape,) = plan.shapes
    c = TileConfig(64, 128, 64, 1, 4, 3)
    r = JobResult(file=plan.file_name(shape), m=4096, default=c, default_us=700.0, tuned=c, tuned_us=700.0,
                  tuned_p20_us=699.0, tuned_p80_us=701.0, roofline_us=500.0, bound="memory", error=0.0, evaluated=40,
                  failed=0, seconds=3.0, worker="w")
    free = {"sm_mhz": 1980, "power_w": 150.0, "limit_w": 700.0, "reasons": []}
    results = {(r.file, 1): replace(r, m=1, gpu_state=free), (r.file, 4096): replace(r, gpu_state=capped),
               (r.file, 2048): replace(r, m=2048)}
    lines = summary(plan, results).splitlines()
    assert len(lines) == 6 and lines[-1] == (  # the header, three rows, the geomean, the note
        "1 of 3 jobs ended with the GPU's clock held down by its power or heat: there a speedup moves by 1-3% "
        "from run to run (benchmarks/README §2m)")
    assert clocks.held_down_note(0, 3, "jobs ended") is None
    del results[(r.file, 4096)]
    assert "held down" not in summary(plan, results)
