"""The driver: a dynamic queue of (shape, M) jobs fed to one Ray actor per GPU.

Jobs go to whichever worker is free, so long and short jobs balance; ``schedule`` picks which. Each finished job is
persisted at once, and a shape's vLLM file is written the moment its last batch size is done (on resume, any
a kill kept from being written, ``_ShapeWriter.mend``). A worker that
dies is replaced and its job re-queued. The entry the file in ``--out`` already holds for a batch size is the
job's incumbent (kept unless beaten, ``search``), the winners of its finished neighbours seed its search
(``seeds``), and compile failures seen anywhere are shared. Every worker must run the GPU model and the Triton
the run was planned for.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from . import outputs
from .configs import TileConfig
from .errors import DEPENDENCIES, UsageError
from .jobs import Failure, Job, JobResult, Settings, fingerprint
from .plan import Plan
from .provenance import RunInfo, Target
from .schedule import JobQueue
from .shapes import MoeShape
from .store import Store
from .vllm.triton_pins import compiling_triton

MAX_RESTARTS = 8
START_TIMEOUT_S = 300
MIN_FREE_GB = 40


@dataclass(frozen=True, kw_only=True)
class RayOptions:
    """How to get workers: a Ray address to join (or a local cluster), and the CPU test mode."""

    address: str | None = None
    address_from: str = "--ray-address"  # or RAY_ADDRESS: where the address came from, for the user's fix
    interpret: bool = False  # Triton's interpreter on CPU workers with declared fake GPUs
    local_gpus: int = 0  # GPUs of this node, for a local cluster
    max_workers: int | None = None  # at most this many workers (default: one per GPU of the cluster)


@dataclass(frozen=True, kw_only=True)
class Outputs:
    """Where the files go and what may be replaced."""

    out: Path
    fresh: bool = False
    overwrite: bool = False
    target: Target | None = None  # the Triton the target vLLM runs, for provenance


def run_sweep(plan: Plan, settings: Settings, ray_options: RayOptions, outs: Outputs,
              check_node: Callable[[], None] | None = None) -> int:
    """Resume or start the plan's jobs in ``outs.out`` and write each shape's files as it finishes. The finished
    shapes' files are written from the store first; ``check_node`` (the GPUs the jobs left need) runs before Ray."""
    kernel = settings.source.read()  # fail here, before Ray starts, on a missing or unknown kernel (torch-free:
    # importing torch took 3.4-4.5 s of an H200 host's start; the workers import it, and run the kernel's code)
    triton = compiling_triton() or "unknown"
    software = {"triton": triton, "vllm": kernel.vllm_version, "kernel_sha256": kernel.source_sha256}
    files = {s: plan.file_name(s) for s in plan.shapes}
    existing = {s: outputs.check_writable(outs.out / files[s], software, outs.overwrite) for s in plan.shapes}
    store = Store(outs.out, fresh=outs.fresh)
    try:
        for s in plan.shapes:
            store.claim(files[s], fingerprint(settings, s, device_name=plan.gpu.device_name, **software))
        store.keep_before()
        writer = _ShapeWriter(plan, settings, outs, existing, store)
        writer.mend(software)
        pending = [j for j in plan.jobs if not store.done(files[j.shape], j.m)]
        print(f"\n{len(plan.jobs) - len(pending)} of {len(plan.jobs)} jobs already done in {store.dir}; "
              f"{len(pending)} to run.")
        if not pending:
            print("Nothing to tune: every file of the plan is complete and left as it is."
                  if not writer.written else "Nothing left to tune.")
            return 0
        if check_node is not None:
            check_node()
        driver = Driver(plan, settings, ray_options, software)
        try:
            driver.run(pending, store, writer, {s: e.held for s, e in existing.items()})
        finally:
            driver.close()
        print("\n" + outputs.summary(plan, store.results))
        replaced = sum(r.incumbent is not None and r.tuned != r.incumbent for r in store.results.values())
        if replaced:
            print(f"\n{replaced} entr{'y' if replaced == 1 else 'ies'} replaced; the files as they were are in "
                  f"{store.before_dir}. Re-time each change beside the entry it replaced before you commit: "
                  f"tune-moe verify --gpu {plan.gpu.key} --configs {outs.out} --against {store.before_dir}. "
                  "That check holds for this board; for an image that other nodes run, keep only what another board "
                  "confirms: run it there with --keep-confirmed OUT (benchmarks/README §2p)")
        print("\nWrote:\n" + "\n".join(f"  {p}" for p in writer.written) if writer.written else "\nWrote no file.")
        missing = sum(not store.done(files[j.shape], j.m) for j in plan.jobs)
    finally:
        store.close(drop_unused=True)
    if missing:
        print(f"\n{missing} jobs did not finish; re-run the same command to finish them.", file=sys.stderr)
    return 1 if missing else 0


def seeds(m: int, done: dict[int, JobResult]) -> list[TileConfig]:
    """What a job's search looks at first, beside vLLM's default and the entry the file in --out holds (the
    incumbent): the winners of the two nearest finished batch sizes of the same file."""
    near = sorted(done, key=lambda n: abs(n - m))[:2]
    return list(dict.fromkeys(done[n].tuned for n in near))


class _ShapeWriter:
    """Writes a shape's files the moment its last batch size is done, if this run tuned any of them."""

    def __init__(self, plan: Plan, settings: Settings, outs: Outputs, existing: dict, store: Store):
        self.plan, self.settings, self.outs, self.existing, self.store = plan, settings, outs, existing, store
        self.written: list[Path] = []

    def __call__(self, job: Job, run: RunInfo) -> None:
        if self._finished(job.shape):
            self._write(job.shape, run)

    def _finished(self, shape: MoeShape) -> dict[int, JobResult] | None:
        results = self.store.for_file(self.plan.file_name(shape))
        return results if len(results) >= len(self.plan.batch_sizes) else None

    def _write(self, shape: MoeShape, run: RunInfo, why: str = "") -> None:
        path = outputs.write_shape(self.outs.out, self.plan, shape, self._finished(shape), settings=self.settings,
                                   run=run, target=self.outs.target, existing=self.existing[shape])
        self.store.note_written(path.name)
        self.written.append(path)
        tqdm.write(f"wrote {path}{why}")

    def mend(self, software: dict[str, str]) -> None:
        """On a resume, write the files of each finished shape that a kill kept from them (between its last result
        and its files: not recorded as written, and not holding its results), merged into the file as ``before/``
        holds it: the one these results began over, where --out may hold its new sidecar beside its old config. So
        is a file written but gone since, or holding ``before/``'s copy again (the state carried to a fresh machine,
        its folder rebuilt from the set it began over). A file written and changed otherwise (an entry reverted by
        hand) is left as it is. A store from before these records mends nothing."""
        if self.store.written is None or self.store.run is None:
            return
        for shape in self.plan.shapes:
            results, file = self._finished(shape), self.plan.file_name(shape)
            if results is None:
                continue
            if file in self.store.written:
                if not outputs.never_reached(self.outs.out, self.store.before_dir, file):
                    continue
                why = "the file in --out is gone or as that run found it"
            elif outputs.is_written(self.outs.out, self.plan, shape, results):  # a kill before it was recorded
                self.store.note_written(file)
                continue
            else:
                why = "the run that finished them stopped before writing it"
            self.existing[shape] = outputs.check_writable(self.store.before_dir / file, software, self.outs.overwrite)
            self._write(shape, self.store.run, f" (its results were in {self.store.dir}, but {why})")


class Driver:
    def __init__(self, plan: Plan, settings: Settings, ray_options: RayOptions, software: dict[str, str]):
        """``software``: the Triton this run compiles with and the kernel it read (vLLM, sha256), which every
        worker must load too: its results are kept under them."""
        self.plan, self.settings, self.options, self.software = plan, settings, ray_options, software
        self.started = time.monotonic()
        self.num_workers = min(_start_ray(ray_options), ray_options.max_workers or 1 << 30)
        self.ray_seconds = time.monotonic() - self.started
        self.failures: dict[str, dict[TileConfig, Failure]] = {}
        self.restarts = 0
        self.succeeded = 0
        self.broken: list[str] = []  # job failures before any job succeeded
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _interrupt)  # unwind (and stop our Ray) instead of dying mid-write

    def close(self) -> None:
        import ray

        if ray.is_initialized() and not self.options.address:
            ray.shutdown()

    def run(self, pending: list[Job], store: Store, on_done, held: dict | None = None) -> RunInfo:
        """Run ``pending``; ``held``: per shape, the entries its file in --out holds now (a job's incumbent is the
        one vLLM runs for its M: ``outputs.incumbent``)."""
        import ray

        held = held or {}
        queue = JobQueue(pending)
        workers = [self._new_worker() for _ in range(min(self.num_workers, len(pending)))]  # none left idle
        last: dict = {}  # worker -> the job it finished last (schedule: its siblings go to it next)
        run = self._check_workers(workers)
        store.note_run(run)
        bars = self._bars(pending, store)
        in_flight: dict = {}
        try:
            while queue or in_flight:
                busy = {w for w, _, _ in in_flight.values()}
                for w in [w for w in workers if w not in busy][: len(queue)]:
                    job = queue.take(last.get(w), [j for _, j, _ in in_flight.values()])
                    finished = store.for_file(self.plan.file_name(job.shape))
                    entry, key = outputs.incumbent(held.get(job.shape, {}), job.m)
                    task = w.run.remote(job, seeds(job.m, finished), self._known(job), entry)
                    in_flight[task] = (w, job, key)
                done, _ = ray.wait(list(in_flight), num_returns=1)
                worker, job, key = in_flight.pop(done[0])
                last[worker] = job
                try:
                    result: JobResult = replace(ray.get(done[0]), incumbent_key=key)
                except ray.exceptions.RayActorError:
                    workers[workers.index(worker)] = self._replace(worker, job, queue)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    self._failed(job, str(exc).strip().splitlines()[-1])
                    continue
                store.add(result)
                self.succeeded += 1
                self._learn(result)
                on_done(job, run)
                for bar in (bars["all"], bars[job.shape]):
                    bar.update(1)
        finally:
            for bar in bars.values():
                bar.close()
        return run

    def _failed(self, job: Job, why: str) -> None:
        """A job that raised (a config that fails is a result; a job fails when vLLM's default config or the
        kernel cannot run at all). Two such failures before any success mean the node's toolchain is broken
        (e.g. Triton's ptxas not executable), and going on would only repeat them."""
        tqdm.write(f"job {job.key} failed, skipped: {why}")
        if self.succeeded == 0:
            self.broken.append(why)
        if len(self.broken) >= 2:
            raise UsageError(f"jobs fail on this node before any succeeded ({why[:200]}); fix the GPU toolchain "
                             "(Triton, its ptxas, CUDA) and re-run")

    def _new_worker(self):
        import ray

        from .workers import TuneWorker

        env = {"TRITON_INTERPRET": "1"} if self.options.interpret else {}
        cls = ray.remote(num_gpus=1, max_restarts=0, runtime_env={"env_vars": env})(TuneWorker)
        return cls.remote(self.settings, self.plan.gpu.device_name, precompile=not self.options.interpret)

    def _check_workers(self, workers) -> RunInfo:
        infos = _started(workers)
        for i in infos:
            self._check_worker(i)
        ready = time.monotonic() - self.started - self.ray_seconds
        print(f"{len(infos)} workers: " + ", ".join(f"{i['host']}:{i['gpu_ids'] or '-'}" for i in infos)
              + f"; kernel: {infos[0]['kernel']}; Triton {infos[0]['triton']}; Ray up in {self.ray_seconds:.1f} s, "
              f"the workers {ready:.1f} s later"
              + (f"; {self.num_workers - len(infos)} of the {self.num_workers} GPUs left idle (fewer jobs than GPUs)"
                 if len(infos) < self.num_workers else ""))
        first = infos[0]  # every worker was checked to match it (device, Triton); the file is for the plan's device
        return RunInfo(gpu_name=first["name"], device_name=self.plan.gpu.device_name, driver=first["driver"],
                       count=len(infos), cuda=first["cuda"], torch=first["torch"], triton=first["triton"],
                       python=first["python"], vllm=first["vllm"], kernel=first["kernel"],
                       kernel_sha256=first["kernel_sha256"])

    def _check_worker(self, info: dict) -> None:
        where = f"worker on {info['host']}"
        if info["triton"] != self.software["triton"]:
            raise UsageError(f"{where} compiles with Triton {info['triton']}, but this run was planned for Triton "
                             f"{self.software['triton']}; install the same Triton on every node")
        if info["kernel_sha256"] != self.software["kernel_sha256"]:
            raise UsageError(f"{where} loaded another kernel than this run read ({info['kernel']}: fused_moe.py "
                             f"sha256 {info['kernel_sha256'][:12]}, not {self.software['kernel_sha256'][:12]}); give "
                             "every node the same vLLM, or the same --vllm-src file at the same path")
        if self.options.interpret:
            return
        if info["device_name"] is None:
            raise UsageError(f"{where} was given GPU {info['gpu_ids'] or '(none)'} by Ray, but its torch "
                             f"{info['torch']} sees no CUDA device; install the NVIDIA driver and a CUDA build of torch "
                             "on that node")
        if info["device_name"] != self.plan.gpu.device_name:
            raise UsageError(f"{where} runs on {info['name']}, not {self.plan.gpu.torch_name}; "
                             "use a cluster of one GPU model and the matching --gpu")
        if info["free_gb"] < MIN_FREE_GB:
            raise UsageError(f"GPU {info['gpu_ids']} on {info['host']} is busy ({info['free_gb']:.0f} GB free); "
                             "stop what runs there and re-run")

    def _replace(self, dead, job: Job, queue: JobQueue):
        import ray

        self.restarts += 1
        if self.restarts > MAX_RESTARTS:
            raise RuntimeError(f"{self.restarts} workers died; giving up (finished jobs are saved)")
        tqdm.write(f"worker died during {job.key}; starting a new one and re-queueing the job")
        ray.kill(dead, no_restart=True)
        queue.put_back(job)
        worker = self._new_worker()
        self._check_worker(_started([worker])[0])
        return worker

    def _known(self, job: Job) -> dict[TileConfig, Failure]:
        return dict(self.failures.get(self.plan.file_name(job.shape), {}))

    def _learn(self, result: JobResult) -> None:
        known = self.failures.setdefault(result.file, {})
        for short, why in result.failures.items():
            if why.kind.sticky:
                known[TileConfig.from_short(short)] = why

    def _bars(self, pending: list[Job], store: Store) -> dict:
        total = {s: len(self.plan.batch_sizes) for s in self.plan.shapes}
        bars = {"all": tqdm(total=len(pending), desc="all shapes", position=0, dynamic_ncols=True)}
        for i, shape in enumerate(self.plan.shapes, start=1):
            done = len(store.for_file(self.plan.file_name(shape)))
            bars[shape] = tqdm(total=total[shape], initial=done, desc=shape.label, position=i, dynamic_ncols=True)
        return bars


def _started(workers) -> list[dict]:
    """Each worker's ``info`` once it has started; a worker that cannot start, or no free GPU, is one line."""
    import ray

    try:
        return ray.get([w.info.remote() for w in workers], timeout=START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise UsageError(f"no worker got a GPU within {START_TIMEOUT_S}s: all GPUs of the Ray cluster are busy; "
                         "free them or pass --ray-address of a cluster with idle GPUs") from None
    except ray.exceptions.RayActorError as exc:
        if os.environ.get("TUNE_MOE_TRACEBACK") == "1":
            print(exc, file=sys.stderr)
        raise UsageError(start_failure(str(exc))) from None


def start_failure(error: str) -> str:
    """The line a worker that died starting is reported in: its own one-line refusal (the kernel's code fails to
    run, say), or what it raised and where to look."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    last = lines[-1] if lines else "no reason given"
    refused = re.match(r"^(?:[\w.]+\.)?UsageError: (.+)$", last)
    if refused:
        return refused.group(1)
    found = re.search(r"No module named '(\w+)", last)
    module = found.group(1) if found else ""
    if module in DEPENDENCIES or module == "tuning":
        node = re.search(r"\bip=([\w.:-]+)", error)
        need = "this checkout, pip install -e ." if module == "tuning" else repr(DEPENDENCIES[module])
        return (f"a Ray worker{f' on {node.group(1)}' if node else ''} cannot import {module}; install "
                f"tune-moe with its dependencies into the Python Ray runs on every node ({need})")
    return (f"a Ray worker died as it started ({last[:300]}); fix that node's GPU software, or re-run with "
            "TUNE_MOE_TRACEBACK=1 for the worker's traceback")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _start_ray(options: RayOptions) -> int:
    import ray

    if ray.is_initialized():
        pass  # the caller connected already
    elif options.address:
        where = f"{options.address_from} {options.address}"
        _answers(options.address, where)
        try:
            ray.init(address=options.address, log_to_driver=False)
        except ConnectionError as e:  # Ray's words (their first sentence) name its own flag and variable, not ours
            lines = str(e).strip().splitlines()
            found = lines[0].split(". ")[0].rstrip(":") if lines else type(e).__name__
            raise UsageError(f"{where}: {found}; start Ray on the nodes first (`ray start --head` on one, `ray start "
                             f"--address HEAD:6379` on the others), or drop {options.address_from} to start Ray on "
                             "this node") from None
    elif options.interpret:
        n = max(1, options.local_gpus)
        ray.init(num_gpus=n, num_cpus=max(2, n), log_to_driver=False)
    else:
        ray.init(num_gpus=options.local_gpus, log_to_driver=False)
    return cluster_gpus(ray.cluster_resources())


def _answers(address: str, where: str) -> None:
    """An address that names a host and port must answer there: Ray retries one that does not for minutes."""
    if address.startswith(("http://", "https://")):  # RAY_ADDRESS set for the `ray job` commands
        raise UsageError(f"{where}: an HTTP address (Ray's dashboard, which `ray job submit` talks to), not a cluster "
                         "to join; unset it on a cluster node, or give the head's HOST:6379")
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        return  # 'auto' and the forms Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UsageError(f"{where}: nothing answers at {host}:{port} ({e.strerror or e}); start Ray there first "
                         "(`ray start --head`), or give the head node's address") from None


def cluster_gpus(resources: dict) -> int:
    """GPUs of a Ray cluster of one GPU model; refuses mixed models and GPU-less clusters."""
    kinds = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    if len(kinds) > 1:
        raise UsageError(f"the Ray cluster mixes GPU models ({', '.join(kinds)}); tune each model on its own cluster")
    gpus = int(resources.get("GPU", 0))
    if gpus < 1:
        raise UsageError("the Ray cluster has no GPUs; start Ray on GPU nodes, or add --dry-run to print the plan")
    return gpus
