"""Tuned configs load through vLLM's own loader, for the device they are for.

Every ``kernels_configs/vllm-<release>/<device>/E=*.json`` must be found by vLLM's ``get_moe_configs``
under that device's name (patched in: there is no GPU here) and give back exactly what
``tuning.configs.read_config_file`` reads, with a valid sidecar; ``try_get_optimal_moe_config``
must pick vLLM's nearest batch key. Each file must be a tune for its folder's release: tuned under it, or under
one whose launch of that shape the release keeps (``vllm_rules.launch_changes``, the rule ``bake`` applies). The
image recipe (docker/Dockerfile.vllm-tuned) copies the image's release folder and checks it with vLLM's loader;
its script runs here against the installed vLLM. The round-trip tests write files with ``write_config_file`` and
need no committed config.
"""

from __future__ import annotations

from pathlib import Path

import os
import re
import subprocess
import sys

import pytest

from tuning import provenance
from tuning.configs import RELEASE, TileConfig, read_config_file, write_config_file
from tuning.provenance import SUFFIX as PROVENANCE_SUFFIX, sidecar_path as provenance_path
from tuning.gpus import CATALOGUE
from tuning.report import load_sidecar
from tuning.shapes import BATCH_SIZES, FILE_NAME, MoeShape, parse_version
from tuning.vllm.rules import LAUNCH_RULES, launch_changes

fused_moe = pytest.importorskip("vllm.model_executor.layers.fused_moe.fused_moe",
                                reason="vLLM is not installed (pip install -e '.[vllm]')")

ROOT = Path(__file__).resolve().parents[1] / "kernels_configs"
HIDDEN, TOP_K = 4096, 8
NAME = FILE_NAME
REPORT_FILES = {"REPORT.md", "summary.json", "plots"}


def is_config(name: str) -> bool:
    return bool(NAME.match(name)) and not name.endswith(PROVENANCE_SUFFIX)


COMMITTED = sorted(p for p in ROOT.glob("vllm-*/*/*.json") if is_config(p.name)) if ROOT.is_dir() else []
FILES = [pytest.param(p, id=f"{p.parent.parent.name}/{p.parent.name}/{p.name}") for p in COMMITTED] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no configs committed under kernels_configs/vllm-*/<device>/ yet"))]
DOCKERFILE = Path(__file__).resolve().parents[1] / "docker" / "Dockerfile.vllm-tuned"
# Probes between and beyond the keys, where the nearest key is not obvious.
PROBES = (1, 3, 5, 20, 28, 40, 56, 80, 100, 112, 192, 384, 768, 1280, 1792, 2560, 3584, 5000, 10000)


def shape_of(name: str) -> MoeShape:
    m = NAME.match(name)
    assert m, f"{name} is not a vLLM fused-MoE config name"
    block = (int(m.group(5)), int(m.group(6))) if m.group(5) else None
    dtype = "fp8" if m.group(4) == "fp8_w8a8" else "bf16"
    return MoeShape(int(m.group(1)), 288, int(m.group(2)), HIDDEN, TOP_K, dtype, block)


def device_of(name: str) -> str:
    return NAME.match(name).group(3)


@pytest.fixture
def use_vllm(monkeypatch):
    """Point vLLM's loader at ``folder`` as if it ran on a GPU vLLM names ``device``."""

    def use(folder: Path, device: str) -> None:
        monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(folder))
        monkeypatch.setattr(fused_moe, "get_device_name_as_file_name", lambda device_id=0: device)
        fused_moe.get_moe_configs.cache_clear()

    yield use
    fused_moe.get_moe_configs.cache_clear()


def vllm_file_map(shape: MoeShape) -> dict | None:
    block = shape.block_shape or (None, None)
    return fused_moe.get_moe_configs(shape.num_experts, shape.n, shape.vllm_dtype, block[0], block[1])


def vllm_pick(shape: MoeShape, m: int) -> dict:
    """The config vLLM's fused MoE would run at batch ``m``: w1 [E, 2N, K], w2 [E, K, N]."""
    w1 = (shape.num_experts, 2 * shape.n, shape.k)
    w2 = (shape.num_experts, shape.k, shape.n)
    block = list(shape.block_shape) if shape.block_shape else None
    return fused_moe.try_get_optimal_moe_config(w1, w2, shape.top_k, shape.vllm_dtype, m, block)


def assert_vllm_reads(path: Path, shape: MoeShape) -> dict[int, TileConfig]:
    ours = read_config_file(path)
    assert vllm_file_map(shape) == {m: c.to_dict() for m, c in ours.items()}
    keys = sorted(ours)  # the file lists keys ascending, so a tie goes to the smaller key, as in min()
    for m in sorted(set(PROBES) | set(keys)):
        nearest = min(keys, key=lambda k: abs(k - m))
        assert vllm_pick(shape, m) == ours[nearest].to_dict(), f"M={m} should use key {nearest}"
    return ours


# ---- the folder scheme ---------------------------------------------------------------------------

def test_folder_names_are_the_device_names_vllm_looks_up(monkeypatch):
    from vllm.platforms import current_platform

    names = [(g.torch_name, g.device_name) for g in CATALOGUE.values()] + [("NVIDIA H200 NVL", "NVIDIA_H200")]
    cached = fused_moe.get_device_name_as_file_name  # vLLM caches the name: clear it per GPU and after
    try:
        for torch_name, folder in names:
            monkeypatch.setattr(current_platform, "get_device_name", lambda device_id=0, n=torch_name: n)
            cached.cache_clear()
            vllm_name = fused_moe.get_config_file_name(72, 1280, "fp8_w8a8", [128, 128])
            assert device_of(vllm_name) == folder, torch_name
    finally:
        cached.cache_clear()


def test_committed_tree_follows_the_scheme():
    if not ROOT.is_dir():
        pytest.skip("kernels_configs/ is not in this checkout")
    devices = {g.device_name for g in CATALOGUE.values()}
    ruled = {rules.read_in for rules in LAUNCH_RULES}
    releases = list(ROOT.iterdir())
    assert releases, "kernels_configs/ is empty"
    for release in releases:
        assert release.is_dir() and RELEASE.fullmatch(release.name), f"{release}: only kernels_configs/vllm-X.Y/ folders"
        assert parse_version(release.name[5:]) in ruled, f"{release}: tune-moe has no launch rules read for it"
        folders = list(release.iterdir())
        assert folders, f"{release} is empty"
        for folder in folders:
            assert folder.is_dir() and folder.name in devices, f"{folder}: only vllm-X.Y/<device_name>/ folders"
            check_device_folder(folder)


def check_device_folder(folder: Path) -> None:
    for entry in folder.iterdir():
        if is_config(entry.name):
            assert device_of(entry.name) == folder.name, f"{entry} is in another device's folder"
        elif entry.name.endswith(PROVENANCE_SUFFIX):
            config = entry.with_name(entry.name.removesuffix(PROVENANCE_SUFFIX) + ".json")
            assert config.is_file(), f"{entry} has no config beside it"
        else:
            assert entry.name in REPORT_FILES, f"{entry}: not a config, sidecar or report file"


# ---- files written by tune-moe round-trip through vLLM's loader ----------------------------------

ROUND_TRIP = [
    pytest.param(MoeShape(288, 288, 320, HIDDEN, TOP_K, "bf16"), id="bf16-E288-N320"),
    pytest.param(MoeShape(72, 288, 1280, HIDDEN, TOP_K, "fp8", (128, 128)), id="fp8-E72-N1280-128"),
    pytest.param(MoeShape(288, 288, 320, HIDDEN, TOP_K, "fp8", (64, 64)), id="fp8-E288-N320-64"),
]


@pytest.mark.parametrize("shape", ROUND_TRIP)
def test_written_config_is_what_vllm_loads(shape: MoeShape, tmp_path: Path, use_vllm):
    # A different config per batch size, so a wrong nearest-key pick is visible.
    configs = {m: TileConfig(16 if m < 64 else 64, 64, 128 if shape.block_shape else 64, i + 1, 4, 3)
               for i, m in enumerate(BATCH_SIZES)}
    name = shape.file_name("NVIDIA_H200")
    write_config_file(tmp_path / name, configs, "3.6.0")
    use_vllm(tmp_path, "NVIDIA_H200")
    block = list(shape.block_shape) if shape.block_shape else None
    assert fused_moe.get_config_file_name(shape.num_experts, shape.n, shape.vllm_dtype, block) == name
    assert assert_vllm_reads(tmp_path / name, shape) == configs
    assert vllm_pick(shape, 100) == configs[96].to_dict()  # |96-100| < |128-100|
    assert vllm_pick(shape, 112) == configs[96].to_dict()  # a tie: the smaller key comes first
    use_vllm(tmp_path, "NVIDIA_H20")
    assert vllm_file_map(shape) is None  # the same file is not used on another GPU


# ---- every committed config ----------------------------------------------------------------------

@pytest.mark.parametrize("path", FILES)
def test_committed_config_loads_in_vllm(path: Path, use_vllm):
    device = path.parent.name
    assert device_of(path.name) == device, f"{path.name} sits in {device}/"
    use_vllm(path.parent, device)
    assert_vllm_reads(path, shape_of(path.name))


@pytest.mark.parametrize("path", FILES)
def test_committed_config_is_a_tune_for_its_release(path: Path):
    """A file in vllm-0.34/ was tuned under 0.34, or under a release that launches its shape as 0.34 does."""
    release = path.parent.parent.name.removeprefix("vllm-")
    prov = provenance.read(path)
    tuned, changes = ".".join(prov.run.vllm.split(".")[:2]), launch_changes(prov.run.vllm, release, prov.shape)
    assert tuned == release or not changes, f"{path}: tuned under vLLM {prov.run.vllm}, and {release} {' and '.join(changes)}"
    assert parse_version(prov.run.vllm) <= parse_version(release), f"{path}: tuned under a later vLLM than its folder's"


@pytest.mark.parametrize("path", FILES)
def test_committed_config_has_its_sidecar(path: Path):
    sidecar = provenance_path(path)
    assert sidecar.is_file(), f"{path.name} is committed without {sidecar.name}"
    report = load_sidecar(sidecar)  # raises on a missing key, a wrong shape or a wrong file name
    assert report.file == path.name and report.device == path.parent.name
    ours = read_config_file(path)
    assert all(ours.get(row.m) == row.tuned for row in report.rows), "sidecar and config disagree"
    assert not provenance.read(path).empty_launches, (
        f"{path.name}: batch sizes tuned on a launch with no slot on the GPU; re-tune them (provenance.empty_launches)")


# ---- the image recipe ------------------------------------------------------------------------------

def dockerfile_script() -> str:
    """The python the image build runs (the heredoc of docker/Dockerfile.vllm-tuned)."""
    m = re.search(r"python3 - <<'EOF'\n(.*?)\nEOF\n", DOCKERFILE.read_text(), re.S)
    assert m, f"{DOCKERFILE}: no python heredoc"
    return m.group(1)


def run_image_script(configs: Path, target: Path, device: str = "NVIDIA_H200") -> subprocess.CompletedProcess:
    env = {**os.environ, "DEVICE": device, "TUNE_MOE_CONFIGS": str(configs), "VLLM_TUNED_CONFIG_FOLDER": str(target)}
    return subprocess.run([sys.executable, "-c", dockerfile_script()], env=env, capture_output=True, text=True,
                          timeout=600)


def test_image_recipe_copies_the_release_folder_of_its_vllm_and_vllm_loads_each_file(tmp_path: Path):
    import vllm

    release = "vllm-" + ".".join(vllm.__version__.split(".")[:2])
    source = ROOT / release / "NVIDIA_H200"
    if not source.is_dir():
        pytest.skip(f"no {source} committed")
    done = run_image_script(ROOT, tmp_path / "configs")
    assert done.returncode == 0, done.stderr[-2000:]
    names = sorted(p.name for p in source.glob("E=*.json") if is_config(p.name))
    assert done.stdout.splitlines() == [f"vLLM {vllm.__version__} loads {release}/NVIDIA_H200/{n}" for n in names]
    copied = sorted(p.name for p in (tmp_path / "configs").iterdir())
    assert copied == sorted(p.name for p in source.iterdir())
    for n in names:
        assert (tmp_path / "configs" / n).read_bytes() == (source / n).read_bytes()


def test_image_recipe_refuses_a_vllm_with_no_release_folder(tmp_path: Path):
    import vllm

    other = tmp_path / "kernels_configs" / "vllm-0.1" / "NVIDIA_H200"
    other.mkdir(parents=True)
    done = run_image_script(tmp_path / "kernels_configs", tmp_path / "configs")
    release = ".".join(vllm.__version__.split(".")[:2])
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        f"no kernels_configs/vllm-{release}/NVIDIA_H200: this image runs vLLM {vllm.__version__}, and configs for "
        f"NVIDIA_H200 are tuned for vllm-0.1; tune for it (tune-moe --gpu ... --vllm-version {vllm.__version__}) or "
        "build with that release's VLLM_VERSION")
    assert not (tmp_path / "configs").exists()
