"""Which job a free worker takes: siblings (one kernel family, one M) never side by side, back to back instead."""

import ast
import os
import random
import subprocess
import sys
from pathlib import Path

from tuning.gpus import get_gpu
from tuning.models import load_model
from tuning.plan import make_plan
from tuning.schedule import JobQueue, ends_inward, family, sibling_key
from tuning.shapes import parse_layout

BF16 = load_model("stepfun-ai/Step-3.5-Flash")
FP8 = load_model("stepfun-ai/Step-3.5-Flash-FP8")
H200 = get_gpu("H200")


def plan(model, dtype, layouts, ms=(1, 2, 4096)):
    return make_plan(model, H200, dtype, [parse_layout(x) for x in layouts], 8, ms, vllm_version="0.33.0")


def test_batch_sizes_go_from_both_ends_inward():
    assert ends_inward([16, 1, 8, 2, 4]) == [1, 16, 2, 8, 4]
    assert ends_inward([4, 4]) == [4] and ends_inward([]) == []


def test_shapes_that_differ_in_n_or_experts_are_one_family_and_block_shapes_are_not():
    tp = list(plan(BF16, "bf16", ["TP8", "TP4", "DP8+EP"]).shapes)
    assert len({family(s) for s in tp}) == 1  # N=160, N=320 and E=36 N=1280 compile the same kernels
    fp8 = list(plan(FP8, "fp8", ["TP8", "TP4", "DP8+EP"]).shapes)
    assert len({family(s) for s in fp8}) == 3  # [32,32], [64,64] and [128,128] blocks are compiled in


def test_what_the_families_rely_on_vllms_kernel_takes_n_k_and_m_at_run_time(fused_moe_py):
    """N, K and the token counts are plain arguments of vLLM's fused_moe_kernel, the quantisation block a
    compile-time one; the expert count is no argument at all (it only bounds expert_ids)."""
    tree = ast.parse(fused_moe_py.read_text())
    kernel = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "fused_moe_kernel")
    constexpr = {a.arg for a in kernel.args.args if a.annotation is not None and "constexpr" in ast.unparse(a.annotation)}
    runtime = {a.arg for a in kernel.args.args} - constexpr
    assert {"N", "K", "EM", "num_valid_tokens"} <= runtime
    assert {"group_n", "group_k", "use_fp8_w8a8", "compute_type"} <= constexpr
    assert not any("expert" in a and "ptr" not in a and "stride" not in a for a in runtime | constexpr)


def test_a_sibling_never_runs_beside_its_sibling_but_right_after_it():
    p = plan(BF16, "bf16", ["TP8", "TP4"])
    n160, n320 = list(p.shapes)
    q = JobQueue(p.jobs)
    first = q.take(None, [])
    assert (first.shape, first.m) == (n160, 1)
    second = q.take(None, [first])  # the other worker: not N=320 at M=1 (same kernels), the far end instead
    assert (second.shape, second.m) == (n160, 4096)
    after = q.take(first, [second])  # the first worker, done: N=320 at M=1 finds its kernels in the cache
    assert (after.shape, after.m) == (n320, 1)
    sibling = q.take(second, [after])  # and the second worker: N=320 at M=4096
    assert (sibling.shape, sibling.m) == (n320, 4096)
    assert len(q) == 2  # M=2 of both shapes, inward from both ends


def test_other_families_may_run_side_by_side():
    p = plan(FP8, "fp8", ["TP8", "TP4"])
    a, b = list(p.shapes)
    q = JobQueue(p.jobs)
    first = q.take(None, [])
    second = q.take(None, [first])
    assert {first.shape, second.shape} == {a, b} and first.m == second.m == 1


def test_a_free_worker_never_waits_and_a_dead_workers_job_goes_first():
    p = plan(BF16, "bf16", ["TP8"], ms=(1,))
    (job,) = p.jobs
    q = JobQueue(p.jobs)
    assert q.take(None, []) == job
    q.put_back(job)
    assert q.take(None, [job]) == job  # only a sibling of a running job is left: take it rather than idle


def test_every_job_is_taken_once_whatever_the_workers_do():
    p = plan(FP8, "fp8", ["TP8", "TP4", "DP8+EP", "DP4+EP"], ms=(1, 2, 4, 8, 16, 64, 256, 4096))
    rng = random.Random(0)
    q, running, last, taken = JobQueue(p.jobs), {}, {}, []
    while len(q) or running:
        for w in range(4):
            if w not in running and len(q):
                running[w] = q.take(last.get(w), list(running.values()))
                taken.append(running[w])
        w = rng.choice(sorted(running))
        last[w] = running.pop(w)
        assert len({sibling_key(j) for j in running.values()}) == len(running)  # families x M >> 4 workers
    assert sorted(taken, key=str) == sorted(p.jobs, key=str)


def walk(workers: int, ms) -> dict[int, list[int]]:
    """Workers of equal speed, each finishing in turn: the batch sizes each ran (N=160's; N=320's are its
    siblings)."""
    p = plan(BF16, "bf16", ["TP8", "TP4"], ms=ms)
    q, running, last, ran = JobQueue(p.jobs), {}, {}, {w: [] for w in range(workers)}
    while len(q) or running:
        for w in range(workers):
            if w not in running and len(q):
                running[w] = q.take(last.get(w), list(running.values()))
                if running[w].shape.n == 160:
                    ran[w].append(running[w].m)
        w = min(running)  # the lowest-numbered running worker finishes next
        last[w] = running.pop(w)
    return ran


def test_two_workers_start_at_both_ends_and_walk_towards_each_other():
    ms = (1, 2, 4, 8, 16, 64, 256, 1024, 3072, 4096)
    ran = walk(2, ms)
    assert ran[0] == sorted(ran[0]) and ran[0][0] == 1  # up from the smallest
    assert ran[1] == sorted(ran[1], reverse=True) and ran[1][0] == 4096  # down from the largest
    assert sorted(ran[0] + ran[1]) == list(ms)
    assert walk(1, ms)[0] == list(ms)  # alone: every batch size in order, each seeding the next


def test_a_third_worker_starts_in_the_middle():
    ran = walk(3, (1, 2, 4, 8, 16, 24, 32, 64, 128, 256, 1024, 4096))
    assert [r[0] for r in ran.values()] == [1, 4096, 24]  # as far as it gets from 1 and 4096 (a tie with 32)


def test_the_schedule_replayed_on_recorded_job_times_gives_the_ceiling_the_benchmarks_readme_states():
    """benchmarks/schedule_replay.py runs this schedule on a one-worker run's job times: replayed on one worker it
    gives the run's own wall time, on two the ceiling section 5 states (2e's c5: 169 s, 1.80x, against the 180 s
    measured; B33's c11: 159 s, 1.90x), each job run once."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "benchmarks/README.md").read_text()
    for run, one, two, said in (
            ("scaling-x2/c5", "| 1 | 304 s | 1.00× | 36 | 276 |", "| 2 | 169 s | 1.80× | 21 + 15 | 141 + 135 |",
             "gives 169 s (1.80×)"),
            ("b33/c11", "| 1 | 304 s | 1.00× | 54 | 287 |", "| 2 | 159 s | 1.90× | 26 + 28 | 143 + 144 |",
             "gives 159 s, 1.90× (26 + 28 jobs, 143 + 144 s each)")):
        done = subprocess.run([sys.executable, str(root / "benchmarks/schedule_replay.py"),
                               str(root / f"benchmarks/results/{run}.results.jsonl"), "2"],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
        assert done.returncode == 0, done.stderr
        rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
        assert rows == [one, two]
        assert said in " ".join(readme.split())
    bad = subprocess.run([sys.executable, str(root / "benchmarks/schedule_replay.py"), "nowhere.jsonl", "2"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(root)})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nowhere.jsonl" in bad.stderr
