"""validate-serve's A/B statistics on data whose answers are known by hand."""

import itertools
import math

import pytest

from tuning.serve import ab


def test_spread_is_median_min_max():
    s = ab.spread([850.0, 800.0, 900.0, 820.0])
    assert (s.median, s.low, s.high, s.n) == (835.0, 800.0, 900.0, 4)


def test_identical_ratios_give_a_point_interval_and_a_clear_verdict():
    r = ab.paired_ratio("output tok/s", [880.0, 990.0, 770.0, 1100.0, 935.0], [800.0, 900.0, 700.0, 1000.0, 850.0])
    assert r.per_pair == pytest.approx((1.1,) * 5)
    assert (r.estimate, r.low, r.high) == pytest.approx((1.1, 1.1, 1.1))
    v = ab.verdict(r, "output tok/s")
    assert v.outcome == "better"
    assert v.text == "tuned is better in output tok/s: +10.0% (95% CI +10.0% to +10.0%); it resolves a 5% change"


def test_a_significant_change_inside_one_percent_is_named_small():
    # the bf16 prefill A/B of benchmarks/README 6e: per-pair total tok/s of both resident servers
    default = [98487.68, 98877.29, 98761.80, 98668.60, 100050.81]
    tuned = [98591.30, 98521.48, 98377.65, 98455.15, 99904.67]
    v = ab.verdict(ab.paired_ratio("total tok/s", tuned, default), "total tok/s")
    assert v.outcome == "worse"
    assert v.text == ("tuned is worse in total tok/s: -0.2% (95% CI -0.3% to -0.0%, all of it within ±1%); "
                      "it resolves a 5% change")


def test_two_pairs_exact_bootstrap_by_hand():
    # log-ratios 0 and log 1.21; resample means 0 (1 of 4 orderings), log 1.1 (2 of 4), log 1.21 (1 of 4):
    # the 2.5th percentile is the first, the 97.5th the last.
    r = ab.paired_ratio("x", [100.0, 121.0], [100.0, 100.0])
    assert r.estimate == pytest.approx(1.1)
    assert (r.low, r.high) == pytest.approx((1.0, 1.21))
    assert r.contains_one()
    assert r.method == "exact bootstrap over the 2 pairs (all 2^2 resamples)"


def test_orderings_weigh_every_ordered_resample_once():
    for n in (3, 5, 8):
        picks = itertools.combinations_with_replacement(range(n), n)
        assert sum(ab._orderings(p) for p in picks) == n ** n


def test_noisy_pairs_are_inside_the_noise():
    tuned, default = [800.0, 960.0, 720.0, 880.0, 640.0], [800.0] * 5  # ratios 1.0 1.2 0.9 1.1 0.8
    r = ab.paired_ratio("output tok/s", tuned, default)
    assert r.estimate == pytest.approx(math.exp(sum(math.log(x) for x in (1.0, 1.2, 0.9, 1.1, 0.8)) / 5))
    assert r.low < 1 < r.high and 0.8 <= r.low and r.high <= 1.2
    v = ab.verdict(r, "output tok/s")
    assert v.outcome == "noise"
    assert v.text.startswith("no measurable difference in output tok/s: -1.0% is inside the noise (95% CI ")
    assert "too noisy to resolve a 5% change" in v.text and v.text.endswith("add --pairs")


def test_a_consistent_small_gain_is_resolved():
    tuned = [1050.0, 1062.0, 1041.0, 1055.0, 1047.0]
    r = ab.paired_ratio("output tok/s", tuned, [1000.0] * 5)
    assert 1.04 <= r.low < r.estimate < r.high <= 1.062
    assert ab.verdict(r, "output tok/s").outcome == "better"


def test_lower_is_better_metrics_read_the_other_way():
    r = ab.paired_ratio("median TPOT (ms)", [9.0, 9.1, 8.9], [10.0, 10.0, 10.0])
    assert ab.verdict(r, "median TPOT", higher_is_better=False).outcome == "better"
    assert ab.verdict(r, "output tok/s").outcome == "worse"


def test_many_pairs_use_seeded_resampling_and_repeat():
    tuned = [1000.0 + 10 * i for i in range(10)]
    default = [1000.0 - 5 * (i % 3) for i in range(10)]
    a, b = ab.paired_ratio("x", tuned, default), ab.paired_ratio("x", tuned, default)
    assert a == b and a.method == "bootstrap over the 10 pairs (20000 resamples, seed 0)"
    assert min(a.per_pair) < a.low < a.estimate < a.high < max(a.per_pair)
    assert ab.paired_ratio("x", tuned, default, seed=1).low != a.low


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="one tuned and one default value per pair"):
        ab.paired_ratio("x", [1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="must be positive"):
        ab.paired_ratio("x", [0.0], [1.0])


def test_predicted_gain_is_amdahls_law():
    assert ab.predicted_gain(0.5, 2.0) == pytest.approx(4 / 3)
    assert ab.predicted_gain(0.0, 5.0) == 1.0
    assert ab.predicted_gain(1.0, 1.25) == pytest.approx(1.25)


def test_summary_per_metric_skips_what_a_run_lacks():
    metrics = [ab.Metric("output_throughput", "output tok/s", True), ab.Metric("median_tpot_ms", "median TPOT", False),
               ab.Metric("median_ttft_ms", "median TTFT", False)]
    pairs = [({"output_throughput": 800.0, "median_tpot_ms": 10.0, "median_ttft_ms": 0.0},
              {"output_throughput": 880.0, "median_tpot_ms": 9.0, "median_ttft_ms": 0.0}) for _ in range(3)]
    s = ab.summarize(pairs, metrics)
    assert set(s["ratios"]) == {"output_throughput", "median_tpot_ms"}  # TTFT zero: left out
    assert s["arms"]["tuned"]["output_throughput"] == {"median": 880.0, "low": 880.0, "high": 880.0, "n": 3}
    assert s["ratios"]["median_tpot_ms"]["estimate"] == pytest.approx(0.9)
    assert s["verdicts"]["median_tpot_ms"]["outcome"] == "better" == s["verdicts"]["output_throughput"]["outcome"]
