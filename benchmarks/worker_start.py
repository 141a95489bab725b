"""Where a tune-moe worker's start goes: one TuneWorker on a local Ray, its start and its first reply timed.

    PYTHONPATH=/tmp/ray:$PWD python3 benchmarks/worker_start.py torch|none FUSED_MOE_PY

``torch`` imports torch in this (the driver's) process first, as the sweep's driver did before it read the kernel
without it; ``none`` does not. Prints, in seconds after ray.init returned: when the worker process was created,
when its __init__ began, had imported torch and was done, and when its ``info`` reply reached the driver.
"""

import sys
import time

T0 = time.time()
if sys.argv[1] == "torch":
    import torch  # noqa: F401
T1 = time.time()
import ray  # noqa: E402

from tuning.jobs import Settings  # noqa: E402
from tuning.vllm.kernel import KernelSource  # noqa: E402
from tuning.workers import TuneWorker  # noqa: E402

ray.init(num_gpus=1, log_to_driver=False)
T2 = time.time()


class Timed(TuneWorker):
    def __init__(self, *args, **kwargs):
        import psutil

        self.t = {"process": psutil.Process().create_time(), "init": time.time()}
        import torch  # noqa: F401

        self.t["torch"] = time.time()
        super().__init__(*args, **kwargs)
        self.t["done"] = time.time()

    def times(self) -> dict:
        return self.t


cls = ray.remote(num_gpus=1, max_restarts=0, runtime_env={"env_vars": {}})(Timed)
worker = cls.remote(Settings(gpu="H200", source=KernelSource(sys.argv[2], "0.33.0")), "NVIDIA_H200")
ray.get(worker.info.remote())
T3 = time.time()
t = ray.get(worker.times.remote())
print(f"{sys.argv[1]:5s} driver imports torch {T1 - T0:.2f} ray.init {T2 - T1:.2f} | after it: process "
      f"{t['process'] - T2:.2f} init {t['init'] - T2:.2f} torch {t['torch'] - T2:.2f} done {t['done'] - T2:.2f} "
      f"info {T3 - T2:.2f}", flush=True)
ray.shutdown()
