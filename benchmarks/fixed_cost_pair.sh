#!/usr/bin/env bash
# A run's fixed cost, an older commit against this checkout, on a lent GPU machine (after gpu_stage.sh setup):
# three small sweeps each (3 jobs of bf16 TP8, one worker), alternating, from one warm Triton cache, each timed by
# run_phases.py. The older commit's tuning/ is a git-ignored copy, carried:
#   git archive COMMIT tuning | tar x -C .gpu/head0        (here; then carry .gpu/head0)
#   benchmarks/fixed_cost_pair.sh [EXTRA TUNE-MOE ARGS]     (there; e.g. --allow-triton-mismatch under Triton 3.6)
# Brings back $OUT/fc.tar: fc-{w,b1..b3,n1..n3}.{log,phases.json} (w: the warm-up, b: the older, n: this one).
set -u
R=$PWD; S=$R/benchmarks/gpu_stage.sh
A="--gpu H200 --num-gpus 8 --dtype bf16 --layouts TP8 --batch-sizes 1,2,4 --max-evals 6 --workers 1 $*"
rm -rf /tmp/b0 && mkdir -p /tmp/b0 && cp -r .gpu/head0/tuning /tmp/b0/
$S tune fc-w 200 $A --out /tmp/runs/fc-w >/dev/null
for r in 1 2 3; do
  (cd /tmp/b0 && $S tune fc-b$r 200 $A --out /tmp/runs/fc-b$r) | tail -1
  $S tune fc-n$r 200 $A --out /tmp/runs/fc-n$r | tail -1
done
mkdir -p $OUT/fc && mv $OUT/fc-*.phases.json $OUT/fc-*.log $OUT/fc/ && rm -f $OUT/fc-*
python3 -c '
import json, glob, sys
for f in sorted(glob.glob(sys.argv[1] + "/fc/*.phases.json")):
    d = json.load(open(f))
    print(f.split("/")[-1], d["phases_s"], d.get("ray_up"), d.get("workers_after"), d["job_seconds"], d["outside_jobs_s"])' "$OUT"
tar cf $OUT/fc.tar -C $OUT fc && rm -rf $OUT/fc
