"""tune-moe check-deepgemm: the parts that need no GPU, and the whole run on one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tuning import bench
from tuning.deepgemm import gemms as deepgemm_gemms
from tuning.bench import Timing
from tuning.cli import main as cli_main
from tuning.deepgemm.check import assemble_report, summary_lines
from tuning.deepgemm.env import (
    Check, DeepGemmSource, check_cache_dir, check_capability, check_cuobjdump, check_nvcc, count_cached_kernels,
    find_cuda_home, find_nvcc, import_deep_gemm, jit_cache_dir, locate_deep_gemm, parse_nvcc_release, parse_version,
    required_nvcc, verdict,
)
from tuning.deepgemm.gemms import (
    GEMM_CASES, PASS_DIFF, Prepared, calc_diff, ceil_to_ue8m0, contiguous_layout, expert_rows, per_block_cast_to_fp8,
    per_token_cast_to_fp8,
)
from tuning.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
NVCC_13 = ("nvcc: NVIDIA (R) Cuda compiler driver\n"
           "Cuda compilation tools, release 13.0, V13.0.88\nBuild cuda_13.0.r13.0/compiler.36424714_0\n")


# ------------------------------------------------------------- calc_diff

def test_calc_diff_on_known_tensors():
    x = torch.tensor([1.0, -2.0, 3.0])
    assert calc_diff(x, x) == pytest.approx(0.0, abs=1e-12)
    assert calc_diff(x, -x) == pytest.approx(2.0)
    assert calc_diff(x, 2 * x) == pytest.approx(1 - 2 * 2 / 5)  # 1 - 2*sum(2x^2)/sum(5x^2)
    assert calc_diff(torch.zeros(4), torch.zeros(4)) == 0.0


def test_calc_diff_of_nan_fails_the_bar():
    diff = calc_diff(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0]))
    assert not diff < PASS_DIFF


# ------------------------------------------------------------ quantizers

def test_ceil_to_ue8m0_rounds_up_to_powers_of_two():
    got = ceil_to_ue8m0(torch.tensor([0.3, 1.0, 1.5, 4.0, 5.0]))
    assert got.tolist() == [0.5, 1.0, 2.0, 4.0, 8.0]


@pytest.mark.parametrize("ue8m0", [False, True])
def test_quantized_gemm_matches_the_float_reference(ue8m0):
    """What the kernel computes from these scales, on the CPU: DeepGEMM's bar holds."""
    torch.manual_seed(0)
    a, b = torch.randn(64, 512, dtype=torch.bfloat16), torch.randn(256, 512, dtype=torch.bfloat16)
    a8, sa = per_token_cast_to_fp8(a, ue8m0)
    b8, sb = per_block_cast_to_fp8(b, ue8m0)
    assert a8.dtype == b8.dtype == torch.float8_e4m3fn
    assert sa.shape == (64, 4) and sb.shape == (2, 4)  # 1x128 groups, 128x128 blocks
    deq_a = (a8.float().view(64, 4, 128) * sa.unsqueeze(2)).view(64, 512)
    deq_b = (b8.float().view(2, 128, 4, 128) * sb.view(2, 1, 4, 1)).view(256, 512)
    assert calc_diff(deq_a @ deq_b.t(), a.float() @ b.float().t()) < PASS_DIFF
    if ue8m0:
        exponents = torch.log2(torch.cat([sa.flatten(), sb.flatten()]))
        assert torch.equal(exponents, exponents.round())


def test_quantizer_rejects_unaligned_shapes():
    with pytest.raises(ValueError, match="k=100"):
        per_token_cast_to_fp8(torch.randn(4, 100), False)


# ------------------------------------------------------- grouped layouts

def test_expert_rows_are_seeded_and_spread_around_the_mean():
    rows = expert_rows(72, 128, seed=3)
    assert rows == expert_rows(72, 128, seed=3) != expert_rows(72, 128, seed=4)
    assert all(int(0.7 * 128) <= r <= int(1.3 * 128) for r in rows)


def test_contiguous_layout_pads_each_expert_to_the_alignment():
    layout = contiguous_layout([3, 128, 1], 128)
    assert len(layout) == 3 * 128
    assert layout[:4] == [0, 0, 0, -1] and layout[127] == -1
    assert layout[128:256] == [1] * 128
    assert layout[256] == 2 and set(layout[257:]) == {-1}


# ---------------------------------------------------------------- timing

def test_gemm_timing_goes_through_bench_measure(monkeypatch):
    """--reps is exactly that many samples of tuning.bench.measure, L2 flushed; its median gives time and TFLOP/s."""
    seen = {}

    def fake_measure(fn, **kwargs):
        seen.update(kwargs, fn=fn)
        return Timing((90.0, 100.0, 400.0))

    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setattr(deepgemm_gemms, "_wall", lambda fn: fn() or 0.5)  # no GPU to synchronize
    calls, out = [], torch.ones(4)
    prepared = Prepared(lambda: calls.append(1), lambda: (out, out), m=4096, groups=1, flops=2 * 10**8)
    check = deepgemm_gemms.measure(GEMM_CASES[0], prepared, 1000.0, reps=7)
    assert seen == {"fn": prepared.call, "min_samples": 7, "max_samples": 7,
                    "flush_l2_bytes": deepgemm_gemms.FLUSH_L2_BYTES}
    assert len(calls) == 2  # the untimed calls (JIT, then cached) come before the capture
    assert check.ok and check.value["time_us"] == 100.0
    assert check.value["tflops"] == pytest.approx(2.0) and check.value["pct_of_peak"] == pytest.approx(0.2)


# ------------------------------------------------------- version rules

@pytest.mark.parametrize("text,expected", [("2.8.1", (2, 8, 1)), ("2.1.1.post3+abc", (2, 1, 1)),
                                           ("v1.2", (1, 2)), ("", ()), (None, ())])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_parse_nvcc_release():
    assert parse_nvcc_release(NVCC_13) == (13, 0)
    assert parse_nvcc_release("Cuda compilation tools, release 12.9, V12.9.86") == (12, 9)
    assert parse_nvcc_release("command not found") is None


@pytest.mark.parametrize("cap,dg,need", [
    ((9, 0), (2, 1, 1), (12, 3)),
    ((9, 0), (2, 8, 1), (12, 9)),  # the deep_jit runtime refuses < 12.9 on every GPU
    ((10, 0), (2, 1, 1), (12, 9)),
    (None, (), (12, 3)),
])
def test_required_nvcc_per_arch_and_deepgemm(cap, dg, need):
    assert required_nvcc(cap, dg)[0] == need


def test_check_nvcc_thresholds():
    old = "Cuda compilation tools, release 12.8, V12.8.93"
    assert not check_nvcc("/cuda/bin/nvcc", old, (9, 0), (2, 8, 1)).ok
    assert "needs >= 12.9 for DeepGEMM 2.8.1" in check_nvcc("/cuda/bin/nvcc", old, (9, 0), (2, 8, 1)).detail
    assert check_nvcc("/cuda/bin/nvcc", old, (9, 0), (2, 1, 1)).ok
    assert not check_nvcc("/cuda/bin/nvcc", old, (10, 0), (2, 1, 1)).ok
    passed = check_nvcc("/cuda/bin/nvcc", NVCC_13, (10, 0), (2, 8, 1))
    assert passed.ok and passed.value == "13.0"
    missing = check_nvcc("/nope/nvcc", None, (9, 0), ())
    assert not missing.ok and "not found" in missing.detail


@pytest.mark.parametrize("cap,ok", [((9, 0), True), ((10, 0), True), ((10, 3), True),
                                    ((8, 0), False), ((12, 0), False), (None, False)])
def test_check_capability(cap, ok):
    assert check_capability(cap, "GPU").ok is ok


# ------------------------------------------------- environment discovery

def test_cuda_home_and_nvcc_follow_deepgemms_order(tmp_path):
    nvcc = tmp_path / "cuda-12.9" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.touch()
    assert find_cuda_home({"CUDA_HOME": "/a", "CUDA_PATH": "/b"}, str(nvcc)) == "/a"
    assert find_cuda_home({"CUDA_PATH": "/b"}, str(nvcc)) == "/b"
    assert find_cuda_home({}, str(nvcc)) == str(tmp_path / "cuda-12.9")
    assert find_cuda_home({}, None) == "/usr/local/cuda"
    assert find_nvcc({}, "/a") == "/a/bin/nvcc"
    assert find_nvcc({"DG_JIT_NVCC_COMPILER": "/x/nvcc"}, "/a") == "/x/nvcc"


def test_jit_cache_dir_default_depends_on_the_deepgemm_version():
    assert jit_cache_dir({"DG_JIT_CACHE_DIR": "/c", "HOME": "/h"}, (2, 8, 1)) == ("/c", "DG_JIT_CACHE_DIR")
    assert jit_cache_dir({"HOME": "/h"}, (2, 8, 1))[0] == "/h/.dj"
    assert jit_cache_dir({"HOME": "/h"}, (2, 1, 1))[0] == "/h/.deep_gemm"


def test_check_cache_dir(tmp_path):
    made = check_cache_dir(str(tmp_path / "new" / "cache"), "DG_JIT_CACHE_DIR")
    assert made.ok and (tmp_path / "new" / "cache").is_dir()
    assert not list((tmp_path / "new" / "cache").iterdir())  # the probe file is gone
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = check_cache_dir(str(blocker / "cache"), "DG_JIT_CACHE_DIR")
    assert not bad.ok and "set DG_JIT_CACHE_DIR to a writable folder" in bad.detail


def test_check_cuobjdump(tmp_path):
    assert check_cuobjdump("/usr/local/cuda/bin/cuobjdump", "/usr/local/cuda").ok
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "cuobjdump").touch()
    missing = check_cuobjdump(None, str(tmp_path))
    assert not missing.ok and f"add {tmp_path / 'bin'} to PATH" in missing.detail


def test_count_cached_kernels(tmp_path):
    for name in ("sm90_a.1", "sm90_b.2"):
        (tmp_path / "cache" / name).mkdir(parents=True)
        (tmp_path / "cache" / name / "kernel.cubin").touch()
    assert count_cached_kernels(str(tmp_path)) == 2
    assert count_cached_kernels(str(tmp_path / "absent")) == 0


# ------------------------------------------------------ which DeepGEMM

def _fake_package(folder: Path, version: str = "9.9.9", body: str = "") -> Path:
    package = folder / "deep_gemm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"__version__ = '{version}'\n{body}")
    return package


def test_deep_gemm_path_goes_first(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    package = _fake_package(tmp_path / "third_party")
    source = locate_deep_gemm(str(tmp_path / "third_party"))
    assert source == DeepGemmSource("deep_gemm", str(package), "--deep-gemm-path", "9.9.9")
    assert sys.path[0] == str(tmp_path / "third_party")


def test_deep_gemm_path_without_the_package_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no deep_gemm/__init__.py in it"):
        locate_deep_gemm(str(tmp_path))


def _specs(tmp_path: Path, installed: bool, bundled: bool):
    """A find_spec stand-in over a fake installed deep_gemm and a fake vLLM tree."""
    site = tmp_path / "site"
    if installed:
        _fake_package(site, "2.1.1")
    vllm = site / "vllm"
    (vllm / "third_party").mkdir(parents=True)
    if bundled:
        _fake_package(vllm / "third_party", "2.8.1")

    def find_spec(name):
        if name == "deep_gemm" and installed:
            return SimpleNamespace(origin=str(site / "deep_gemm" / "__init__.py"))
        if name == "vllm":
            return SimpleNamespace(origin=str(vllm / "__init__.py"), submodule_search_locations=[str(vllm)])
        return None
    return find_spec


@pytest.mark.parametrize("installed,bundled,expected", [
    (True, True, ("deep_gemm", "installed", "2.1.1")),  # an installed deep_gemm wins, as in vLLM
    (False, True, ("vllm.third_party.deep_gemm", "vllm bundled", "2.8.1")),
    (False, False, None),
])
def test_resolution_order(tmp_path, installed, bundled, expected):
    source = locate_deep_gemm(None, find_spec=_specs(tmp_path, installed, bundled))
    assert (source and (source.module, source.how, source.version)) == expected


def test_import_failure_is_a_failed_check(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    _fake_package(tmp_path, body="raise ImportError('libcudart.so.13: cannot open shared object file')\n")
    source = locate_deep_gemm(str(tmp_path))
    module, check = import_deep_gemm(source)
    sys.modules.pop("deep_gemm", None)
    assert module is None and not check.ok
    assert check.detail.endswith("ImportError: libcudart.so.13: cannot open shared object file")
    assert not import_deep_gemm(None)[1].ok


# ---------------------------------------------------------------- report

def _gemm_value(diff: float = 6.8e-4) -> dict:
    return {"m": 4096, "n": 2560, "k": 4096, "groups": 1, "calc_diff": diff, "time_us": 85.5, "tflops": 1005.0,
            "peak_tflops": 1979.0, "pct_of_peak": 50.8, "first_call_s": 7.96, "cached_call_s": 0.00044}


def test_report_passes_only_when_every_check_passed():
    good = [verdict("gpu.capability", True, "9.0"), verdict("gemm.dense", True, _gemm_value())]
    report = assemble_report(good, {"gpu": {"name": "NVIDIA H200"}})
    assert report["ok"] and report["failed"] == [] and report["gpu"]["name"] == "NVIDIA H200"
    assert json.loads(json.dumps(report))["checks"][1]["value"]["calc_diff"] == 6.8e-4
    failed = assemble_report([*good, verdict("cuobjdump", False, None, "not on PATH")], {})
    assert not failed["ok"] and failed["failed"] == ["cuobjdump"]
    skipped = assemble_report([*good, Check("gemm.masked.w2", "skip")], {})
    assert not skipped["ok"] and skipped["failed"] == [] and skipped["skipped"] == ["gemm.masked.w2"]
    assert not assemble_report([], {})["ok"]


def test_summary_has_one_line_per_check_and_a_verdict():
    report = assemble_report([verdict("nvcc.version", True, "13.0", "/usr/local/cuda/bin/nvcc"),
                                 verdict("gemm.dense", False, _gemm_value(2e-3), "calc_diff too high")], {})
    lines = summary_lines(report)
    assert lines[0].startswith("PASS nvcc.version") and "13.0 /usr/local/cuda/bin/nvcc" in lines[0]
    assert lines[1].startswith("FAIL gemm.dense") and "1005 TFLOP/s ( 51% of 1979)" in lines[1]
    assert "first 7.96 s, cached 0.44 ms" in lines[1]
    assert lines[-1] == "DeepGEMM check FAILED: gemm.dense"


def test_skipped_gemm_checks_are_not_failures():
    """Without a GPU DeepGEMM runs on, the GEMM checks are skipped and the verdict says the check is incomplete and
    why, naming only what did fail besides; without an importable DeepGEMM on a good GPU, the import failed and the
    GEMMs did not run."""
    skips = [Check(c.name, "skip", None, "needs a supported GPU") for c in GEMM_CASES]
    env = [verdict("gpu.capability", False, None, "no CUDA device visible to torch"),
           verdict("cuobjdump", False, None, "not on PATH"), verdict("deep_gemm.import", True, "2.8.1")]
    report = assemble_report([*env, *skips], {}, "this node has none (no CUDA device visible to torch)")
    assert not report["ok"] and report["failed"] == ["gpu.capability", "cuobjdump"]
    assert report["skipped"] == [c.name for c in GEMM_CASES]
    assert summary_lines(report)[-1] == (
        "DeepGEMM check incomplete: the GEMM checks need a supported GPU (compute capability 9.0 or 10.x: H200, "
        "B200...), and this node has none (no CUDA device visible to torch); run it on the GPU node (failed here too: "
        "cuobjdump)")
    alone = assemble_report([env[0], env[2], *skips], {}, "this node's NVIDIA A100-SXM4-80GB is sm80")
    assert summary_lines(alone)[-1].endswith("and this node's NVIDIA A100-SXM4-80GB is sm80; run it on the GPU node")
    no_import = assemble_report([verdict("gpu.capability", True, "9.0"), verdict("deep_gemm.import", False), *skips],
                                {})
    assert summary_lines(no_import)[-1] == ("DeepGEMM check FAILED: deep_gemm.import; not run: "
                                            + ", ".join(c.name for c in GEMM_CASES))


@pytest.mark.parametrize("probe,why", [
    ((None, "no CUDA device visible to torch"), "this node has none (no CUDA device visible to torch)"),
    (((8, 0), "NVIDIA A100-SXM4-80GB"), "this node's NVIDIA A100-SXM4-80GB is sm80"),
])
def test_a_node_without_a_supported_gpu_is_incomplete_not_failed(tmp_path, monkeypatch, capsys, probe, why):
    """The real run on this node with its GPU probe answered: the skipped GEMM checks are not called failures, the
    last line says plainly that they need a supported GPU and where to run, the exit is 1 (nothing was verified)."""
    monkeypatch.setattr("tuning.deepgemm.check._probe_gpu", lambda: probe)
    monkeypatch.setenv("DG_JIT_CACHE_DIR", str(tmp_path / "cache"))
    package = _fake_package(tmp_path / "dg", "2.8.1")
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        assert cli_main(["check-deepgemm", "--deep-gemm-path", str(tmp_path / "dg"),
                         "--json-out", str(tmp_path / "r.json")]) == 1
    finally:
        sys.modules.pop("deep_gemm", None)
    captured = capsys.readouterr()
    assert captured.err == ""
    last = captured.out.splitlines()[-1]
    assert last.startswith("DeepGEMM check incomplete: the GEMM checks need a supported GPU (compute capability 9.0 "
                           f"or 10.x: H200, B200...), and {why}; run it on the GPU node")
    assert "FAILED" not in last and "gemm." not in last and "gpu.capability" not in last
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["incomplete"] == why and report["deep_gemm"]["directory"] == str(package)
    assert report["skipped"] == [c.name for c in GEMM_CASES] and not set(report["skipped"]) & set(report["failed"])
    assert all(f"SKIP {c.name:<20} needs a supported GPU; {why}" in captured.out.splitlines() for c in GEMM_CASES)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("where", ["folder", "under-a-file", "read-only"])
def test_unusable_json_out_is_refused_before_any_check(tmp_path, monkeypatch, capsys, where):
    (tmp_path / "out").mkdir()
    (tmp_path / "file").write_text("")
    read_only = tmp_path / "report.json"
    read_only.write_text("{}")
    read_only.chmod(0o444)
    if os.geteuid() == 0:  # root writes anywhere; make access() answer as it would for a user
        real_access = os.access

        def access(path, mode, **kwargs):
            return not (Path(path) == read_only and mode & os.W_OK) and real_access(path, mode, **kwargs)

        monkeypatch.setattr(os, "access", access)

    def no_check(*args, **kwargs):
        raise AssertionError("a check ran")

    monkeypatch.setattr("tuning.deepgemm.check.locate_deep_gemm", no_check)
    path = {"folder": tmp_path / "out", "under-a-file": tmp_path / "file" / "r.json", "read-only": read_only}[where]
    before = _listing(tmp_path)
    assert cli_main(["check-deepgemm", "--json-out", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("tune-moe: error: --json-out ")
    assert captured.err.count("\n") == 1
    assert _listing(tmp_path) == before and read_only.read_text() == "{}"


# ------------------------------------------------------------------- CLI

def _verifier(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DG_", "PYTHON"))}
    env.update(PYTHONPATH=str(ROOT), HOME=str(cwd), CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-m", "tuning.deepgemm.check", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_module_run_without_a_gpu_reports_incomplete(tmp_path):
    """python3 -m tuning.deepgemm.check with a fake deep_gemm: resolution and the report, no GPU: the GEMM checks
    skipped, not failed, and exit 1 (DeepGEMM was not verified)."""
    marker = tmp_path / "imported"
    package = _fake_package(tmp_path / "dg", "2.8.1", f"open({str(marker)!r}, 'w').close()\n")
    done = _verifier("--deep-gemm-path", str(tmp_path / "dg"), "--json-out", "r.json", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert marker.exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert not list(tmp_path.glob(".r.json*"))  # no temp file left beside it
    assert report["deep_gemm"] == {"module": "deep_gemm", "directory": str(package),
                                   "how": "--deep-gemm-path", "version": "2.8.1"}
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["deep_gemm.import"] == "pass" and status["gpu.capability"] == "fail"
    assert {status[c.name] for c in GEMM_CASES} == {"skip"}
    assert report["skipped"] == [c.name for c in GEMM_CASES] and "gpu.capability" in report["failed"]
    assert report["jit_cache"]["dir"] == str(tmp_path / ".dj")
    last = done.stdout.splitlines()[-1]
    assert last.startswith("DeepGEMM check incomplete: the GEMM checks need a supported GPU") and "FAILED" not in last
    assert "this node has none (no CUDA device visible to torch); run it on the GPU node" in last


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    assert cli_main(["check-deepgemm", "--experts", "0"]) == 2
    assert capsys.readouterr().err.strip() == "tune-moe: error: --experts 0: out of range; use 1..288"
    done = _verifier("--deep-gemm-path", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no deep_gemm/__init__.py" in done.stderr


# ------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_deepgemm_on_this_gpu(tmp_path):
    """The whole check on a real GPU; TUNE_MOE_TEST_DEEP_GEMM_PATH points at a copied deep_gemm folder."""
    extra = os.environ.get("TUNE_MOE_TEST_DEEP_GEMM_PATH")
    if not extra and locate_deep_gemm(None) is None:
        pytest.skip("no DeepGEMM here; set TUNE_MOE_TEST_DEEP_GEMM_PATH")
    args = ["--json-out", str(tmp_path / "r.json"), "--experts", "8", "--reps", "3"]
    done = subprocess.run([sys.executable, "-m", "tuning.deepgemm.check", *args,
                           *(["--deep-gemm-path", extra] if extra else [])],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert all(c["value"]["calc_diff"] < PASS_DIFF for c in report["checks"] if c["name"].startswith("gemm."))
