"""The main job end to end on the CPU: a local Ray cluster with declared fake GPUs, two
workers, vLLM's real kernel under Triton's interpreter, a tiny MoE model; then the
faults: a worker killed mid-sweep, the whole run killed and resumed, bad output folders,
GPUs that are busy or absent.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from conftest import TINY_MODEL, vllm_fused_moe_path
from tuning import configs, provenance, sweep
from tuning.errors import UsageError
from tuning.jobs import JobResult
from tuning.sweep import cluster_gpus

pytestmark = pytest.mark.slow

BATCHES = "1,2,4,8,12,16"
FILE = "E=8,N=128,device_name=NVIDIA_H200.json"  # bf16 DP2+EP of the tiny model: 16 experts, 8 per GPU


def command(out: Path) -> list[str]:
    src = vllm_fused_moe_path()
    if src is None:
        pytest.skip("vLLM is not installed: its fused_moe.py is the kernel under test")
    return [sys.executable, "-m", "tuning.cli", "--gpu", "H200", "--dtype", "bf16", "--model", str(TINY_MODEL),
            "--layouts", "DP2+EP", "--num-gpus", "2", "--batch-sizes", BATCHES, "--max-evals", "3",
            "--interpret", "--vllm-src", str(src), "--out", str(out)]


def env() -> dict:
    return {**os.environ, "TRITON_INTERPRET": "1", "RAY_DISABLE_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}


def results(out: Path) -> list[dict]:
    path = out / ".tune-moe" / "results.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def wait_for_results(proc, out: Path, n: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while len(results(out)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no results in time"
        time.sleep(0.5)


def workers(driver_pid: int) -> list[psutil.Process]:
    """The Ray actor processes of this run: descendants of its driver (Ray's node processes start them)."""
    found = []
    for p in psutil.Process(driver_pid).children(recursive=True):
        try:
            text = " ".join(p.cmdline()) + " " + p.name()
        except psutil.Error:
            continue
        if "TuneWorker" in text:
            found.append(p)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a driver and everything it started (its own Ray cluster), touching no other Ray cluster."""
    try:
        procs = [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return
    try:
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=60)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_sweep_survives_a_killed_worker_and_writes_what_vllm_loads(tmp_path):
    out = tmp_path / "cfg"
    proc = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
    wait_for_results(proc, out, 1)
    victims = workers(proc.pid)
    assert len(victims) == 2  # one actor per (fake) GPU
    victims[0].send_signal(signal.SIGKILL)
    text, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, text
    assert "worker died" in text
    done = {(r["file"], r["m"]) for r in results(out)}
    assert done == {(FILE, int(m)) for m in BATCHES.split(",")}  # nothing lost, nothing missing
    written = configs.read_config_file(out / FILE)
    assert sorted(written) == [int(m) for m in BATCHES.split(",")]
    prov = provenance.read(out / FILE)
    assert prov.file == FILE and prov.shape.global_experts == 16 and prov.layouts == ("DP2+EP",)
    assert prov.run.count == 2 and prov.run.triton == written_triton(out / FILE) != "unknown"
    assert all(row.tuned_us <= row.default_us for row in prov.rows)
    assert written == vllm_loads(out, 8, 128)

    # the same command again: nothing to tune, and nothing rewritten (provenance stays the tuning run's)
    before = snapshot(out)
    again = subprocess.run(command(out), capture_output=True, text=True, env=env(), timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Nothing to tune" in again.stdout
    assert snapshot(out) == before

    # a kill between the shape's last result and its config file (the sidecar is written first, the record that
    # the file was written last): the resume writes the file from the store and runs nothing
    (out / FILE).unlink()
    unrecord(out, FILE)
    mended = subprocess.run(command(out), capture_output=True, text=True, env=env(), timeout=900)
    assert mended.returncode == 0, mended.stdout + mended.stderr
    assert "6 of 6 jobs already done" in mended.stdout and "workers:" not in mended.stdout
    assert f"wrote {out / FILE} (its results were in" in mended.stdout
    assert configs.read_config_file(out / FILE) == written and provenance.read(out / FILE).rows == prov.rows
    assert provenance.read(out / FILE).run == prov.run
    # it says when the results were tuned, not when it wrote them: the span of the jobs, as the first write said
    mended_prov = provenance.read(out / FILE)
    assert (mended_prov.started, mended_prov.finished) == (prov.started, prov.finished)
    assert all(r["finished"] for r in results(out)) and prov.started < prov.finished

    # the folder lost, the state kept (carried to a fresh machine): the file is written again, nothing is re-run
    (out / FILE).unlink()
    provenance.sidecar_path(out / FILE).unlink()
    lost = subprocess.run(command(out), capture_output=True, text=True, env=env(), timeout=900)
    assert lost.returncode == 0, lost.stdout + lost.stderr
    assert "6 of 6 jobs already done" in lost.stdout and "gone or as that run found it" in lost.stdout
    assert configs.read_config_file(out / FILE) == written and provenance.read(out / FILE).rows == prov.rows

    # a file written and changed since (an entry reverted by hand) is left as it is
    configs.write_config_file(out / FILE, {**written, 16: configs.TileConfig(16, 32, 64, 1, 4, 2)}, "3.8.0")
    before = snapshot(out)
    again = subprocess.run(command(out), capture_output=True, text=True, env=env(), timeout=900)
    assert again.returncode == 0 and "Nothing to tune" in again.stdout and snapshot(out) == before


def unrecord(out: Path, file: str) -> None:
    """Take ``file`` out of the store's record of the files it wrote: as a kill just before that record left it."""
    state = json.loads((out / ".tune-moe" / "run.json").read_text())
    state["written"].remove(file)
    (out / ".tune-moe" / "run.json").write_text(json.dumps(state))


def test_four_workers_one_per_fake_gpu_share_the_jobs(tmp_path):
    # DP4+EP of the tiny model over four declared GPUs: 4 local experts of 16 per GPU, one Ray worker per GPU.
    out, sizes = tmp_path / "cfg4", "1,2,4,8,12,16,24,32"
    argv = [*command(out), "--shape", "E=4,N=128"]
    argv[argv.index("DP2+EP")], argv[argv.index("--num-gpus") + 1] = "DP4+EP", "4"
    argv[argv.index("--batch-sizes") + 1] = sizes
    run = subprocess.run(argv, capture_output=True, text=True, env={**env(), "PYTHONPROFILEIMPORTTIME": "1"},
                         timeout=1200)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 workers:" in run.stdout
    # the driver never imports torch (3.4-4.4 s of an H200 host), not even to unpickle what its workers send back
    imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "ray" in imported and not imported & {"torch", "triton", "vllm"}
    start = re.search(r"; Ray up in ([0-9.]+) s, the workers ([0-9.]+) s later", run.stdout)  # the fixed cost
    assert start and 0 < float(start.group(1)) < 120 and 0 < float(start.group(2)) < 600
    rows = results(out)
    assert sorted(r["m"] for r in rows) == [int(m) for m in sizes.split(",")]  # every job once
    assert len({r["worker"] for r in rows}) == 4  # each worker took at least one (all start before the first job)
    name = "E=4,N=128,device_name=NVIDIA_H200.json"
    assert provenance.read(out / name).run.count == 4
    assert sorted(vllm_loads(out, 4, 128)) == [int(m) for m in sizes.split(",")]


def test_an_existing_cluster_of_two_nodes_is_joined_with_ray_address_and_left_running(tmp_path):
    """--ray-address: a Ray cluster the run did not start, here two nodes (two raylets, each its own object store,
    as on two hosts) of one fake GPU each. One worker per GPU, so one on each node; the files vLLM loads are
    written, and the cluster is still up when the run ends (the driver shuts down only a Ray it started)."""
    from ray.cluster_utils import Cluster

    out = tmp_path / "cfg"
    argv = command(out)
    node = {"num_cpus": 1, "num_gpus": 1, "resources": {"accelerator_type:H200": 1}}
    cluster = Cluster(initialize_head=True, head_node_args=node)
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        run = subprocess.run([*argv, "--ray-address", cluster.address], capture_output=True, text=True, env=env(),
                             timeout=900)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "2 workers:" in run.stdout and "Connecting to existing Ray cluster" in run.stderr
        assert sorted(r["m"] for r in results(out)) == [int(m) for m in BATCHES.split(",")]
        assert provenance.read(out / FILE).run.count == 2
        assert sorted(vllm_loads(out, 8, 128)) == [int(m) for m in BATCHES.split(",")]
        assert cluster.remaining_processes_alive()
    finally:
        cluster.shutdown()


def test_a_run_submitted_as_a_ray_job_joins_the_cluster_it_runs_on(tmp_path):
    """`ray job submit -- tune-moe ...`: Ray's job supervisor runs the command on the head with RAY_ADDRESS set to
    its cluster. The run joins that cluster (it asked Ray for GPUs there, which Ray refuses: 'internal error'), writes
    the files vLLM loads, and leaves the cluster running. A real job on a head with its dashboard (the Jobs API)."""
    pytest.importorskip("ray.dashboard.optional_deps", reason="Ray's Jobs API needs ray[default] (the test extra)")
    from ray.cluster_utils import Cluster
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "cfg"
    argv = command(out)
    argv[argv.index("--batch-sizes") + 1] = "1,2"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 2, "resources": {"accelerator_type:H200": 1}, "include_dashboard": True,
        "dashboard_port": port})
    try:
        jobs = JobSubmissionClient(f"http://127.0.0.1:{port}")
        job = jobs.submit_job(entrypoint="env TRITON_INTERPRET=1 PYTHONUNBUFFERED=1 " + shlex.join(argv))
        deadline = time.time() + 600
        while jobs.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.time() < deadline, jobs.get_job_logs(job)
            time.sleep(1)
        logs = jobs.get_job_logs(job)
        assert jobs.get_job_status(job) == JobStatus.SUCCEEDED, logs
        assert f"Connecting to existing Ray cluster at address: {cluster.address}" in logs and "2 workers:" in logs
        assert sorted(vllm_loads(out, 8, 128)) == [1, 2]
        assert cluster.remaining_processes_alive()
    finally:
        cluster.shutdown()


def test_a_driver_on_a_node_without_gpus_joins_a_cluster_and_its_workers_gpus_are_checked_where_they_run(tmp_path):
    """A cluster's head is often a CPU node. With --ray-address the driver does not ask for GPUs of its own (this box
    has none: without --ray-address the run stops on that) but checks each worker's GPU on the node it runs on. Here
    the worker's node declares a GPU whose torch sees no CUDA device: refused in one line naming that worker."""
    from ray.cluster_utils import Cluster

    if shutil.which("nvidia-smi"):
        pytest.skip("this node has an NVIDIA GPU: the driver's own check would pass")
    out = tmp_path / "cfg"
    argv = [a for a in command(out) if a != "--interpret"]
    alone = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=300)
    assert alone.returncode == 2 and "this node has no NVIDIA GPU" in alone.stderr, alone.stdout + alone.stderr
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1,
                                                             "resources": {"accelerator_type:H200": 1}})
    try:
        run = subprocess.run([*argv, "--ray-address", cluster.address], capture_output=True, text=True, env=env(),
                             timeout=600)
        errors = [line for line in run.stderr.splitlines() if line.startswith("tune-moe:")]
        assert run.returncode == 2 and len(errors) == 1, run.stdout + run.stderr
        assert "was given GPU 0 by Ray, but its torch" in errors[0] and "sees no CUDA device" in errors[0]
        assert "Traceback" not in run.stderr and not out.exists()
        assert cluster.remaining_processes_alive()
    finally:
        cluster.shutdown()


def test_cuda_visible_devices_picks_the_gpus_the_run_s_own_ray_hands_out(tmp_path):
    """On a node of eight H200s (nvidia-smi lists them all), CUDA_VISIBLE_DEVICES=0,1 tunes on two: the run's Ray
    starts with those (asked for eight, Ray refused: 'internal error'), and its workers are checked on them. Here
    the node is this box with a stand-in nvidia-smi, so each worker's torch sees no CUDA device and says so in one
    line. Hiding every GPU is one line before Ray starts."""
    out = tmp_path / "cfg"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(Path(__file__).parent / "fixtures" / "foundation" / "bin" / "nvidia-smi", bin_dir / "nvidia-smi")
    (bin_dir / "nvidia-smi").chmod(0o755)
    rows = "\n".join(f"{i}, NVIDIA H200, 143771, 570.86.15" for i in range(8))
    node = {**env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_NVIDIA_SMI_ROWS": rows}
    argv = [a for a in command(out) if a != "--interpret"]
    two = subprocess.run(argv, capture_output=True, text=True, env={**node, "CUDA_VISIBLE_DEVICES": "0,1"},
                         timeout=600)
    errors = [line for line in two.stderr.splitlines() if line.startswith("tune-moe:")]
    assert two.returncode == 2 and len(errors) == 1, two.stdout + two.stderr
    assert re.match(r"tune-moe: error: worker on \S+ was given GPU [01] by Ray, but its torch \S+ sees no CUDA "
                    r"device; install", errors[0]), errors[0]
    assert not out.exists()
    none = subprocess.run(argv, capture_output=True, text=True, env={**node, "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert none.returncode == 2 and none.stderr.strip().splitlines()[-1] == (
        "tune-moe: error: CUDA_VISIBLE_DEVICES='' hides every GPU of this node (8x NVIDIA H200); unset it, or list the "
        "GPUs to use (e.g. CUDA_VISIBLE_DEVICES=0,1)"), none.stdout + none.stderr
    assert not out.exists()


def test_a_ray_address_where_no_cluster_answers_is_one_line_at_once(tmp_path):
    """Ray retries an address nobody answers at for minutes, and says 'auto' found nothing in its own words (its
    --address flag): both are one line naming --ray-address (or RAY_ADDRESS, where the address came from there) and
    how to start the cluster, and leave no folder. A RAY_ADDRESS set for `ray job` (the dashboard's URL) is named."""
    out = tmp_path / "cfg"
    started = time.monotonic()
    run = subprocess.run([*command(out), "--ray-address", "127.0.0.1:1"], capture_output=True, text=True, env=env(),
                         timeout=120)
    assert run.returncode == 2 and time.monotonic() - started < 60, run.stdout + run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("tune-moe: error: --ray-address 127.0.0.1:1: nothing "
                                                          "answers at 127.0.0.1:1 (Connection refused); start Ray")
    assert not out.exists()
    run = subprocess.run(command(out), capture_output=True, text=True, env={**env(), "RAY_ADDRESS": "127.0.0.1:1"},
                         timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith(
        "tune-moe: error: RAY_ADDRESS 127.0.0.1:1: nothing answers at 127.0.0.1:1"), run.stdout + run.stderr
    dashboard = {**env(), "RAY_ADDRESS": "http://127.0.0.1:8265"}  # as set for the `ray job` commands
    run = subprocess.run(command(out), capture_output=True, text=True, env=dashboard, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == (
        "tune-moe: error: RAY_ADDRESS http://127.0.0.1:8265: an HTTP address (Ray's dashboard, which `ray job submit` "
        "talks to), not a cluster to join; unset it on a cluster node, or give the head's HOST:6379")
    gcs = [p for p in psutil.process_iter(["name"]) if "gcs_server" in (p.info["name"] or "")]
    if gcs or Path("/tmp/ray/ray_current_cluster").exists() or os.environ.get("RAY_ADDRESS"):
        pytest.skip("a Ray cluster runs on this node, or its address is recorded: 'auto' would find it")
    run = subprocess.run([*command(out), "--ray-address", "auto"], capture_output=True, text=True, env=env(),
                         timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "tune-moe: error: --ray-address auto: Could not find any running Ray instance; start Ray on the nodes first "
        "(`ray start --head` on one, `ray start --address HEAD:6379` on the others), or drop --ray-address to start "
        "Ray on this node")
    assert not out.exists()


def written_triton(path: Path) -> str:
    return json.loads(path.read_text())["triton_version"]


def vllm_loads(folder: Path, e: int, n: int) -> dict:
    fm = pytest.importorskip("vllm.model_executor.layers.fused_moe.fused_moe")
    os.environ["VLLM_TUNED_CONFIG_FOLDER"] = str(folder)
    real = fm.get_device_name_as_file_name
    fm.get_device_name_as_file_name = lambda *a, **k: "NVIDIA_H200"
    try:
        fm.get_moe_configs.cache_clear()
        got = fm.get_moe_configs(e, n, None)
    finally:
        fm.get_device_name_as_file_name = real
        fm.get_moe_configs.cache_clear()
        del os.environ["VLLM_TUNED_CONFIG_FOLDER"]
    return {m: configs.TileConfig.from_dict(c) for m, c in got.items()}


def killed_after(out: Path, n: int) -> None:
    """Start a run into ``out`` and SIGKILL it (and its own Ray) once ``n`` jobs are saved."""
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(),
                            start_new_session=True)
    wait_for_results(proc, out, n)
    kill_tree(proc.pid)
    proc.wait(timeout=60)


def test_killed_run_resumes_only_the_rest(tmp_path):
    out = tmp_path / "cfg"
    killed_after(out, 2)
    before = results(out)
    assert 2 <= len(before) < 6
    again = subprocess.run(command(out), capture_output=True, text=True, env=env(), timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{len(before)} of 6 jobs already done" in again.stdout
    after = results(out)
    assert after[: len(before)] == before  # finished work kept as it was
    assert len(after) == 6 and len({r["m"] for r in after}) == 6  # only the rest was run


def test_resume_under_another_geometry_is_refused(tmp_path):
    """Results of one model are never reused for another whose file name is the same (K differs here)."""
    out = tmp_path / "cfg"
    killed_after(out, 1)
    wider = json.loads(TINY_MODEL.read_text())
    wider["hidden_size"] *= 2
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    cmd = command(out)
    cmd[cmd.index("--model") + 1] = str(tmp_path / "wider.json")
    before = snapshot(out / ".tune-moe")
    again = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert again.returncode == 2
    assert "made under other settings (shape" in again.stderr and "--fresh" in again.stderr
    assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
    assert {k: v for k, v in snapshot(out / ".tune-moe").items() if k != "lock"} == \
           {k: v for k, v in before.items() if k != "lock"}


@pytest.mark.parametrize("content,message", [
    ("{ not json", "corrupt JSON"),
    (json.dumps({"16": {"BLOCK_SIZE_M": 16}}), "exactly the integer fields"),
    (json.dumps({"16": dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=64, BLOCK_SIZE_K=64, GROUP_SIZE_M=1, num_warps=4,
                            num_stages=3)}), "not written by tune-moe"),
])
def test_existing_corrupt_or_foreign_file_is_refused_and_kept(tmp_path, content, message):
    out = tmp_path / "cfg"
    out.mkdir()
    (out / FILE).write_text(content)
    run = subprocess.run(command(out), capture_output=True, text=True, env=env(), timeout=300)
    assert run.returncode == 2
    assert message in run.stderr and run.stderr.count("\n") == 1
    assert (out / FILE).read_text() == content
    assert not (out / ".tune-moe").exists()


def test_cluster_checks():
    assert cluster_gpus({"CPU": 64.0, "GPU": 8.0, "accelerator_type:H200": 1.0}) == 8
    with pytest.raises(UsageError, match="mixes GPU models.*H20, H200"):
        cluster_gpus({"GPU": 16.0, "accelerator_type:H200": 1.0, "accelerator_type:H20": 1.0})
    with pytest.raises(UsageError, match="no GPUs"):
        cluster_gpus({"CPU": 2.0})


def test_a_python_without_ray_is_told_how_to_install_it_in_one_line_and_leaves_nothing(tmp_path):
    """Ray is a dependency, so a Python that cannot import it is not the one tune-moe was installed into: the run
    stops as it would start Ray, in one line naming that Python's install command, and leaves no folder behind."""
    out = tmp_path / "cfg"
    blocked = "import sys; sys.modules['ray'] = None; from tuning.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", blocked, *command(out)[3:]], capture_output=True, text=True,
                         env={**env(), "TUNE_MOE_TRACEBACK": "1"}, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith("tune-moe: error: this Python cannot import ray (")
    assert f"{sys.executable} -m pip install 'ray>=2.40'" in run.stderr
    assert not out.exists()  # the state folder it opened is dropped: no job ran


def test_all_gpus_busy_is_a_clear_error(tmp_path, monkeypatch):
    import ray

    from tuning import sweep
    from tuning.gpus import get_gpu
    from tuning.jobs import Settings
    from tuning.vllm.kernel import KernelSource
    from tuning.models import load_model
    from tuning.plan import make_plan
    from tuning.shapes import Layout
    from tuning.store import Store

    src = vllm_fused_moe_path() or pytest.skip("vLLM is not installed")
    ray.init(num_gpus=1, num_cpus=2, log_to_driver=False)
    try:
        @ray.remote(num_gpus=1)
        class Holder:
            def ping(self):
                return True

        holder = Holder.remote()
        ray.get(holder.ping.remote())  # the only GPU is taken
        monkeypatch.setattr(sweep, "START_TIMEOUT_S", 5)
        plan = make_plan(load_model(str(TINY_MODEL)), get_gpu("H200"), "bf16", [Layout(dp=2, ep=True)], 2, (1,),
                         vllm_version="0.33")
        settings = Settings(gpu="H200", source=KernelSource(str(src)))
        software = {"triton": "3.8.0", "vllm": "0.33.0", "kernel_sha256": "0" * 64}
        driver = sweep.Driver(plan, settings, sweep.RayOptions(interpret=True, local_gpus=1), software)
        with pytest.raises(UsageError, match="busy"):
            driver.run(plan.jobs, Store(tmp_path), on_done=lambda job, run: None)
    finally:
        ray.shutdown()


def test_a_worker_that_loads_another_kernel_than_the_run_read_is_refused_before_any_job(tmp_path):
    """On a cluster of several nodes each worker loads the kernel from its own node (its vLLM, or the --vllm-src
    path there). A node with another fused_moe.py than the driver read would tune another kernel under this run's
    name. A real worker loading vLLM's file, under a driver that read another (its hash), is refused before any job;
    the same check passing when the hashes agree is what every other sweep here runs through."""
    from tuning import sweep
    from tuning.gpus import get_gpu
    from tuning.jobs import Settings
    from tuning.vllm.kernel import KernelSource
    from tuning.models import load_model
    from tuning.plan import make_plan
    from tuning.shapes import Layout
    from tuning.store import Store
    from tuning.vllm.triton_pins import compiling_triton

    src = vllm_fused_moe_path() or pytest.skip("vLLM is not installed")
    read = KernelSource(str(src)).read()
    plan = make_plan(load_model(str(TINY_MODEL)), get_gpu("H200"), "bf16", [Layout(dp=2, ep=True)], 2, (1,),
                     vllm_version="0.33")
    settings = Settings(gpu="H200", source=KernelSource(str(src)))
    store = Store(tmp_path)
    software = {"triton": compiling_triton(), "vllm": read.vllm_version, "kernel_sha256": "ab" * 32}
    driver = sweep.Driver(plan, settings, sweep.RayOptions(interpret=True, local_gpus=1), software)
    try:
        with pytest.raises(UsageError) as refusal:
            driver.run(plan.jobs, store, on_done=lambda job, run: None)
    finally:
        driver.close()
    assert "loaded another kernel than this run read" in str(refusal.value)
    assert f"sha256 {read.source_sha256[:12]}, not abababababab" in str(refusal.value)  # the worker's: vLLM's file
    assert not store.results


def test_sigterm_stops_the_run_in_one_line_and_keeps_what_finished(tmp_path):
    out = tmp_path / "cfg"
    proc = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=True)
    wait_for_results(proc, out, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted; finished jobs are saved" in err and "Traceback" not in err and "Aborted" not in err
    assert len(results(out)) >= 1
    kill_tree(proc.pid)


def run_with_kernel(out: Path, edit) -> subprocess.CompletedProcess:
    """The tiny sweep into ``out`` with vLLM's fused_moe.py as ``edit`` rewrites it, beside ``out``."""
    src = vllm_fused_moe_path() or pytest.skip("vLLM is not installed")
    kernel = out.parent / "fused_moe.py"
    kernel.write_text(edit(src.read_text()))
    cmd = command(out)
    cmd[cmd.index("--vllm-src") + 1] = str(kernel)
    return subprocess.run([*cmd, "--vllm-version", "0.33.0"], capture_output=True, text=True, env=env(), timeout=600)


def test_a_broken_toolchain_stops_the_sweep_in_one_line(tmp_path):
    """Jobs failing before any succeeded (here: as a missing ptxas makes every launch fail) end the run."""
    out = tmp_path / "cfg"
    run = run_with_kernel(out, lambda text: text + (  # the later definition wins: every job fails as on a broken node
        "\n\ndef get_default_config(*args, **kwargs):\n"
        "    raise PermissionError(13, \"Permission denied: '/tmp/t38/triton/backends/nvidia/bin/ptxas'\")\n"))
    assert run.returncode == 2, run.stdout + run.stderr
    assert "jobs fail on this node before any succeeded" in run.stderr and "ptxas" in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("tune-moe: error")]
    assert len(errors) == 1 and run.stderr.strip().endswith(errors[0]) and "Traceback" not in run.stderr
    assert not (out / FILE).exists()


def test_a_kernel_whose_code_fails_to_run_is_refused_by_its_worker_in_one_line(tmp_path):
    """The driver reads the kernel without torch (release, hash, parameters); code that fails only when run, here a
    jit decorator naming an undefined variable, is found by the workers as they start, and refused in one line."""
    jit = "@triton.jit\ndef fused_moe_kernel("

    def undefined_name_in_its_decorator(text: str) -> str:
        assert jit in text
        return text.replace(jit, "@triton.jit(do_not_specialize=undefined_name)\ndef fused_moe_kernel(", 1)

    out, broken = tmp_path / "cfg", tmp_path / "fused_moe.py"
    run = run_with_kernel(out, undefined_name_in_its_decorator)
    assert run.returncode == 2, run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("tune-moe: error")]
    assert errors == [f"tune-moe: error: --vllm-src {broken}: its kernels do not load (NameError: name "
                      "'undefined_name' is not defined); pass vLLM's fused_moe.py, wheel or tree"], run.stderr
    assert run.stderr.strip().endswith(errors[0]) and "Traceback" not in run.stderr
    assert "workers:" not in run.stdout and not out.exists()  # the folder this run made is gone with it


def test_a_worker_that_dies_starting_is_named_in_one_line():
    """What a worker raised as it started, as Ray reports it: its own refusal as it is, anything else with where
    to look."""
    died = ("The actor died because of an error raised in its creation task, ray::TuneWorker.__init__() "
            "(pid=7, ip=10.0.0.2)\n  File \"/srv/tuning/workers.py\", line 27, in __init__\n")
    assert sweep.start_failure(died + "tuning.errors.UsageError: --vllm-src x.py: no such file; pass it\n") == \
        "--vllm-src x.py: no such file; pass it"
    line = sweep.start_failure(died + "RuntimeError: CUDA error: no kernel image is available\n")
    assert line.startswith("a Ray worker died as it started (RuntimeError: CUDA error: no kernel image is available)")
    assert "TUNE_MOE_TRACEBACK=1" in line and "\n" not in line
    for module, fix in (("torch", "('torch>=2.4')"), ("tuning", "(this checkout, pip install -e .)")):
        assert sweep.start_failure(died + f"ModuleNotFoundError: No module named '{module}'\n") == (
            f"a Ray worker on 10.0.0.2 cannot import {module}; install tune-moe with its dependencies into the Python "
            f"Ray runs on every node {fix}")


def test_a_shape_is_written_the_moment_its_last_batch_size_finishes(tmp_path):
    """Two shapes; the one that finishes first is on disk (config and sidecar) before the run ends."""
    out = tmp_path / "cfg"
    cmd = command(out)
    cmd[cmd.index("--layouts") + 1] = "DP2+EP,TP2"
    cmd[cmd.index("--batch-sizes") + 1] = "1,2,4"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), start_new_session=True)
    files = [out / FILE, out / "E=16,N=64,device_name=NVIDIA_H200.json"]
    deadline = time.time() + 600
    while not any(f.exists() for f in files):
        assert proc.poll() is None and time.time() < deadline, "no file before the run ended"
        time.sleep(0.2)
    kill_tree(proc.pid)  # the run is killed right after the first shape completed
    proc.wait(timeout=60)
    first = next(f for f in files if f.exists())
    assert sorted(configs.read_config_file(first)) == [1, 2, 4]
    assert provenance.read(first).file == first.name
    done = {(r["file"], r["m"]) for r in results(out)}
    assert {m for f, m in done if f == first.name} == {1, 2, 4}


def test_a_job_is_seeded_with_the_winners_of_its_nearest_finished_neighbours():
    a, b, c = (configs.TileConfig(m, 64, 64, 1, 4, 3) for m in (32, 64, 128))
    r = JobResult(file=FILE, m=0, default=a, default_us=10.0, tuned=a, tuned_us=9.0, tuned_p20_us=8.9,
                  tuned_p80_us=9.1, roofline_us=5.0, bound="memory", error=0.0, evaluated=3, failed=0, seconds=1.0,
                  worker="w")
    done = {1: replace(r, m=1, tuned=a), 8: replace(r, m=8, tuned=b), 16: replace(r, m=16, tuned=c)}
    assert sweep.seeds(12, done) == [b, c]
    assert sweep.seeds(2, done) == [a, b]
    assert sweep.seeds(4, {1: done[1], 2: replace(r, m=2, tuned=a)}) == [a]  # no config twice
    assert sweep.seeds(4, {}) == []


def retune_over(tmp_path, entries: dict, m: int):
    """One batch size ``m`` tuned with --overwrite (one look each, --max-evals 1) over a file of ``entries`` tune-moe
    did not write: the folder, the command and its finished run."""
    out = tmp_path / "cfg"
    out.mkdir()
    configs.write_config_file(out / FILE, entries, "3.8.0")
    cmd = command(out) + ["--overwrite"]
    cmd[cmd.index("--batch-sizes") + 1] = str(m)
    cmd[cmd.index("--max-evals") + 1] = "1"
    run = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return out, cmd, run


def test_a_batch_size_the_file_lacks_is_judged_against_the_entry_vllm_runs_there(tmp_path):
    """M=6 over a file keyed 1 and 8: vLLM runs key 8's entry at M=6 (the nearest key), so that entry, not only
    vLLM's default, is the job's incumbent: looked at first, timed head to head, kept unless beaten; the result
    names the key it came from, and the table says the batch size was added."""
    one, eight = configs.TileConfig(32, 32, 32, 1, 2, 1), configs.TileConfig(16, 32, 32, 1, 2, 2)
    out, _, run = retune_over(tmp_path, {1: one, 8: eight}, 6)
    (job,) = results(out)
    assert job["m"] == 6 and job["incumbent"] == eight.to_dict() and job["incumbent_key"] == 8
    assert job["incumbent_us"] > 0 and eight.short in job["looks"]
    kept = job["tuned"] == eight.to_dict()
    mark = r"\(kept key 8's entry, which vLLM ran here\)" if kept else r"\(replaces key 8's M16-N32-K32-G1-w2-s2"
    assert re.search(mark, run.stdout), run.stdout
    assert re.search(r"; 1 batch size\(s\) added, %d with an entry of their own that beat the nearest key's$"
                     % (not kept), run.stdout, re.M), run.stdout


def test_a_re_tune_times_the_entry_it_replaces(tmp_path):
    """With --overwrite over a file tune-moe did not write, its entry is the job's incumbent: looked at beside
    vLLM's default (one look each with --max-evals 1: one batch size has no neighbours to seed it), then timed
    head to head with it, and kept unless the default beats it by more than KEEP_WITHIN twice (the rule itself is
    driven on known costs in test_search). One job on two GPUs: one worker starts, and the other GPU is said to
    be idle. Then kills and lost folders, resumed from the store: on the fake GPUs, and on this machine without
    one, where the store writes the files and only a job left to run is refused."""
    held = configs.TileConfig(32, 32, 32, 1, 2, 1)
    out, cmd, run = retune_over(tmp_path, {1: held, 4: held}, 1)
    assert re.search(r"^1 workers: .*; 1 of the 2 GPUs left idle \(fewer jobs than GPUs\)$", run.stdout, re.M)
    (job,) = results(out)
    assert job["m"] == 1 and job["evaluated"] == 2 and job["default"] != held.to_dict()
    default = configs.TileConfig.from_dict(job["default"])
    assert sorted(job["looks"]) == sorted([default.short, held.short]) and min(job["looks"].values()) > 0
    assert job["gpu_state"] == {}  # no NVML on a CPU host: the result says nothing rather than a guess
    assert configs.read_config_file(out / FILE) == {1: configs.TileConfig.from_dict(job["tuned"])}
    assert job["incumbent"] == held.to_dict() and job["incumbent_us"] > 0
    kept = job["tuned"] == held.to_dict()
    assert kept or job["tuned"] == job["default"]
    before = out / ".tune-moe" / "before" / FILE  # the file as the run found it, for verify --against
    assert configs.read_config_file(before) == {1: held, 4: held}
    hint = f"Re-time each change beside the entry it replaced before you commit: tune-moe verify --gpu H200 " \
           f"--configs {out} --against {before.parent}. That check holds for this board; for an image that other " \
           "nodes run, keep only what another board confirms: run it there with --keep-confirmed OUT"
    assert (hint in run.stdout) != kept
    replaced = r"  \(replaces M32-N32-K32-G1-w2-s1, which vLLM's default beat: [\d.]+ -> [\d.]+ us, [\d.]+x\)$"
    assert re.search(r" M32-N32-K32-G1-w2-s1  \(kept\)$" if kept else replaced, run.stdout, re.M)
    assert re.search(r"; kept %d of the 1 entries the file held$" % kept, run.stdout, re.M)

    # a kill after the sidecar and before the config file: --out holds the new sidecar beside the old file. The
    # resume writes the file from the one the results began over (before/), not from that half-written pair
    written = configs.read_config_file(out / FILE)
    shutil.copyfile(before, out / FILE)
    unrecord(out, FILE)
    mended = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600)
    assert mended.returncode == 0, mended.stdout + mended.stderr
    assert "1 of 1 jobs already done" in mended.stdout and "stopped before writing it" in mended.stdout
    assert configs.read_config_file(out / FILE) == written  # not M = 4 of the file it replaced

    # the state carried to a fresh machine whose folder was rebuilt from the set the run began over (the file as
    # before/ holds it, no sidecar): the resume writes the results into it again
    shutil.copyfile(before, out / FILE)
    provenance.sidecar_path(out / FILE).unlink()
    rebuilt = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=600)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "gone or as that run found it" in rebuilt.stdout and "workers:" not in rebuilt.stdout
    assert configs.read_config_file(out / FILE) == written

    # the same on a machine without a GPU (no --interpret: a real run's command): the results write the files, and
    # only a job left to run needs the GPUs, refused in one line with the state as it was
    from tuning.gpus import detect_gpus

    if detect_gpus():
        return  # a GPU node: the check below is of a node without one
    shutil.copyfile(before, out / FILE)
    provenance.sidecar_path(out / FILE).unlink()
    on_cpu = [a for a in cmd if a != "--interpret"]
    written_on_cpu = subprocess.run(on_cpu, capture_output=True, text=True, env=env(), timeout=600)
    assert written_on_cpu.returncode == 0, written_on_cpu.stdout + written_on_cpu.stderr
    assert "1 of 1 jobs already done" in written_on_cpu.stdout
    assert "gone or as that run found it" in written_on_cpu.stdout and "workers:" not in written_on_cpu.stdout
    assert configs.read_config_file(out / FILE) == written
    state = {k: v for k, v in snapshot(out / ".tune-moe").items() if k != "lock"}  # the lock names its last holder
    more = list(on_cpu)
    more[more.index("--batch-sizes") + 1] = "1,4"
    left = subprocess.run(more, capture_output=True, text=True, env=env(), timeout=600)
    assert left.returncode == 2 and "1 of 2 jobs already done" in left.stdout, left.stdout + left.stderr
    assert left.stderr.strip().splitlines()[-1] == ("tune-moe: error: --gpu H200: this node has no NVIDIA GPU "
                                                     "(nvidia-smi found none); run on a GPU node, or add --dry-run to "
                                                     "print the plan only")
    assert "Traceback" not in left.stderr
    assert {k: v for k, v in snapshot(out / ".tune-moe").items() if k != "lock"} == state
    assert configs.read_config_file(out / FILE) == written


def test_a_state_resumed_across_boards_writes_the_same_files_anywhere_and_says_what_it_knows_of_when(tmp_path):
    """rf4 (benchmarks/README §2s, §2t): 57 FP8 jobs on one board by a tune-moe whose results kept no time, the other
    51 on another board a day later. Its state and the committed set it began over write the same six files on this
    node without a GPU, twice byte for byte, with the GPU machine's entries. A file whose results all kept their
    time gives its jobs' span; one with an older result cannot know when that one began, and says so ("")."""
    from datetime import datetime, timedelta

    from tuning.gpus import detect_gpus
    from tuning.outputs import STAMP

    if detect_gpus() or vllm_fused_moe_path() is None:
        pytest.skip("a node without a GPU, with vLLM 0.33's kernel installed (it matches the state's fingerprint)")
    repo = Path(__file__).resolve().parents[1]
    state = repo / "benchmarks" / "results" / "b22"
    by_file: dict[str, list[dict]] = {}
    for line in (state / "rf4.results.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_file.setdefault(r["file"], []).append(r)
    written = []
    for name in ("a", "b"):
        out = tmp_path / name
        (out / ".tune-moe").mkdir(parents=True)
        for path in (repo / "kernels_configs" / "vllm-0.33" / "NVIDIA_H200").glob("E=*.json"):
            shutil.copy(path, out)
        shutil.copy(state / "rf4.results.jsonl", out / ".tune-moe" / "results.jsonl")
        shutil.copy(state / "rf4.run.json", out / ".tune-moe" / "run.json")
        run = subprocess.run([sys.executable, "-m", "tuning.cli", "--gpu", "H200", "--num-gpus", "8", "--dtype", "fp8",
                              "--out", str(out)], capture_output=True, text=True, env=env(), timeout=600)
        assert run.returncode == 0 and "108 of 108 jobs already done" in run.stdout, run.stdout + run.stderr
        assert "workers:" not in run.stdout
        written.append(snapshot(out))
        time.sleep(1.1)  # a stamp of the writing run's time would differ
    assert written[0] == written[1]
    assert len(by_file) == 6 and sum(1 for rows in by_file.values() if all(r.get("finished") for r in rows)) == 2
    for file, rows in by_file.items():
        held, tuned = configs.read_config_file(tmp_path / "a" / file), {r["m"]: configs.TileConfig.from_dict(r["tuned"])
                                                                       for r in rows}
        assert {m: held[m] for m in tuned} == tuned  # and the set's keys beyond the plan (§7's EP prefill) stay
        begun = configs.read_config_file(repo / "kernels_configs" / "vllm-0.33" / "NVIDIA_H200" / file)
        assert {m: held[m] for m in set(held) - set(tuned)} == {m: begun[m] for m in set(begun) - set(tuned)}
        prov = provenance.read(tmp_path / "a" / file)
        ends = [datetime.strptime(r["finished"], STAMP) for r in rows if r.get("finished")]
        assert prov.finished == max(ends).strftime(STAMP) and prov.span.endswith(prov.finished)
        if len(ends) == len(rows):
            first = min(datetime.strptime(r["finished"], STAMP) - timedelta(seconds=r["seconds"]) for r in rows)
            assert prov.started == first.strftime(STAMP)
        else:
            assert prov.started == "" and prov.span == f"up to {prov.finished}"


def test_every_worker_compiles_with_the_node_not_a_share_of_it():
    """Workers alternate compile rounds and timing: each may use the cores the others leave idle while they time."""
    from tuning.compile import MAX_PROCESSES, processes

    assert [processes(c) for c in (1, 2, 16, 32)] == [1, 1, 15, 31]
    assert processes(224) == MAX_PROCESSES  # a round never compiles more configs than that at once


def test_compile_processes_yield_the_cpu_to_timing_threads():
    """Relative to the worker: Ray runs its workers at niceness 15, and compiles at 15 would tie with them."""
    code = ("from tuning.compile import NICE, lower_priority; import os\n"
            "before = os.nice(0); lower_priority(); print(before, os.nice(0), NICE)")
    for parent in (0, 15):
        out = subprocess.run(["nice", "-n", str(parent), sys.executable, "-c", code], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout.split()
        before, after, step = map(int, out)
        assert after == min(19, before + step) and (after > before or before == 19)


def test_the_worker_collects_after_each_job_without_walking_what_it_loaded_at_start(fused_moe_py):
    """The start-up heap (torch, Triton, the kernel) is frozen, so the collection after every job walks only
    what jobs made, and still frees what a job left in a reference cycle."""
    import gc
    import weakref

    import torch

    from tuning.jobs import Settings
    from tuning.vllm.kernel import KernelSource
    from tuning.workers import TuneWorker

    class Node:
        pass

    worker = TuneWorker(Settings(gpu="H200", source=KernelSource(str(fused_moe_py))), "NVIDIA_H200")
    try:
        assert gc.get_freeze_count() > 10_000
        left = Node()
        left.me = left
        freed = weakref.ref(left)
        del left
        worker._bound_memory(torch)
        assert freed() is None
    finally:
        gc.unfreeze()
