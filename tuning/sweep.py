"""The driver: a dynamic queue of (shape, M) jobs fed to one Ray actor per GPU.

Jobs go to whichever worker is free, so long and short jobs balance. Each finished job
is persisted at once; a shape's vLLM file is written as soon as its last batch size is
done. A worker that dies is replaced and its job re-queued. Neighbouring batch sizes'
winners seed a job's search; compile failures seen anywhere are shared.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from pathlib import Path

from tqdm import tqdm

from . import configs, outputs
from .configs import TileConfig
from .errors import UsageError
from .gpus import DetectedGpu
from .jobs import JobResult, Settings
from .kernel import KernelSource
from .plan import Job, Plan
from .store import Store

MAX_RESTARTS = 8
START_TIMEOUT_S = 300
MIN_FREE_GB = 40


def run_sweep(plan: Plan, args: argparse.Namespace, out: Path, found: list[DetectedGpu]) -> int:
    source = KernelSource(args.vllm_src, args.vllm_version)
    source.load()  # fail here, before Ray starts, on a missing or unknown kernel
    settings = Settings(plan.gpu.key, source, args.strategy, args.routing, args.seed, args.scope, args.max_evals)
    for shape in plan.shapes:
        configs.check_writable(out / plan.file_name(shape), args.overwrite)
    store = Store(out, settings.fingerprint(), fresh=args.fresh)
    pending = [j for j in _order(plan.jobs) if not store.done(plan.file_name(j.shape), j.m)]
    print(f"\n{len(plan.jobs) - len(pending)} of {len(plan.jobs)} jobs already done in {store.dir}; {len(pending)} to run.")
    started = outputs.now()
    info = {"count": 0}
    if pending:
        info = Driver(plan, settings, args, len(found)).run(pending, store)
    written = [outputs.write_shape(out, plan, s, store.for_file(plan.file_name(s)), settings, info, started)
               for s in plan.shapes if len(store.for_file(plan.file_name(s))) >= len(plan.batch_sizes)]
    print("\n" + outputs.summary(plan, store.results))
    print("\nWrote:\n" + "\n".join(f"  {p}" for p in written))
    for line in outputs.serve_lines(plan, out):
        print(f"\nServe with the tuned configs:\n  {line}")
    missing = len(plan.jobs) - sum(store.done(plan.file_name(j.shape), j.m) for j in plan.jobs)
    if missing:
        print(f"\n{missing} jobs did not finish; re-run the same command to finish them.", file=sys.stderr)
    return 1 if missing else 0


def _order(jobs: list[Job]) -> list[Job]:
    """Round-robin over shapes, small M first: parallel workers spread over shapes."""
    by_shape: dict = {}
    for j in jobs:
        by_shape.setdefault(j.shape, []).append(j)
    queues = [deque(sorted(js, key=lambda j: j.m)) for js in by_shape.values()]
    out = []
    while any(queues):
        out += [q.popleft() for q in queues if q]
    return out


class Driver:
    def __init__(self, plan: Plan, settings: Settings, args: argparse.Namespace, local_gpus: int):
        self.plan, self.settings, self.args = plan, settings, args
        self.num_workers = _start_ray(args, local_gpus, plan)
        self.failures: dict[str, dict[TileConfig, str]] = {}
        self.restarts = 0

    def run(self, pending: list[Job], store: Store) -> dict:
        import ray

        queue, workers = deque(pending), [self._new_worker() for _ in range(self.num_workers)]
        info = self._check_workers(workers)
        bars = self._bars(pending, store)
        in_flight: dict = {}
        try:
            while queue or in_flight:
                for w in [w for w in workers if w not in {a for a, _ in in_flight.values()}]:
                    if queue:
                        job = queue.popleft()
                        in_flight[w.run.remote(job, self._seeds(job, store), self._known(job))] = (w, job)
                done, _ = ray.wait(list(in_flight), num_returns=1)
                worker, job = in_flight.pop(done[0])
                try:
                    result: JobResult = ray.get(done[0])
                except ray.exceptions.RayActorError:
                    workers[workers.index(worker)] = self._replace(worker, job, queue)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    tqdm.write(f"job {job.key} failed, skipped: {str(exc).strip().splitlines()[-1]}")
                    continue
                store.add(result)
                self._learn(result)
                for bar in (bars["all"], bars[job.shape]):
                    bar.update(1)
        finally:
            for bar in bars.values():
                bar.close()
        return info

    def _new_worker(self):
        import ray

        from .workers import TuneWorker

        env = {"TRITON_INTERPRET": "1"} if self.args.interpret else {}
        cls = ray.remote(num_gpus=1, max_restarts=0, runtime_env={"env_vars": env})(TuneWorker)
        return cls.remote(self.settings, self.plan.gpu.device_name, _compile_workers(self.num_workers, self.args))

    def _check_workers(self, workers) -> dict:
        import ray

        try:
            infos = ray.get([w.info.remote() for w in workers], timeout=START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise UsageError(f"no worker got a GPU within {START_TIMEOUT_S}s: all GPUs of the Ray cluster are busy; "
                             "free them or pass --ray-address of a cluster with idle GPUs") from None
        if not self.args.interpret:
            for i in infos:
                if i["device_name"] != self.plan.gpu.device_name:
                    raise UsageError(f"worker on {i['host']} runs on {i['name']}, not {self.plan.gpu.torch_name}; "
                                     "use a cluster of one GPU model and the matching --gpu")
                if i["free_gb"] < MIN_FREE_GB:
                    raise UsageError(f"GPU {i['gpu_ids']} on {i['host']} is busy ({i['free_gb']:.0f} GB free); "
                                     "stop what runs there and re-run")
        print(f"{len(infos)} workers: " + ", ".join(f"{i['host']}:{i['gpu_ids'] or '-'}" for i in infos)
              + f"; kernel: {infos[0]['kernel']}")
        return {**infos[0], "count": len(infos)}

    def _replace(self, dead, job: Job, queue: deque):
        import ray

        self.restarts += 1
        if self.restarts > MAX_RESTARTS:
            raise RuntimeError(f"{self.restarts} workers died; giving up (finished jobs are saved)")
        tqdm.write(f"worker died during {job.key}; starting a new one and re-queueing the job")
        ray.kill(dead, no_restart=True)
        queue.appendleft(job)
        worker = self._new_worker()
        ray.get(worker.info.remote(), timeout=START_TIMEOUT_S)
        return worker

    def _seeds(self, job: Job, store: Store) -> list[TileConfig]:
        """Winners of the nearest finished batch sizes of the same shape."""
        done = store.for_file(self.plan.file_name(job.shape))
        near = sorted(done, key=lambda m: abs(m - job.m))[:2]
        return list(dict.fromkeys(done[m].tuned for m in near))

    def _known(self, job: Job) -> dict[TileConfig, str]:
        return dict(self.failures.get(self.plan.file_name(job.shape), {}))

    def _learn(self, result: JobResult) -> None:
        known = self.failures.setdefault(result.file, {})
        for short, why in result.failures.items():
            if why.split(":")[0] in ("resources", "compile"):
                known[TileConfig.from_short(short)] = why

    def _bars(self, pending: list[Job], store: Store) -> dict:
        total = {s: len(self.plan.batch_sizes) for s in self.plan.shapes}
        bars = {"all": tqdm(total=len(pending), desc="all shapes", position=0, dynamic_ncols=True)}
        for i, shape in enumerate(self.plan.shapes, start=1):
            done = len(store.for_file(self.plan.file_name(shape)))
            bars[shape] = tqdm(total=total[shape], initial=done, desc=shape.label, position=i, dynamic_ncols=True)
        return bars


def _compile_workers(num_gpus: int, args: argparse.Namespace) -> int:
    if args.interpret:
        return 0
    return max(1, (os.cpu_count() or 2) // max(1, num_gpus) - 1)


def _start_ray(args: argparse.Namespace, local_gpus: int, plan: Plan) -> int:
    import ray

    if ray.is_initialized():
        pass  # the caller connected already
    elif args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=False)
    elif args.interpret:
        ray.init(num_gpus=args.num_gpus or 1, num_cpus=max(2, args.num_gpus or 1), log_to_driver=False)
    else:
        ray.init(num_gpus=local_gpus, log_to_driver=False)
    return cluster_gpus(ray.cluster_resources())


def cluster_gpus(resources: dict) -> int:
    """GPUs of a Ray cluster of one GPU model; refuses mixed models and GPU-less clusters."""
    kinds = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    if len(kinds) > 1:
        raise UsageError(f"the Ray cluster mixes GPU models ({', '.join(kinds)}); tune each model on its own cluster")
    gpus = int(resources.get("GPU", 0))
    if gpus < 1:
        raise UsageError("the Ray cluster has no GPUs; start Ray on GPU nodes, or add --dry-run to print the plan")
    return gpus
