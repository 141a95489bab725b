"""The vLLM -> torch -> Triton pins, the Triton this process compiles with, and the drift line."""

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tuning.vllm import triton_pins as tp
from tuning.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def _installed(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _fake_installed(monkeypatch, versions, requires):
    """Installed-package metadata as the module reads it: versions and Requires-Dist by name."""
    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: requires.get(name))


def _wheel(folder: Path, version: str, requires: list[str]) -> Path:
    path = folder / f"vllm-{version}-cp38-abi3-manylinux_2_28_x86_64.whl"
    metadata = "\n".join(
        ["Metadata-Version: 2.4", "Name: vllm", f"Version: {version}"]
        + [f"Requires-Dist: {r}" for r in requires]
        + ["", "Requires-Dist: torch==0.0.1 in the description is not a requirement", ""]
    )
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("vllm/__init__.py", "")
        zf.writestr(f"vllm-{version}.dist-info/METADATA", metadata)
        zf.writestr(f"vllm-{version}.dist-info/RECORD", "")
    return path


def _fake_triton(folder: Path, version: str, package: bool = True) -> Path:
    """What `pip install --target folder triton==version` leaves: the package and its dist-info."""
    dist = folder / f"triton-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: triton\nVersion: {version}\n")
    if package:
        (folder / "triton").mkdir()
        (folder / "triton" / "__init__.py").write_text("raise ImportError('this fake triton must never be imported')\n")
    return folder


# --- the known table -------------------------------------------------------------------------


def test_known_table_has_vllm_0_33_on_torch_2_14_and_triton_3_8():
    assert tp.KNOWN["0.33.0"] == tp.Pin(vllm="0.33.0", torch="2.14.0", triton="3.8.0", how="known table")


@pytest.mark.parametrize(
    "vllm, torch, triton",
    [("0.16.0", "2.9.1", "3.5.1"), ("0.17.0", "2.10.0", "3.6.0"), ("0.20.0", "2.11.0", "3.6.0"), ("0.26.0", "2.11.0", "3.6.0"),
     ("0.27.0", "2.13.0", "3.7.1")],
)
def test_known_table_older_releases(vllm, torch, triton):
    pin = tp.KNOWN[vllm]
    assert (pin.torch, pin.triton) == (torch, triton)


def test_known_table_covers_every_minor_from_0_16_to_0_34_and_every_torch_it_names():
    assert list(tp.KNOWN) == [f"0.{minor}.0" for minor in range(16, 35)]
    assert set(tp.VLLM_TORCH.values()) == set(tp.TORCH_TRITON)


# --- target_triton ---------------------------------------------------------------------------


@pytest.mark.parametrize("asked", ["0.33", "0.33.0"])
def test_target_triton_from_the_installed_vllm(asked):
    vllm, torch = _installed("vllm"), _installed("torch")
    if not (vllm and vllm.startswith("0.33.0") and torch and torch.startswith("2.14.0")):
        pytest.skip(f"needs vLLM 0.33.0 and torch 2.14.0 installed (have vLLM {vllm}, torch {torch})")
    imported = "vllm" in sys.modules
    pin = tp.target_triton(asked)
    assert pin == tp.Pin(vllm=vllm, torch="2.14.0", triton="3.8.0", how="installed vLLM's requirements")
    assert ("vllm" in sys.modules) == imported  # read from metadata, never imported


def test_the_installed_vllm_pins_the_flashinfer_the_table_names():
    vllm = _installed("vllm")
    if not (vllm and vllm.startswith("0.33.0")):
        pytest.skip(f"needs vLLM 0.33.0 installed (have {vllm})")
    pinned = tp._pinned_version(importlib.metadata.requires("vllm"), "flashinfer-python")
    assert pinned == tp.flashinfer_pin("0.33.0") == tp.flashinfer_pin("0.33") == "0.7.2.post1"
    assert tp.flashinfer_pin("0.16.0") is None


def test_target_triton_installed_vllm_with_another_torch_takes_triton_from_the_table(monkeypatch):
    _fake_installed(
        monkeypatch,
        {"vllm": "0.40.1", "torch": "2.14.0"},
        {"vllm": ['torch==2.13.0+cpu; platform_system == "Darwin"', 'torch==2.13.0; platform_system == "Linux"']},
    )
    pin = tp.target_triton("0.40")
    assert pin == tp.Pin(
        vllm="0.40.1", torch="2.13.0", triton="3.7.1", how="installed vLLM's requirements; Triton from the known table"
    )
    assert tp.target_triton("0.40.0") is None  # the full version given must match: 0.40.1 is installed


def test_target_triton_installed_torch_answers_for_its_own_triton(monkeypatch):
    _fake_installed(
        monkeypatch,
        {"vllm": "0.41.0", "torch": "2.15.0+cu130"},
        {"vllm": ["torch==2.15.0"], "torch": ['triton==3.9.0; platform_system == "Linux" and platform_machine == "x86_64"']},
    )
    assert tp.target_triton("0.41.0") == tp.Pin(
        vllm="0.41.0", torch="2.15.0", triton="3.9.0", how="installed vLLM's requirements"
    )


@pytest.mark.parametrize("asked", ["0.33", "0.33.0", "0.33.2"])
def test_target_triton_from_the_table_by_major_minor(monkeypatch, asked):
    _fake_installed(monkeypatch, {}, {})  # no vLLM, no torch
    assert tp.target_triton(asked) == tp.KNOWN["0.33.0"]


def test_target_triton_uses_the_table_when_the_installed_vllm_is_another_release(monkeypatch):
    _fake_installed(monkeypatch, {"vllm": "0.33.0", "torch": "2.14.0"}, {"vllm": ["torch==2.14.0"]})
    assert tp.target_triton("0.16") == tp.Pin(vllm="0.16.0", torch="2.9.1", triton="3.5.1", how="known table")


@pytest.mark.parametrize("compiling,drift", [("3.6.0", False), ("3.8.0", True)])
def test_tuning_for_vllm_0_26_on_the_h200_machines_own_torch_and_triton(monkeypatch, compiling, drift):
    """The H200 machine: torch 2.11.0+cu130 (its METADATA pins triton==3.6.0 on Linux), no vLLM, Triton 3.6.0."""
    from types import SimpleNamespace

    from tuning.vllm.kernel import KernelSource
    from tuning.tune import triton_target

    _fake_installed(monkeypatch, {"torch": "2.11.0+cu130"}, {"torch": ['triton==3.6.0; platform_system == "Linux"']})
    monkeypatch.setattr("tuning.tune.compiling_triton", lambda: compiling)
    plan, source = SimpleNamespace(vllm_version="0.26"), KernelSource("fused_moe_v026.py", "0.26")
    if drift:
        with pytest.raises(UsageError, match=r"^vLLM 0\.26\.0 runs Triton 3\.6\.0 \(torch 2\.11\.0 pins it\) but this "
                                             r"node compiles with Triton 3\.8\.0: .* install Triton 3\.6\.0"):
            triton_target(plan, source, allow=False)
        return
    target = triton_target(plan, source, allow=False)
    assert (target.vllm, target.torch, target.triton, target.mismatch_allowed) == ("0.26.0", "2.11.0", "3.6.0", False)


@pytest.mark.parametrize("asked", ["0.99.0", "0.15", "1.0"])
def test_target_triton_unknown_release_is_none(asked):
    assert tp.target_triton(asked) is None


def test_target_triton_from_a_wheel_metadata(tmp_path):
    wheel = _wheel(tmp_path, "0.20.0", ['torch==2.11.0; platform_system == "Linux"', "torchaudio==2.11.0", "regex"])
    pin = tp.target_triton("0.20", str(wheel))
    assert (pin.vllm, pin.torch, pin.triton) == ("0.20.0", "2.11.0", "3.6.0")  # torch 2.11.0 pins triton==3.6.0
    assert pin.how.startswith(f"vLLM wheel METADATA {wheel}")
    if not (_installed("torch") or "").startswith("2.11.0"):
        assert pin.how == f"vLLM wheel METADATA {wheel}; Triton from the known table"


def test_target_triton_wheel_errors_are_one_line(tmp_path):
    cases = [
        (str(_wheel(tmp_path, "0.20.0", ["torch==2.11.0"])), "0.33", "is vLLM 0.20.0, not 0.33"),
        (str(_wheel(tmp_path, "0.21.0", ["torch>=2.0"])), "0.21", "pins no torch==X"),
        (str(tmp_path / "missing.whl"), "0.33", "no such file"),
        (str(tmp_path / "vllm.tar.gz"), "0.33", "not a .whl file"),
    ]
    (tmp_path / "broken.whl").write_text("not a zip")
    cases.append((str(tmp_path / "broken.whl"), "0.33", "not a zip file"))
    for source, asked, problem in cases:
        with pytest.raises(UsageError, match=problem) as err:
            tp.target_triton(asked, source)
        assert "\n" not in str(err.value) and "; " in str(err.value)


def test_target_triton_refuses_a_version_that_is_not_one():
    with pytest.raises(UsageError, match="not MAJOR.MINOR"):
        tp.target_triton("latest")


# --- requirement markers ---------------------------------------------------------------------


@pytest.fixture(params=["packaging", "regex"])
def parser(request, monkeypatch):
    if request.param == "regex":
        monkeypatch.setattr(tp, "Requirement", None)
    elif tp.Requirement is None:
        pytest.skip("packaging is not installed")
    return request.param


@pytest.mark.parametrize(
    "lines, name, expected",
    [
        (['torch==2.14.0; platform_system == "Linux"'], "torch", "2.14.0"),
        (['torch==2.14.0+cpu; platform_system == "Darwin"', 'torch==2.14.0; platform_system == "Linux"'], "torch", "2.14.0"),
        (['triton==3.8.0; platform_system == "Linux" and platform_machine == "x86_64"'], "triton", "3.8.0"),
        (['triton==3.8.0; platform_system == "Linux" and platform_machine == "aarch64"'], "triton", None),
        (['triton~=3.8.0; platform_system == "Linux" and python_version < "3.15"'], "triton", "3.8.0"),
        (['zentorch==2.14.0.1; extra == "zen"', "torchaudio==2.11.0", "torch==2.14.0"], "torch", "2.14.0"),
        (['torch==2.14.0; extra == "zen"'], "torch", None),
        (["torch>=2.4", "torch==2.*"], "torch", None),
        (["Torch == 2.14.0"], "torch", "2.14.0"),
        ([], "torch", None),
        (None, "torch", None),
    ],
)
def test_pinned_version_reads_markers_for_linux_x86_64(parser, lines, name, expected):
    assert tp._pinned_version(lines, name) == expected


# --- compiling_triton ------------------------------------------------------------------------


def test_importlib_metadata_takes_the_first_triton_on_sys_path(tmp_path, monkeypatch):
    """How importlib.metadata resolves a name: the first sys.path entry holding its dist-info."""
    monkeypatch.syspath_prepend(str(_fake_triton(tmp_path, "9.9.9", package=False)))
    assert importlib.metadata.version("triton") == "9.9.9"


def test_compiling_triton_honours_sys_path_order(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.syspath_prepend(str(_fake_triton(tmp_path, "9.9.9")))
    assert tp.compiling_triton() == "9.9.9"
    assert "triton" not in sys.modules  # found, not imported


def test_compiling_triton_reads_the_dist_info_beside_the_package_import_would_load(tmp_path, monkeypatch):
    """A stray dist-info first on sys.path does not move `import triton`; the version follows the package."""
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    installed = _installed("triton")
    if installed is None or importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton installed")
    monkeypatch.syspath_prepend(str(_fake_triton(tmp_path, "9.9.9", package=False)))
    assert tp.compiling_triton() == installed != "9.9.9"


def test_compiling_triton_without_triton_is_none(monkeypatch):
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    _fake_installed(monkeypatch, {}, {})
    assert tp.compiling_triton() is None


def test_pythonpath_folder_wins_and_nothing_heavy_is_imported(tmp_path):
    """PYTHONPATH=<folder holding triton 3.8.0> in a fresh process, with torch, vLLM and Triton unimportable."""
    folder = _fake_triton(tmp_path / "t38", "3.8.0")
    code = (
        "import sys\n"
        "for name in ('torch', 'vllm'): sys.modules[name] = None\n"
        "from tuning.vllm import triton_pins as tp\n"
        "print(tp.compiling_triton())\n"
        "print(sorted(n for n in ('torch', 'vllm', 'triton') if sys.modules.get(n) is not None))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["3.8.0", "[]"]


# --- mismatch --------------------------------------------------------------------------------


def test_mismatch_names_the_drift_in_one_line():
    pin = tp.Pin(vllm="0.33.0", torch="2.14.0", triton="3.8.0", how="known table")
    assert tp.mismatch(pin, "3.6.0") == (
        "vLLM 0.33.0 runs Triton 3.8.0 (torch 2.14.0 pins it) but this node compiles with Triton 3.6.0"
    )
    assert tp.mismatch(pin, "3.8.1") is not None


@pytest.mark.parametrize("compiling", ["3.8.0", "3.8", "3.8.0+git4f2e1a"])
def test_mismatch_none_when_major_minor_patch_agree(compiling):
    pin = tp.Pin(vllm="0.33.0", torch="2.14.0", triton="3.8.0", how="known table")
    assert tp.mismatch(pin, compiling) is None
