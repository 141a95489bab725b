"""The report's plots, drawn with matplotlib's Agg canvas and returned as PNG bytes.

``shape_png`` draws one shape's time and speedup against M (vLLM's default, tuned and
the roofline) from its provenance rows; ``summary_png`` draws geomean speedups as bars. Figures
are made on their own Agg canvas (no pyplot, no global state, no display) and saved
without the Software metadata, so the same data gives the same bytes; ``report`` writes
them to disk. matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import io
from typing import Sequence

from .provenance import BatchRow


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def shape_png(title: str, rows: Sequence[BatchRow]) -> bytes:
    fig = _figure(11, 4.2)
    times, speed = fig.subplots(1, 2)
    ms = [b.m for b in rows]
    times.loglog(ms, [b.default_us for b in rows], "o-", label="vLLM default")
    times.loglog(ms, [b.tuned_us for b in rows], "s-", label="tuned")
    times.loglog(ms, [b.roofline_us for b in rows], "--", color="gray", label="roofline")
    times.set(xlabel="M (tokens)", ylabel="µs per MoE layer call", title="time vs M")
    speed.semilogx(ms, [b.speedup for b in rows], "o-", color="tab:green")
    speed.axhline(1.0, color="gray", linestyle="--")
    speed.set(xlabel="M (tokens)", ylabel="speedup (default / tuned)", title="speedup vs M")
    for ax in (times, speed):
        ax.grid(True, which="both", alpha=0.3)
    times.legend()
    fig.suptitle(title)
    return _png(fig)


def summary_png(labels: Sequence[str], geomeans: Sequence[float]) -> bytes:
    fig = _figure(8, 1.2 + 0.45 * len(labels))
    ax = fig.subplots()
    ax.barh(range(len(labels)), list(geomeans), color="tab:blue")
    ax.set_yticks(range(len(labels)), list(labels))
    ax.invert_yaxis()
    ax.axvline(1.0, color="gray", linestyle="--")
    ax.set(xlabel="geomean speedup over vLLM's default", title="Tuned vs default, per shape")
    return _png(fig)

