"""ray.init's options against a local cluster's start: init, a GPU actor that imports torch, shutdown.

    PYTHONPATH=/tmp/ray python3 benchmarks/ray_init_options.py [num_cpus=1] [include_dashboard=False]
"""

import os
import sys
import time

import ray

kwargs = {"num_gpus": 1, "log_to_driver": False}
for arg in sys.argv[1:]:
    key, value = arg.split("=")
    kwargs[key] = {"False": False, "True": True}.get(value, int(value) if value.isdigit() else value)
t0 = time.monotonic()
ray.init(**kwargs)
t1 = time.monotonic()


@ray.remote(num_gpus=1)
class Actor:
    def __init__(self):
        import torch

        torch.cuda.mem_get_info()

    def pid(self) -> int:
        return os.getpid()


ray.get(Actor.remote().pid.remote())
t2 = time.monotonic()
ray.shutdown()
print(f"{' '.join(sys.argv[1:]) or 'default':40s} init {t1 - t0:.2f} actor {t2 - t1:.2f} "
      f"shutdown {time.monotonic() - t2:.2f}", flush=True)
