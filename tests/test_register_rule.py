"""What ptxas makes of vLLM's kernel for an H200, by the registers its accumulator needs.

``benchmarks/compile_cost_cpu.py`` compiles vLLM 0.33's fused_moe_kernel for sm90 on this CPU through the compile
pool's own driver (both GEMMs of a config, as a pool process does) and runs Triton's own ptxas with ``-v`` on
the PTX: a tile whose float32 accumulator needs 256 registers a thread uses all 255 and spills; a small one
does neither.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).parents[1]
OVER, UNDER = "M256-N128-K64-G1-w4-s3", "M64-N64-K64-G1-w4-s3"  # 256 and 32 accumulator registers a thread


def test_an_accumulator_over_a_threads_registers_spills_and_a_small_one_does_not(tmp_path, fused_moe_py):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_cost_cpu.py"), str(fused_moe_py),
                          "bf16", "4096", f"{OVER},{UNDER}"], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["config"]: r for r in map(json.loads, run.stdout.splitlines()) if "config" in r}
    assert rows[OVER]["group"] == "over" and rows[UNDER]["group"] == "under"
    assert all(r["failure"] is None and len(r["kernels"]) == 2 for r in rows.values())  # both GEMMs compiled
    assert all(k["registers"] == 255 and k["spill_store_bytes"] > 0 for k in rows[OVER]["kernels"])
    assert all(k["registers"] < 255 and k["spill_store_bytes"] == 0 for k in rows[UNDER]["kernels"])
