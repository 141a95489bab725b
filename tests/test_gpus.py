"""GPU catalogue, vLLM's device-name rule (checked against vLLM itself), nvidia-smi parsing and the node check."""

import os
import shutil
from pathlib import Path

import pytest

from tuning.errors import UsageError
from tuning.gpus import (CATALOGUE, DetectedGpu, check_node, describe, detect_gpus, get_gpu, spec_for_name,
                         visible, vllm_device_name)

FAKE_SMI = Path(__file__).parent / "fixtures" / "foundation" / "bin" / "nvidia-smi"

# torch device name -> the device_name vLLM 0.33 puts in config file names.
DEVICE_NAMES = {
    "NVIDIA H200": "NVIDIA_H200",
    "NVIDIA H200 NVL": "NVIDIA_H200",
    "NVIDIA H200 141GB HBM3e": "NVIDIA_H200",
    # GH200 is not "H200" once split on "_": vLLM keeps its own name, so H200 configs do not apply to it.
    "NVIDIA GH200 144G HBM3e": "NVIDIA_GH200_144G_HBM3e",
    "NVIDIA H20": "NVIDIA_H20",
    "NVIDIA H20-3e": "NVIDIA_H20-3e",
    "NVIDIA B200": "NVIDIA_B200",
    "NVIDIA H100 80GB HBM3": "NVIDIA_H100_80GB_HBM3",
    "NVIDIA A100-SXM4-80GB": "NVIDIA_A100-SXM4-80GB",
    "NVIDIA RTX 6000/Ada  Generation": "NVIDIA_RTX_6000_Ada_Generation",
}


def gpu(name: str, index: int = 0) -> DetectedGpu:
    return DetectedGpu(index, name, 143771, "570.86.15")


@pytest.mark.parametrize("torch_name,expected", DEVICE_NAMES.items())
def test_vllm_device_name(torch_name, expected):
    assert vllm_device_name(torch_name) == expected


@pytest.mark.parametrize("key,device", [("H200", "NVIDIA_H200"), ("H20", "NVIDIA_H20"),
                                        ("H20-3e", "NVIDIA_H20-3e"), ("B200", "NVIDIA_B200")])
def test_catalogue_device_names_and_case_insensitive_keys(key, device):
    spec = get_gpu(key)
    assert spec.key == key and spec.device_name == device
    assert get_gpu(key.lower()) is spec and get_gpu(key.upper()) is spec
    assert spec_for_name(spec.torch_name) is spec


def test_catalogue_values_match_the_datasheets():
    h200, h20, h20e, b200 = (get_gpu(k) for k in ("H200", "H20", "H20-3e", "B200"))
    assert (h200.sms, h200.hbm_gb, h200.arch) == (132, 141, "sm90")
    assert (h20.sms, h20.hbm_gb, h20.arch) == (78, 96, "sm90")
    assert (h20e.sms, h20e.hbm_gb, h20e.arch) == (78, 141, "sm90")
    assert (b200.sms, b200.hbm_gb, b200.arch) == (148, 180, "sm100")
    assert (h200.peak_tflops("bf16"), h200.peak_tflops("fp8")) == (989, 1979)
    assert (h20.peak_tflops("bf16"), h20.peak_tflops("fp8")) == (148, 296)
    assert len({g.device_name for g in CATALOGUE.values()}) == len(CATALOGUE)


def test_h200_family_names_belong_to_the_h200_entry():
    h200 = get_gpu("H200")
    assert spec_for_name("NVIDIA H200 NVL") is h200
    assert spec_for_name("NVIDIA H200 141GB HBM3e") is h200
    assert spec_for_name("NVIDIA GH200 144G HBM3e") is None
    assert spec_for_name("NVIDIA H100 80GB HBM3") is None
    assert spec_for_name("NVIDIA H20") is get_gpu("H20")


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(UsageError) as err:
        get_gpu("A100")
    assert str(err.value) == "--gpu A100: unknown GPU; use one of H200, H20, H20-3e, B200"


# --- against vLLM's own naming ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fused_moe():
    return pytest.importorskip("vllm.model_executor.layers.fused_moe.fused_moe", reason="vLLM is not installed")


@pytest.fixture
def vllm_device(fused_moe, monkeypatch):
    """Make vLLM believe device 0 is called ``name`` (its platform call, below its cached name helper)."""
    from vllm.platforms import current_platform
    from vllm.utils import platform_utils

    def use(name: str) -> None:
        monkeypatch.setattr(current_platform, "get_device_name", lambda device_id=0: name)
        platform_utils.get_device_name_as_file_name.cache_clear()

    yield use
    monkeypatch.undo()
    platform_utils.get_device_name_as_file_name.cache_clear()


@pytest.mark.parametrize("torch_name", DEVICE_NAMES)
def test_device_name_matches_vllms_config_file_name(fused_moe, vllm_device, torch_name):
    vllm_device(torch_name)
    for dtype, block in ((None, None), ("fp8_w8a8", [128, 128]), ("fp8_w8a8", [64, 64])):
        ours = f"E=288,N=320,device_name={vllm_device_name(torch_name)}"
        ours += (f",dtype={dtype}" if dtype else "") + (f",block_shape=[{block[0]},{block[1]}]" if block else "")
        assert fused_moe.get_config_file_name(288, 320, dtype, block) == ours + ".json"


# --- nvidia-smi ------------------------------------------------------------------------------


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    """PATH holds only a fake nvidia-smi; returns a setter for the rows it prints."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(FAKE_SMI, bin_dir / "nvidia-smi")
    os.chmod(bin_dir / "nvidia-smi", 0o755)
    monkeypatch.setenv("PATH", str(bin_dir))

    def rows(*lines: str, exit_code: int = 0) -> None:
        monkeypatch.setenv("FAKE_NVIDIA_SMI_ROWS", "\n".join(lines))
        monkeypatch.setenv("FAKE_NVIDIA_SMI_EXIT", str(exit_code))

    return rows


def test_detect_gpus_parses_nvidia_smi_csv(fake_smi):
    fake_smi("0, NVIDIA H200, 143771, 570.86.15", "1, NVIDIA H200 NVL, 143771, 570.86.15",
             "2, NVIDIA H20, [N/A], 570.86.15")
    assert detect_gpus() == [DetectedGpu(0, "NVIDIA H200", 143771, "570.86.15"),
                             DetectedGpu(1, "NVIDIA H200 NVL", 143771, "570.86.15"),
                             DetectedGpu(2, "NVIDIA H20", 0, "570.86.15")]


def test_detect_gpus_skips_lines_that_are_not_gpu_rows(fake_smi):
    fake_smi("No devices were found", "index, name, memory.total, driver_version", "3, NVIDIA B200, 183359, 575.51")
    assert detect_gpus() == [DetectedGpu(3, "NVIDIA B200", 183359, "575.51")]


def test_detect_gpus_is_empty_when_nvidia_smi_fails(fake_smi):
    fake_smi("0, NVIDIA H200, 143771, 570.86.15", exit_code=9)
    assert detect_gpus() == []


def test_detect_gpus_is_empty_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_gpus() == []


# --- CUDA_VISIBLE_DEVICES ----------------------------------------------------------------------


def test_visible_gpus_follow_cuda_visible_devices():
    node = [gpu("NVIDIA H200", i) for i in range(8)]
    assert visible(node, None) == node
    assert visible(node, "3,1") == [node[3], node[1]]
    assert visible(node, "0, 9") == [node[0]]  # an index the node lacks gives no GPU
    assert visible(node, "GPU-5bc8fd87-b951-ace4-6773-6c16aa4545d6,GPU-ff4ae3ba") == node[:2]  # UUIDs: their count
    assert visible([], "0,1") == []  # no GPU here: the node check says so
    for hidden in ("", " ", "9"):
        with pytest.raises(UsageError) as refusal:
            visible(node, hidden)
        assert str(refusal.value) == (f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU of this node (8x NVIDIA H200); "
                                      "unset it, or list the GPUs to use (e.g. CUDA_VISIBLE_DEVICES=0,1)")


# --- the node check --------------------------------------------------------------------------


def test_describe_counts_each_model():
    assert describe([]) == "no NVIDIA GPU"
    assert describe([gpu("NVIDIA H20", i) for i in range(8)]) == "8x NVIDIA H20"
    mixed = [gpu("NVIDIA H200", 0), gpu("NVIDIA H20", 1), gpu("NVIDIA H200", 2)]
    assert describe(mixed) == "1x NVIDIA H20 + 2x NVIDIA H200"


def test_check_node_accepts_the_h200_family():
    check_node(get_gpu("H200"), [gpu("NVIDIA H200", 0), gpu("NVIDIA H200 NVL", 1)])
    check_node(get_gpu("H20-3e"), [gpu("NVIDIA H20-3e")])


def test_check_node_without_gpu_points_to_dry_run():
    with pytest.raises(UsageError) as err:
        check_node(get_gpu("H200"), [])
    assert "no NVIDIA GPU" in str(err.value) and "--dry-run" in str(err.value)


@pytest.mark.parametrize("key,found,named", [
    ("H200", ["NVIDIA H20"] * 8, "8x NVIDIA H20"),
    ("H20", ["NVIDIA H20-3e"] * 4, "4x NVIDIA H20-3e"),
    ("H20-3e", ["NVIDIA H20"] * 2, "2x NVIDIA H20"),
    ("H200", ["NVIDIA GH200 144G HBM3e"], "1x NVIDIA GH200 144G HBM3e"),
    ("B200", ["NVIDIA B200"] * 7 + ["NVIDIA H200"], "7x NVIDIA B200 + 1x NVIDIA H200"),
])
def test_check_node_refuses_other_gpus_and_names_them(key, found, named):
    with pytest.raises(UsageError) as err:
        check_node(get_gpu(key), [gpu(n, i) for i, n in enumerate(found)])
    msg = str(err.value)
    assert f"this node has {named}, not {get_gpu(key).torch_name}" in msg
    assert "--dry-run" in msg
