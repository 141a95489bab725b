"""Search space predicates and strategies, on evaluators whose costs are known exactly."""

import math
from pathlib import Path

import pytest

from tuning.bench import Timing
from tuning.configs import TileConfig
from tuning.jobs import Failure, FailureKind
from tuning.gpus import get_gpu
from tuning.runner import Outcome
from tuning.search import CLEAR_WIN, HEAD_TO_HEAD_MS, KEEP_WITHIN, exhaustive, guided, head_to_head
from tuning.shapes import MoeShape
from tuning.configs import read_config_file
from tuning.space import AXES, Context, accumulator_fits_registers, axes, candidates, explain, neighbours, space

H200 = get_gpu("H200")
FP8_EP = MoeShape(72, 288, 1280, 4096, 8, "fp8", (128, 128))
BF16_TP4 = MoeShape(288, 288, 320, 4096, 8, "bf16")


class Landscape:
    """A smooth cost over the axes (log2 distance to an optimum) plus configs that fail."""

    def __init__(self, best: TileConfig, failing=(), kind="resources", costs: dict[TileConfig, float] | None = None):
        self.best, self.failing, self.kind, self.costs = best, set(failing), kind, costs or {}
        self.calls: list[TileConfig] = []

    def cost(self, c: TileConfig) -> float:
        if c in self.costs:
            return self.costs[c]
        d = sum((math.log2(getattr(c, a)) - math.log2(getattr(self.best, a))) ** 2 for a in AXES)
        return 100.0 * (1 + 0.05 * d)

    def evaluate(self, c: TileConfig, budget_ms: float) -> Outcome:
        self.calls.append(c)
        if c in self.failing:
            return Outcome(c, failure=Failure(kind=FailureKind(self.kind), detail="out of shared memory"))
        return Outcome(c, Timing((self.cost(c),) * 5), 1e-3)


def test_space_size_and_predicates():
    ctx = Context(FP8_EP, H200, 1024)
    pool = space(ctx)
    assert len(candidates(Context(BF16_TP4, H200, 1024))) == 5 * 4 * 3 * 4 * 2 * 4
    assert len(candidates(ctx)) == 5 * 4 * 2 * 4 * 2 * 4  # K 256 is clamped to the 128 block
    assert 0 < len(pool) < len(candidates(ctx))
    assert all(c.BLOCK_SIZE_K <= 128 for c in pool)  # larger K tiles are clamped to the FP8 block
    assert all(c.BLOCK_SIZE_M <= 4 * 1024 * 8 / 288 for c in pool)
    big = TileConfig(256, 256, 128, 1, 8, 5)
    assert "fits_shared_memory" in explain(big, Context(BF16_TP4, H200, 4096))
    assert explain(TileConfig(16, 64, 128, 1, 4, 3), ctx) == []


@pytest.mark.parametrize("block,ks", [((128, 128), (64, 128)), ((64, 64), (64,)), ((32, 32), (32,))])
def test_block_fp8_searches_the_k_tile_vllm_will_run(block, ks):
    """vLLM clamps BLOCK_SIZE_K to the quant block (TP8 refines FP8 to [32,32]): the space holds
    exactly those K tiles, is not empty, and guided and exhaustive both reach its best config."""
    shape = MoeShape(288, 288, 160 if block == (32, 32) else 320, 4096, 8, "fp8", block)
    ctx = Context(shape, H200, 1024)
    assert axes(ctx)["BLOCK_SIZE_K"] == ks
    pool = space(ctx)
    assert {c.BLOCK_SIZE_K for c in pool} == set(ks)
    assert {c.BLOCK_SIZE_N for c in pool} == set(AXES["BLOCK_SIZE_N"])
    assert len(pool) > 100
    best, default = TileConfig(32, 128, ks[-1], 16, 4, 4), TileConfig(64, block[0], block[1], 1, 4, 3)
    rg, re_ = guided(Landscape(best), ctx, default), exhaustive(Landscape(best), ctx, default)
    assert rg.best.config == re_.best.config == best
    assert all(n.BLOCK_SIZE_K in ks for n in neighbours(best, ctx))


def test_an_accumulator_no_threads_registers_can_hold_is_not_searched_on_hopper():
    """vLLM's kernel accumulates BLOCK_M x BLOCK_N float32 values over 32 x num_warps threads: 256 or more a
    thread cannot fit the 255 registers a thread has. The edge both ways; only the largest batch sizes have
    such tiles in the space at all; Blackwell accumulates in tensor memory and keeps them."""
    ctx = Context(BF16_TP4, H200, 4096)
    for cfg in (TileConfig(256, 128, 64, 1, 4, 3), TileConfig(128, 256, 64, 1, 4, 3)):
        assert explain(cfg, ctx) == ["accumulator_fits_registers"]  # 256 a thread
    for cfg in (TileConfig(256, 128, 64, 1, 8, 3), TileConfig(128, 128, 64, 1, 4, 3)):
        assert explain(cfg, ctx) == []  # 128 a thread
    assert "accumulator_fits_registers" in explain(TileConfig(256, 256, 64, 1, 8, 2), ctx)
    assert accumulator_fits_registers(TileConfig(256, 128, 64, 1, 4, 3), Context(BF16_TP4, get_gpu("B200"), 4096))
    dropped = {m: sum(explain(c, Context(BF16_TP4, H200, m)) == ["accumulator_fits_registers"]
                      for c in candidates(Context(BF16_TP4, H200, m))) for m in (1024, 1536, 4096)}
    assert dropped[1024] == 0 < dropped[1536] < dropped[4096]


def test_no_committed_hopper_config_is_one_the_register_rule_drops():
    """Every tile config tuned on an H200 (every batch size of every file, searched in the space before this rule)
    keeps its accumulator in a thread's registers: the rule drops no config that ever won there."""
    files = [p for p in (Path(__file__).parents[1] / "kernels_configs" / "vllm-0.33" / "NVIDIA_H200").glob("E=*.json")
             if not p.name.endswith(".provenance.json")]
    assert len(files) >= 11
    winners = {c for p in files for c in read_config_file(p).values()}
    assert winners and all(accumulator_fits_registers(c, Context(BF16_TP4, H200, 4096)) for c in winners)


def test_naive_batches_use_one_row_tiles():
    ctx = Context(BF16_TP4, H200, 4)  # 4 * 8 * 4 <= 288: naive block assignment
    assert ctx.naive and {c.BLOCK_SIZE_M for c in space(ctx)} == {16}
    assert not Context(FP8_EP, H200, 1).naive  # EP never is


def test_neighbours_move_one_axis_one_step():
    ctx = Context(BF16_TP4, H200, 1024)
    c = TileConfig(32, 64, 64, 16, 4, 3)
    for n in neighbours(c, ctx):
        changed = [a for a in AXES if getattr(n, a) != getattr(c, a)]
        assert len(changed) == 1
        values = AXES[changed[0]]
        assert abs(values.index(getattr(n, changed[0])) - values.index(getattr(c, changed[0]))) == 1


@pytest.mark.parametrize("m,best", [
    (64, TileConfig(16, 64, 128, 1, 4, 3)),
    (1024, TileConfig(32, 128, 128, 16, 4, 3)),
    (4096, TileConfig(64, 128, 128, 1, 4, 4)),
])
def test_guided_matches_exhaustive_for_far_fewer_evaluations(m, best):
    ctx = Context(FP8_EP, H200, m)
    default = TileConfig(16, 128, 128, 1, 4, 3)
    g, e = Landscape(best), Landscape(best)
    rg = guided(g, ctx, default, seed=0)
    re_ = exhaustive(e, ctx, default)
    assert re_.best.config == best
    assert rg.best.us <= 1.01 * re_.best.us
    assert len(set(g.calls)) < len(set(e.calls)) / 2


def test_default_wins_when_it_is_the_best():
    ctx = Context(BF16_TP4, H200, 256)
    default = TileConfig(64, 128, 64, 1, 8, 3)
    result = guided(Landscape(default), ctx, default)
    assert result.best.config == default and result.default.config == default and result.speedup == 1.0


def test_never_slower_than_default_even_on_noise():
    """A config that looked faster in first looks but loses head to head is not chosen."""

    class Noisy(Landscape):
        def evaluate(self, c, budget_ms):
            out = super().evaluate(c, budget_ms)
            if out.ok and c != DEFAULT and budget_ms < 60:
                return Outcome(c, Timing((self.cost(c) * 0.5,) * 5), 1e-3)  # flattering first look
            return out

    DEFAULT = TileConfig(16, 64, 128, 1, 4, 3)
    result = guided(Noisy(DEFAULT), Context(FP8_EP, H200, 64), DEFAULT)
    assert result.best.us <= result.default.us
    assert result.best.config == DEFAULT


def test_failures_are_results_and_remembered_across_m():
    best = TileConfig(16, 64, 128, 1, 4, 3)
    bad = {TileConfig(16, 128, 128, 1, 4, 3), TileConfig(16, 64, 128, 1, 4, 4)}
    memory: dict = {}
    first = Landscape(best, bad)
    r1 = guided(first, Context(FP8_EP, H200, 64), best, failures=memory)
    assert set(memory) == bad & set(first.calls)
    assert all(o.failure.kind is FailureKind.RESOURCES for o in r1.failed)
    second = Landscape(best, bad)
    guided(second, Context(FP8_EP, H200, 96), best, failures=memory)
    assert not set(second.calls) & set(memory)  # never retried


def test_numerical_failures_are_not_remembered():
    best = TileConfig(16, 64, 128, 1, 4, 3)
    memory: dict = {}
    guided(Landscape(best, {TileConfig(16, 128, 128, 1, 4, 3)}, kind="numerics"), Context(FP8_EP, H200, 64), best,
           failures=memory)
    assert memory == {}


def test_precompile_failures_skip_timing():
    best = TileConfig(16, 64, 128, 1, 4, 3)
    doomed = TileConfig(16, 128, 128, 1, 4, 3)
    land = Landscape(best)
    asked = []

    def precompile(configs):
        asked.extend(configs)
        for c in configs:
            yield c, Failure(kind=FailureKind.COMPILE, detail="CompilationError: boom") if c == doomed else None

    memory: dict = {}
    guided(land, Context(FP8_EP, H200, 64), best, failures=memory, precompile=precompile)
    assert doomed in asked and doomed not in land.calls and memory[doomed].kind is FailureKind.COMPILE


def test_each_config_is_timed_as_its_compile_ends_and_the_search_is_the_same():
    """The pool hands over configs in the order their compiles end (here: each round reversed); each is timed
    at once, before the next compile is taken, and the search decides as it would with every config compiled
    first: the same configs timed, the same winner."""
    best = TileConfig(32, 128, 128, 8, 4, 3)
    log: list[tuple[str, TileConfig]] = []

    class Logged(Landscape):
        def evaluate(self, c, budget_ms):
            log.append(("timed", c))
            return super().evaluate(c, budget_ms)

    def precompile(configs):
        for c in reversed(configs):
            log.append(("compiled", c))
            yield c, None

    ctx, start = Context(BF16_TP4, H200, 256), TileConfig(16, 64, 64, 1, 4, 3)
    streamed, plain = Logged(best), Landscape(best)
    a = guided(streamed, ctx, start, precompile=precompile)
    b = guided(plain, ctx, start)
    first_looks = [e for e in log if e[0] == "timed"][: len(a.outcomes)]
    assert log[: 2 * len(a.outcomes)] == [e for c in (e[1] for e in first_looks) for e in (("compiled", c),
                                                                                          ("timed", c))]
    assert sorted(o.config.short for o in a.outcomes) == sorted(o.config.short for o in b.outcomes)
    assert a.best.config == b.best.config and a.best.us == b.best.us


def test_head_to_head_pools_alternating_samples():
    land = Landscape(TileConfig(16, 64, 128, 1, 4, 3))
    a, b = TileConfig(16, 64, 128, 1, 4, 3), TileConfig(32, 64, 128, 1, 4, 3)
    oa, ob = head_to_head(land, a, b)
    assert land.calls == [a, b, a, b, a, b]
    assert len(oa.timing.samples_us) == 15 and oa.us < ob.us


def test_head_to_head_of_three_alternates_them_and_times_a_repeated_config_once():
    a, b, c = (TileConfig(m, 64, 128, 1, 4, 3) for m in (16, 32, 64))
    land = Landscape(a)
    oa, ob, oc, oa2 = head_to_head(land, a, b, c, a)
    assert land.calls == [a, b, c] * 3
    assert oa2 is not oa and oa2.us == oa.us < ob.us < oc.us


OPTIMUM, DEFAULT, HELD = TileConfig(16, 128, 128, 16, 4, 4), TileConfig(16, 32, 64, 1, 4, 3), TileConfig(16, 64, 64, 1, 4, 3)


@pytest.mark.parametrize("strategy", [guided, exhaustive])
@pytest.mark.parametrize("held_us,default_us,optimum_us,winner", [
    (100.0 / (1 - KEEP_WITHIN) - 0.01, 110.0, 100.0, HELD),  # the optimum beats it by just under KEEP_WITHIN
    (100.0 / (1 - KEEP_WITHIN) + 0.01, 110.0, 100.0, OPTIMUM),  # by just over: replaced by the optimum
    (100.5, 100.3, 100.0, HELD),  # vLLM's default and the optimum beat it, both within KEEP_WITHIN: it stays
    (100.5, 100.5, 100.0, HELD),  # as fast as the default
    (100.0 / (1 - KEEP_WITHIN) - 0.01, 100.0, 100.2, HELD),  # the default beats it by just under KEEP_WITHIN
    (100.0 / (1 - KEEP_WITHIN) + 0.01, 100.0, 100.2, DEFAULT),  # by just over: the default, as a winner would
])
def test_a_re_tune_keeps_the_files_entry_unless_beaten_by_more_than_the_noise(strategy, held_us, default_us,
                                                                              optimum_us, winner):
    """The incumbent (the entry the file in --out holds) is looked at first, then timed head to head with the
    search's winner and vLLM's default; a re-tuned file changes only where it gets measurably faster, whether
    the challenger is the search's winner or vLLM's default."""
    land = Landscape(OPTIMUM, costs={HELD: held_us, DEFAULT: default_us, OPTIMUM: optimum_us})
    result = strategy(land, Context(BF16_TP4, H200, 256), DEFAULT, incumbent=HELD)
    assert land.calls[:2] == [DEFAULT, HELD]
    assert result.incumbent.config == HELD and result.incumbent.us == pytest.approx(held_us)
    assert result.best.config == winner
    assert result.default.us == pytest.approx(default_us)
    assert result.best.us * (1 - KEEP_WITHIN) <= result.default.us  # never measurably slower than the default


class Drifting(Landscape):
    """The optimum's cost moves between the first head to head (its first ``after`` timings: 3 rounds of 3
    configs, or of 2 without an incumbent) and the ones after, as a GPU's state moves a large batch's timing
    (benchmarks §2m)."""

    def __init__(self, first_us: float, later_us: float, after: int = 9, **kw):
        super().__init__(OPTIMUM, **kw)
        self.first_us, self.later_us, self.after, self.head_to_heads = first_us, later_us, after, 0

    def cost(self, c: TileConfig) -> float:
        if c == OPTIMUM:
            return self.first_us if self.head_to_heads <= self.after else self.later_us
        return super().cost(c)

    def evaluate(self, c: TileConfig, budget_ms: float) -> Outcome:
        self.head_to_heads += budget_ms == HEAD_TO_HEAD_MS
        return super().evaluate(c, budget_ms)


@pytest.mark.parametrize("first_us,later_us,winner,head_to_heads,rechecked", [
    (97.0, 97.0, OPTIMUM, 18, "confirmed"),  # wins both head to heads by 3%: replaced
    (97.0, 99.5, HELD, 18, "undid"),  # wins the first by 3%, the second by 0.5%: the noise, kept
    (99.5, 97.0, HELD, 9, ""),  # within the noise in the first: kept, no second
])
def test_a_replacement_must_win_a_second_head_to_head(first_us, later_us, winner, head_to_heads, rechecked):
    """A winner that beats the file's entry by more than KEEP_WITHIN is timed against it once more, and replaces
    it only if it wins again (benchmarks §2n: three of eleven replacements were the noise); the times returned
    pool both head to heads."""
    land = Drifting(first_us, later_us, costs={HELD: 100.0, DEFAULT: 110.0})
    result = guided(land, Context(BF16_TP4, H200, 256), DEFAULT, incumbent=HELD)
    assert land.head_to_heads == head_to_heads
    assert result.best.config == winner and result.rechecked == rechecked
    assert len(result.incumbent.timing.samples_us) == 5 * head_to_heads // 3  # 5 samples a timing, 3 a round
    if winner == OPTIMUM:
        assert result.best.us == pytest.approx(97.0)


@pytest.mark.parametrize("first_us,later_us,winner,head_to_heads,rechecked", [
    (97.0, 97.0, OPTIMUM, 12, "confirmed"),  # beats the default by 3% in both head to heads: written
    (97.0, 99.5, DEFAULT, 12, "undid"),  # by 3%, then by 0.5%: the noise, the default stays
    (100.0 * (1 - KEEP_WITHIN) + 0.01, 97.0, DEFAULT, 6, ""),  # by just under KEEP_WITHIN: the default, no second
    (100.0 * (1 - KEEP_WITHIN) - 0.01, 100.0 * (1 - KEEP_WITHIN) - 0.01, OPTIMUM, 12, "confirmed"),  # just over
])
def test_without_an_entry_in_the_file_the_default_is_what_a_winner_must_beat(first_us, later_us, winner,
                                                                                head_to_heads, rechecked):
    """Where the file holds no entry vLLM runs its default, and the search's winner replaces it only as it would
    replace the file's entry: faster by more than KEEP_WITHIN in two head to heads in a row (benchmarks §11: an
    entry picked 1.7% faster than the default in one head to head read as a tie on other boards)."""
    land = Drifting(first_us, later_us, after=6, costs={DEFAULT: 100.0})
    result = guided(land, Context(BF16_TP4, H200, 256), DEFAULT)
    assert land.head_to_heads == head_to_heads and result.incumbent is None
    assert result.best.config == winner and result.rechecked == rechecked
    assert len(result.default.timing.samples_us) == 5 * head_to_heads // 2  # 5 samples a timing, 2 a round
    assert result.best.us * (1 - KEEP_WITHIN) <= result.default.us


class Spread(Drifting):
    """Each timing's five samples spread by +-``spread`` around the config's cost, as at a board's power cap."""

    def __init__(self, first_us: float, spread: float, **kw):
        super().__init__(first_us, first_us, **kw)
        self.spread = spread

    def evaluate(self, c: TileConfig, budget_ms: float) -> Outcome:
        got = super().evaluate(c, budget_ms)
        if not got.ok:
            return got
        return Outcome(c, Timing(tuple(got.us * (1 + self.spread * k / 2) for k in (-2, -1, 0, 1, 2))), got.error)


@pytest.mark.parametrize("win,spread,incumbent,head_to_heads,rechecked", [
    (0.10, 0.0, False, 6, "clear"),  # 10% faster than the default, samples tight: written after one head to head
    (CLEAR_WIN + 0.001, 0.0, False, 6, "clear"),  # just over CLEAR_WIN
    (CLEAR_WIN - 0.001, 0.0, False, 12, "confirmed"),  # just under: a second, as any win of more than KEEP_WITHIN
    (0.10, 0.12, False, 12, "confirmed"),  # 10% faster, samples +-12%: the quantiles overlap, a second
    (0.10, 0.0, True, 9, "clear"),  # the file's entry beaten by 10%, samples tight
])
def test_a_clear_first_win_needs_no_second_head_to_head(win, spread, incumbent, head_to_heads, rechecked):
    """A pick faster than what vLLM runs there by more than CLEAR_WIN, its p80 below the other's p20, is written
    after one head to head: a second undid only wins of 1.3-1.7% (benchmarks §2n) and confirmed every win of
    7-33% (§11, n37). Where a board's power cap spreads the samples so that they overlap, the second is run."""
    standing = HELD if incumbent else DEFAULT
    costs = {DEFAULT: 100.0 if not incumbent else 110.0, **({HELD: 100.0} if incumbent else {})}
    land = Spread(100.0 * (1 - win), spread, after=9 if incumbent else 6, costs=costs)
    result = guided(land, Context(BF16_TP4, H200, 256), DEFAULT, incumbent=HELD if incumbent else None)
    assert land.head_to_heads == head_to_heads
    assert result.best.config == OPTIMUM and result.rechecked == rechecked
    assert (result.incumbent or result.default).config == standing
    assert len((result.incumbent or result.default).timing.samples_us) == 5 * head_to_heads // (2 + incumbent)


def test_a_default_that_fails_is_replaced_after_one_head_to_head():
    """A default that fails on this GPU (out of resources, say) is nothing vLLM can run faster: the winner is
    written without a second head to head."""
    land = Drifting(97.0, 97.0, after=6, failing=[DEFAULT])
    result = guided(land, Context(BF16_TP4, H200, 256), DEFAULT)
    assert result.best.config == OPTIMUM and not result.default.ok and result.rechecked == ""
    assert land.head_to_heads == 6


def test_an_incumbent_that_fails_is_replaced_and_its_failure_kept():
    land = Landscape(OPTIMUM, failing=[HELD], costs={DEFAULT: 110.0})
    result = guided(land, Context(BF16_TP4, H200, 256), DEFAULT, incumbent=HELD)
    assert result.best.config == OPTIMUM
    assert not result.incumbent.ok and result.incumbent.failure.kind == FailureKind.RESOURCES
    assert land.calls.count(HELD) == 1  # looked at once, never in the head to head


def test_replay_search_finds_the_best_of_a_recorded_landscape_and_skips_partial_ones(tmp_path):
    """benchmarks/replay_search.py on a run whose looks cover the whole space at M=256 (as an exhaustive run's do)
    and a few configs at M=64 (a guided run's): the noiseless replays of M=256 all pick its optimum; M=64 is not
    replayed. A --set of a constant search lacks is refused."""
    import json
    import subprocess
    import sys

    file = "E=288,N=320,device_name=NVIDIA_H200.json"
    land, default = Landscape(OPTIMUM), DEFAULT
    pool = space(Context(BF16_TP4, H200, 256))
    assert OPTIMUM in pool

    def row(m, looks):
        return {"file": file, "m": m, "default": default.to_dict(), "tuned": land.best.to_dict(),
                "looks": {c.short: land.cost(c) for c in looks}}

    (tmp_path / "x.results.jsonl").write_text(json.dumps(row(256, pool)) + "\n" + json.dumps(row(64, pool[:5])) + "\n")
    shape = {"num_experts": 288, "global_experts": 288, "n": 320, "k": 4096, "top_k": 8, "dtype": "bf16",
             "block_shape": None}
    (tmp_path / "x.run.json").write_text(json.dumps({"format": 2, "files": {file: {"shape": shape,
                                                                                     "device_name": "NVIDIA_H200"}}}))
    script = str(Path(__file__).resolve().parents[1] / "benchmarks/replay_search.py")
    run = subprocess.run([sys.executable, script, str(tmp_path / "x.results.jsonl"), "--noise", "0", "--repeats", "4"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (line,) = [l for l in run.stdout.splitlines() if l.startswith("| E=288,N=320 |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "256" and cells[2] == f"{len(pool)} ({len(pool)})" and cells[3] == "100.0"
    assert cells[4:7] == ["1.0000", "1.0000", "4/4"] and 0 < float(cells[7]) < len(pool)
    assert "1 (file, M) skipped" in run.stdout
    bad = subprocess.run([sys.executable, script, str(tmp_path / "x.results.jsonl"), "--set", "NOPE=1"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip() == "--set NOPE=1: search has no constant NOPE"


@pytest.mark.parametrize("smaller,within,configs", [(False, 220, 50), (True, 215, 54)])
def test_the_replays_on_the_recorded_whole_landscapes_are_section_2ms_figures(smaller, within, configs):
    """benchmarks/README §2m: the guided search replayed 20 times (0.5% noise) on each of the 12 whole landscapes
    that B14's exhaustive runs recorded at M = 1536-4096, seeded by sib-old's winners at the nearest batch sizes
    (or, --smaller-seeds, at the nearest smaller ones only): within 1% of the landscape's best first look in 220
    (215) of 240 replays, 1.52% at worst, 50 (54) configs timed on average. Before §11's rule (vLLM's default
    stays unless beaten by more than 1%, twice) 231 (230) and 1.75%: the replays that now fall short pick the
    default where the best is 0.6-1.1% faster. The climb around one tile's best configs alone found 216 and 181."""
    import math
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    runs = [root / "benchmarks/results/retune-b13/sib-old.results.jsonl", root / "benchmarks/results/b14/xl.results.jsonl",
            root / "benchmarks/results/b14/xl-b.results.jsonl"]
    run = subprocess.run([sys.executable, str(root / "benchmarks/replay_search.py"), *map(str, runs),
                          *(["--smaller-seeds"] if smaller else [])], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in run.stdout.splitlines() if line.startswith("| E=")]
    assert len(rows) == 12 and {int(r[1]) for r in rows} == {1536, 2048, 3072, 4096}
    assert all(r[2].split()[0] == r[2].split()[1].strip("()") for r in rows)  # whole landscapes
    assert sum(int(r[6].split("/")[0]) for r in rows) == within and sum(int(r[6].split("/")[1]) for r in rows) == 240
    assert max(float(r[5]) for r in rows) == 1.0152
    assert round(math.exp(sum(math.log(float(r[4])) for r in rows) / len(rows)), 3) == 1.002
    assert round(sum(int(r[7]) for r in rows) / len(rows)) == configs
