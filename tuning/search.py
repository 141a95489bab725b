"""Search strategies over the space for one (shape, M).

``guided`` (default): start from vLLM's default config, the entry the output file holds
(the incumbent), the seeds (the winners of neighbouring batch sizes) and a seeded sample
of the space; climb along one axis at a time around the best config of each of the few fastest
tiles (BLOCK_SIZE_M x BLOCK_SIZE_N: the best configs are often one tile's warps and stages, and
a climb around them alone never reaches another tile several axes away; benchmarks §2m); then
successive halving with longer timings for the finalists. The winner is re-timed head to head against vLLM's
default and the incumbent, and replaces what vLLM runs there now (the incumbent, or vLLM's default where the
file holds none) only when it beats it by more than KEEP_WITHIN (the timing noise) in two head to heads in a
row, or in one by more than CLEAR_WIN with the two configs' samples apart: a tuned entry differs from the
default only where it is measurably faster, a re-tuned file changes only where it gets measurably faster, and
a kept entry reads at most KEEP_WITHIN slower than the default.
``exhaustive`` times the whole space cheaply, then finishes the same way. Configs that
failed to compile or ran out of resources are remembered (``failures``) and never
retried. With a compile pool, each config of a round is timed as its compile ends, while
the pool compiles the rest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from .bench import Timing
from .configs import TileConfig
from .jobs import CLEAR_WIN, KEEP_WITHIN, Failure
from .runner import Outcome
from .space import Context, neighbours, space

CHEAP_MS = 10.0  # timing budget of a first look
FINAL_MS = (40.0, 100.0)  # successive-halving rounds
HEAD_TO_HEAD_MS = 60.0  # per side, per round, three rounds
SAMPLE = 10  # seeded random configs added to the first round
TOP = 3  # tiles whose best config's neighbourhood is climbed
MAX_EVALS = 120


class Evaluator(Protocol):
    def evaluate(self, config: TileConfig, budget_ms: float) -> Outcome: ...


@dataclass
class SearchResult:
    best: Outcome
    default: Outcome
    outcomes: list[Outcome] = field(default_factory=list)  # every first-look evaluation
    incumbent: Outcome | None = None  # the entry the output file held, timed head to head with the winner
    rechecked: str = ""  # a second head to head "confirmed" the replacement the first decided, or "undid" it;
    # "clear": the first won it clearly (clear_win), no second

    @property
    def evaluated(self) -> int:
        return len(self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def speedup(self) -> float:
        return self.default.us / self.best.us if self.best.ok and self.default.ok else 1.0


class _Book:
    """First-look outcomes, failure memory and an optional precompiler (``compile.Precompiler.stream``: each
    config as its compile ends, with the failure that rules it out, or None)."""

    def __init__(self, ev: Evaluator, failures: dict[TileConfig, Failure], precompile: Callable | None):
        self.ev, self.failures, self.precompile = ev, failures, precompile
        self.seen: dict[TileConfig, Outcome] = {}

    def look(self, configs: Iterable[TileConfig]) -> None:
        todo = [c for c in dict.fromkeys(configs) if c not in self.seen]
        for c in [c for c in todo if c in self.failures]:
            self.seen[c] = Outcome(c, failure=self.failures[c])
        todo = [c for c in todo if c not in self.seen]
        compiled = self.precompile(todo) if self.precompile and todo else ((c, None) for c in todo)
        looked: dict[TileConfig, Outcome] = {}
        for c, why in compiled:  # timed as its compile ends, while the pool compiles the rest
            looked[c] = Outcome(c, failure=why) if why is not None else self.ev.evaluate(c, CHEAP_MS)
            if looked[c].failure is not None and looked[c].failure.kind.sticky:
                self.failures[c] = looked[c].failure
        self.seen.update((c, looked[c]) for c in todo)  # in the round's order: ties rank alike whatever came first

    def ranked(self) -> list[Outcome]:
        return sorted((o for o in self.seen.values() if o.ok), key=lambda o: o.us)


def guided(ev: Evaluator, ctx: Context, default: TileConfig, *, seeds: Iterable[TileConfig] = (),
           incumbent: TileConfig | None = None, failures: dict[TileConfig, Failure] | None = None,
           precompile: Callable | None = None, seed: int = 0, max_evals: int = MAX_EVALS) -> SearchResult:
    book = _Book(ev, {} if failures is None else failures, precompile)
    pool = space(ctx)
    rng = random.Random(f"{seed}-{ctx.shape}-{ctx.m}")
    first = [default, *([incumbent] if incumbent else []), *seeds]
    book.look([*first, *rng.sample(pool, min(SAMPLE, len(pool), max(0, max_evals - 1)))])
    while len(book.seen) < max_evals:
        frontier = [n for o in _leaders(book.ranked(), TOP) for n in neighbours(o.config, ctx) if n not in book.seen]
        if not frontier:
            break
        book.look(frontier[: max_evals - len(book.seen)])
    return _finish(ev, book, default, incumbent)


def _leaders(ranked: list[Outcome], n: int) -> list[Outcome]:
    """The best config of each of the ``n`` fastest tiles (BLOCK_SIZE_M x BLOCK_SIZE_N)."""
    out, tiles = [], set()
    for o in ranked:
        tile = (o.config.BLOCK_SIZE_M, o.config.BLOCK_SIZE_N)
        if tile not in tiles:
            tiles.add(tile)
            out.append(o)
            if len(out) == n:
                break
    return out


def exhaustive(ev: Evaluator, ctx: Context, default: TileConfig, *, failures: dict[TileConfig, Failure] | None = None,
               precompile: Callable | None = None, seeds: Iterable[TileConfig] = (),
               incumbent: TileConfig | None = None, **_) -> SearchResult:
    book = _Book(ev, {} if failures is None else failures, precompile)
    book.look([default, *([incumbent] if incumbent else []), *seeds, *space(ctx)])
    return _finish(ev, book, default, incumbent)


STRATEGIES = {"guided": guided, "exhaustive": exhaustive}


def _finish(ev: Evaluator, book: _Book, default: TileConfig, incumbent: TileConfig | None = None) -> SearchResult:
    """Successive halving of the best first looks, then the winner head to head against the default and the
    incumbent (when it ran in its first look). What vLLM runs there now, the incumbent, else the default, stays
    unless beaten by more than KEEP_WITHIN: the incumbent by the better of the winner and the default (§2m found
    a default "win" of 0.3-2.5% that did not repeat), the default by the winner (a search's pick carries its
    board's luck: an entry picked 1.7% faster than the default read 0.95-1.03x on thirty re-timings, §11).
    A replacement must win a second head to head too (§2n: three of eleven replacements won one by 1.3-1.7%
    and were equal re-timed), unless it won the first clearly (clear_win); the times returned pool both."""
    base = book.seen[default]
    held = book.seen.get(incumbent) if incumbent else None
    finalists = [o.config for o in book.ranked()[:4]]
    for budget in FINAL_MS:
        timed = sorted((ev.evaluate(c, budget) for c in finalists), key=lambda o: o.us)
        finalists = [o.config for o in timed if o.ok][: max(1, len(finalists) // 2)]
    outcomes = list(book.seen.values())
    if not finalists:
        return SearchResult(base, base, outcomes, held)
    contenders = [finalists[0], default, *([incumbent] if held and held.ok else [])]
    timed = head_to_head(ev, *contenders)
    pick = _verdict(*timed)
    rechecked, standing = "", contenders[-1]  # what vLLM runs there now (a default that fails: nothing to recheck)
    if pick.config != standing and timed[-1].ok:  # a replacement of what vLLM runs there
        if clear_win(pick, timed[-1]):
            rechecked = "clear"
        else:
            again = head_to_head(ev, *contenders)
            stays = _verdict(*again).config == standing
            timed = [_pool([a, b]) for a, b in zip(timed, again)]
            pick = timed[-1] if stays else _verdict(*timed[:2])
            rechecked = "undid" if stays else "confirmed"
    return SearchResult(pick, timed[1], outcomes, timed[2] if len(timed) == 3 else held, rechecked)


def _verdict(winner: Outcome, default: Outcome, held: Outcome | None = None) -> Outcome:
    """What one head to head decides: the search's winner where it beats vLLM's default by more than KEEP_WITHIN
    (or the default failed), else the default; then the file's entry, ``held``, unless that pick beats it by
    more than KEEP_WITHIN."""
    pick = default if default.ok and winner.us >= default.us * (1 - KEEP_WITHIN) else winner
    return held if held is not None and held.ok and pick.us > held.us * (1 - KEEP_WITHIN) else pick


def clear_win(pick: Outcome, standing: Outcome) -> bool:
    """A first head to head won beyond what a second has undone: the pick faster by more than CLEAR_WIN, and
    its slow samples (p80) faster than the standing config's fast ones (p20). The second head to heads that
    undid a pick undid wins of 1.3-1.7% (§2n); a board at its power cap spreads one config's samples by up to
    9% (§11), so there the quantiles overlap and the second is run. On bf16 TP8 from empty results the 16 second
    head to heads confirmed every pick, 14 of them 7-33% faster (§11, n37): 0.54 s a job that changed nothing."""
    return pick.us < standing.us * (1 - CLEAR_WIN) and pick.timing.p80_us < standing.timing.p20_us


def head_to_head(ev: Evaluator, *configs: TileConfig, rounds: int = 3) -> list[Outcome]:
    """Alternate timings of the configs so drift hits all alike; pool each one's samples (an outcome per
    argument, a config given twice timed once)."""
    runs: dict[TileConfig, list[Outcome]] = {c: [] for c in configs}
    for _ in range(rounds):
        for c in runs:
            runs[c].append(ev.evaluate(c, HEAD_TO_HEAD_MS))

    return [_pool(runs[c]) for c in configs]


def _pool(runs: list[Outcome]) -> Outcome:
    """One config's timings as one outcome (its samples together), or its first failure."""
    bad = next((o for o in runs if not o.ok), None)
    if bad:
        return bad
    samples = tuple(s for o in runs for s in o.timing.samples_us)
    return Outcome(runs[0].config, Timing(samples), max(o.error for o in runs))
