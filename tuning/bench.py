"""The one timing function.

On a GPU: the launches are captured once in a CUDA graph; the graph is replayed for
warm-up, then for as many samples as the time budget allows, each bracketed by CUDA
events, with L2 flushed before each sample when the data touched is small enough to
stay cached (``flush_l2``). Raw samples are kept; the median is reported with p20/p80.
Without a GPU (Triton's interpreter) the same loop runs on the wall clock, no graph.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    samples_us: tuple[float, ...]

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)

    def quantile_us(self, q: float) -> float:
        s = sorted(self.samples_us)
        return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]

    @property
    def p20_us(self) -> float:
        return self.quantile_us(0.2)

    @property
    def p80_us(self) -> float:
        return self.quantile_us(0.8)


_flush_buffer: torch.Tensor | None = None


def _flush(nbytes: int) -> None:
    global _flush_buffer
    if _flush_buffer is None or _flush_buffer.numel() < nbytes // 4:
        _flush_buffer = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda")
    _flush_buffer.zero_()


def measure(fn: Callable[[], None], budget_ms: float = 50.0, warmup_ms: float = 5.0, min_samples: int = 5,
            max_samples: int = 2000, flush_l2_bytes: int = 0) -> Timing:
    """Median-able samples of ``fn`` (already compiled: call it once before measuring)."""
    if not torch.cuda.is_available():
        return _measure_wallclock(fn, budget_ms, min_samples)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn()  # settle lazy initialisation outside the capture
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    one = _replay_ms(graph, 3)
    for _ in range(max(1, int(warmup_ms / max(one, 1e-3)))):
        graph.replay()
    n = max(min_samples, min(max_samples, int(budget_ms / max(one, 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        if flush_l2_bytes:
            _flush(flush_l2_bytes)
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del graph
    return Timing(tuple(s.elapsed_time(e) * 1e3 for s, e in events))


def _replay_ms(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _measure_wallclock(fn, budget_ms: float, min_samples: int) -> Timing:
    min_samples = min(min_samples, 2)  # the interpreter is slow; these timings only exercise the pipeline
    samples = []
    deadline = time.perf_counter() + budget_ms / 1e3
    while len(samples) < min_samples or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
        if len(samples) >= min_samples and time.perf_counter() >= deadline:
            break
    return Timing(tuple(samples))
