"""The statistics of an A/B of interleaved pairs: medians with their spread, a bootstrap confidence
interval on the tuned/default ratio, and a verdict that says when a change is inside the noise.

Each pair is one measured benchmark pass of the default arm and one of the tuned arm, on the same GPU, their
order alternating pair by pair: on two resident servers (one per arm, each warmed up once, until steady), or on a fresh
server per pass, warmed up before it (which also samples server-to-server variation). The estimate of a
metric's change is the geometric mean of the per-pair tuned/default ratios (pairing cancels drift between
pairs). Its confidence interval is a percentile bootstrap over the pairs: exact (every resample of the pairs,
weighted by how many orderings give it) up to ``EXACT_UP_TO`` pairs, else ``RESAMPLES`` seeded resamples.
Pure Python: no numpy, no torch.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from dataclasses import asdict, dataclass

LEVEL = 0.95
EXACT_UP_TO = 8  # C(2n-1, n) multisets: 6435 at n = 8
RESAMPLES = 20000
SEED = 0
RESOLVE = 0.05  # the change an A/B should be able to detect
SMALL = 0.01  # a significant change whose whole interval lies within this is named as small


@dataclass(frozen=True)
class Spread:
    """One arm's values of one metric across its runs."""

    median: float
    low: float
    high: float
    n: int


def spread(values: list[float]) -> Spread:
    return Spread(statistics.median(values), min(values), max(values), len(values))


@dataclass(frozen=True)
class Ratio:
    """tuned/default for one metric: the paired estimate and its bootstrap interval."""

    metric: str
    estimate: float  # geometric mean of the per-pair ratios
    low: float
    high: float
    per_pair: tuple[float, ...]
    level: float
    method: str

    @property
    def half_width(self) -> float:
        """Half the interval's width, as a fraction: changes beyond this are resolved."""
        return (self.high - self.low) / 2

    def contains_one(self) -> bool:
        return self.low <= 1.0 <= self.high


def paired_ratio(metric: str, tuned: list[float], default: list[float], *, level: float = LEVEL,
                 seed: int = SEED) -> Ratio:
    """The geometric-mean ratio of tuned to default over pairs, with its percentile bootstrap interval."""
    if len(tuned) != len(default) or not tuned:
        raise ValueError("paired_ratio needs one tuned and one default value per pair")
    if min(tuned + default) <= 0:
        raise ValueError(f"{metric}: values must be positive")
    logs = [math.log(t / d) for t, d in zip(tuned, default)]
    means, weights, method = _bootstrap_means(logs, seed)
    low, high = _percentile(means, weights, (1 - level) / 2), _percentile(means, weights, (1 + level) / 2)
    return Ratio(metric, math.exp(statistics.fmean(logs)), math.exp(low), math.exp(high),
                 tuple(t / d for t, d in zip(tuned, default)), level, method)


def _bootstrap_means(logs: list[float], seed: int) -> tuple[list[float], list[float], str]:
    """Means of resampled log-ratios and their weights."""
    n = len(logs)
    if n <= EXACT_UP_TO:
        means, weights = [], []
        for pick in itertools.combinations_with_replacement(range(n), n):
            means.append(sum(logs[i] for i in pick) / n)
            weights.append(_orderings(pick))
        return means, weights, f"exact bootstrap over the {n} pairs (all {n}^{n} resamples)"
    rng = random.Random(seed)
    means = [sum(rng.choice(logs) for _ in range(n)) / n for _ in range(RESAMPLES)]
    return means, [1.0] * RESAMPLES, f"bootstrap over the {n} pairs ({RESAMPLES} resamples, seed {seed})"


def _orderings(pick: tuple[int, ...]) -> float:
    """How many ordered resamples give this multiset: n! / prod(count!)."""
    counts = [sum(1 for _ in group) for _, group in itertools.groupby(pick)]
    return math.factorial(len(pick)) / math.prod(math.factorial(c) for c in counts)


def _percentile(values: list[float], weights: list[float], q: float) -> float:
    """The smallest value whose cumulative weight reaches q of the total (the inverse CDF)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    total, seen = sum(weights), 0.0
    for i in order:
        seen += weights[i]
        if seen >= q * total * (1 - 1e-12):
            return values[i]
    return values[order[-1]]


@dataclass(frozen=True)
class Verdict:
    text: str
    outcome: str  # "better", "worse" or "noise"


def verdict(ratio: Ratio, label: str, *, higher_is_better: bool = True) -> Verdict:
    """What the interval says about tuned against default, in one sentence."""
    change = (ratio.estimate - 1) * 100
    ci = f"{ratio.level:.0%} CI {(ratio.low - 1) * 100:+.1f}% to {(ratio.high - 1) * 100:+.1f}%"
    resolves = ("it resolves a 5% change" if ratio.half_width < RESOLVE else
                f"too noisy to resolve a 5% change (the interval is ±{ratio.half_width * 100:.1f}% wide); "
                "add --pairs")
    if ratio.contains_one():
        return Verdict(f"no measurable difference in {label}: {change:+.1f}% is inside the noise ({ci}); {resolves}",
                       "noise")
    better = (ratio.estimate > 1) == higher_is_better
    word = "better" if better else "worse"
    small = ", all of it within ±1%" if max(abs(ratio.low - 1), abs(ratio.high - 1)) < SMALL else ""
    return Verdict(f"tuned is {word} in {label}: {change:+.1f}% ({ci}{small}); {resolves}", word)


@dataclass(frozen=True)
class Metric:
    key: str  # in vllm bench serve's result JSON
    label: str
    higher_is_better: bool


def summarize(pairs: list[tuple[dict, dict]], metrics: list[Metric]) -> dict:
    """Per metric over the (default, tuned) results of each pair: both arms' spreads, the ratio and the verdict.
    A metric some run lacks or reports as zero (TPOT of one-token outputs) is left out."""
    out = {"arms": {"default": {}, "tuned": {}}, "ratios": {}, "verdicts": {}}
    for m in metrics:
        default, tuned = [p[0].get(m.key) for p in pairs], [p[1].get(m.key) for p in pairs]
        if not pairs or not all(isinstance(x, (int, float)) and x > 0 for x in default + tuned):
            continue
        out["arms"]["default"][m.key], out["arms"]["tuned"][m.key] = asdict(spread(default)), asdict(spread(tuned))
        ratio = paired_ratio(m.label, tuned, default)
        out["ratios"][m.key] = asdict(ratio)
        out["verdicts"][m.key] = asdict(verdict(ratio, m.label, higher_is_better=m.higher_is_better))
    return out


def predicted_gain(moe_share: float, kernel_speedup: float) -> float:
    """Whole-step speedup when the fused MoE, ``moe_share`` of step time, gets ``kernel_speedup`` faster."""
    return 1.0 / ((1.0 - moe_share) + moe_share / kernel_speedup)
