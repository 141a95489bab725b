"""The probe's grid (tests/test_vllm_probe.py: 7392 serve rows) asked of the installed vLLM, beside tune-moe's
mirror of vLLM 0.33: the rows where they differ.

    python benchmarks/probe_grid.py        # in an environment whose vLLM is 0.33 or 0.34 (tuning.vllm.probe.PROBED)

Run with vLLM 0.34.0 on the CPU box (benchmarks/README §2w); CI runs the same comparison with vLLM 0.33.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_vllm_probe import grid_keys, serve_for  # noqa: E402

from tuning.vllm.probe import probe  # noqa: E402
from tuning.vllm.rules import layer_runtime  # noqa: E402


def verdict(r) -> tuple:
    return r.backend, r.experts, r.n, r.block, r.e8m0, (r.error or "").split(":")[0]


def main() -> int:
    import vllm

    keys = grid_keys()
    start = time.monotonic()
    answers = probe([(serve_for(a, d, lay, b, e), act) for a, d, lay, act, b, e in keys])
    print(f"vLLM {vllm.__version__}: {len(keys)} rows in {time.monotonic() - start:.1f} s")
    wrong = [(k, verdict(layer_runtime(serve_for(*k[:3], k[4], k[5]), k[3])), verdict(theirs))
             for k, theirs in zip(keys, answers)
             if verdict(layer_runtime(serve_for(*k[:3], k[4], k[5]), k[3])) != verdict(theirs)]
    print(f"{len(wrong)} rows where the mirror of vLLM 0.33 differs")
    for key, ours, theirs in wrong:
        mirror, vllm_says = f"{ours[:4]} {ours[5]}".strip(), f"{theirs[:4]} {theirs[5]}".strip()
        print(f"  {key}: mirror {mirror}; vLLM {vllm_says}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
