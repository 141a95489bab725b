"""vLLM's tuned-config file contract (tuning/configs.py): what is written, how, what is refused, and vLLM reading it."""

import json
import os
import stat

import pytest

from conftest import provenance_for
from tuning import files, provenance
from tuning.configs import FIELDS, TileConfig, merge, read_config_file, write_config_file
from tuning.errors import UsageError

EP4 = "E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
BF16_TP4 = "E=288,N=320,device_name=NVIDIA_H200.json"
A = TileConfig(16, 64, 128, 1, 4, 3)
B = TileConfig(64, 128, 128, 16, 8, 4)
C = TileConfig(128, 128, 64, 32, 8, 3)
CONFIGS = {1024: C, 1: A, 16: B, 2: A, 256: B}


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def entry(**over) -> dict:
    return {**A.to_dict(), **over}


def test_written_file_is_exactly_vllms_format(tmp_path):
    path = tmp_path / EP4
    write_config_file(path, CONFIGS, "3.8.0")
    text = path.read_text()
    data = json.loads(text)
    assert list(data) == ["1", "2", "16", "256", "1024", "triton_version"]  # numeric order, not string order
    assert data["triton_version"] == "3.8.0"
    assert data["16"] == {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 16,
                          "num_warps": 8, "num_stages": 4}
    for key in ("1", "2", "16", "256", "1024"):
        assert list(data[key]) == list(FIELDS)
    assert text.endswith("}\n")
    assert read_config_file(path) == CONFIGS


def test_tile_config_short_form_round_trips():
    assert A.short == "M16-N64-K128-G1-w4-s3"
    assert TileConfig.from_short(A.short) == A
    assert TileConfig.from_dict({**B.to_dict(), "extra": 1}) == B


def test_atomic_write_leaves_only_the_file(tmp_path):
    path = tmp_path / "NVIDIA_H200" / EP4  # the folder is created
    write_config_file(path, CONFIGS, "3.8.0")
    write_config_file(path, {1: B}, "3.8.0")
    assert os.listdir(path.parent) == [EP4]
    assert read_config_file(path) == {1: B}


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / EP4
    write_config_file(path, CONFIGS, "3.8.0")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", boom)
    with pytest.raises(OSError, match="No space left"):
        write_config_file(path, {1: B}, "3.8.0")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [EP4]


def test_empty_configs_are_not_written(tmp_path):
    with pytest.raises(ValueError, match="no batch sizes"):
        write_config_file(tmp_path / EP4, {}, "3.8.0")
    assert not (tmp_path / EP4).exists()


def test_file_is_readable_by_others(tmp_path, umask022):
    path = tmp_path / EP4
    write_config_file(path, CONFIGS, "3.8.0")
    provenance.write(path, provenance_for(path, CONFIGS))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(provenance.sidecar_path(path).stat().st_mode) == 0o644


def test_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        write_config_file(tmp_path / EP4, CONFIGS, "3.8.0")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / EP4).stat().st_mode) == 0o600


# --- reading: what vLLM's loader would choke on is refused -----------------------------------


@pytest.mark.parametrize("content,match", [
    ('{"1": {', "unreadable or corrupt JSON"),
    ("[]", "not a vLLM MoE config"),
    ('{"triton_version": "3.8.0"}', "holds no batch sizes"),
    (json.dumps({"1": entry(), "tool": "tune-moe"}), "key 'tool' is not a batch size"),
    (json.dumps({"1": entry(), "provenance": {}}), "key 'provenance' is not a batch size"),
    (json.dumps({"1": {k: v for k, v in entry().items() if k != "num_stages"}}), "batch 1 must hold exactly"),
    (json.dumps({"1": entry(waves_per_eu=0)}), "batch 1 must hold exactly"),
    (json.dumps({"1": entry(BLOCK_SIZE_M="16")}), "batch 1 must hold exactly"),
    (json.dumps({"1": entry(num_warps=4.0)}), "batch 1 must hold exactly"),
    (json.dumps({"1": entry(num_warps=None)}), "batch 1 must hold exactly"),
    (json.dumps({"1": [16, 64]}), "batch 1 must hold exactly"),
])
def test_read_refuses(tmp_path, content, match):
    path = tmp_path / EP4
    path.write_text(content)
    with pytest.raises(UsageError) as err:
        read_config_file(path)
    assert str(err.value).startswith(f"{path}: ")
    assert match in str(err.value)


def test_read_refuses_booleans(tmp_path):
    path = tmp_path / EP4
    path.write_text(json.dumps({"1": entry(GROUP_SIZE_M=True)}))
    with pytest.raises(UsageError, match="batch 1 must hold exactly"):
        read_config_file(path)


def test_read_of_a_missing_file(tmp_path):
    with pytest.raises(UsageError, match="unreadable or corrupt JSON"):
        read_config_file(tmp_path / EP4)


def test_read_accepts_a_file_without_triton_version(tmp_path):
    path = tmp_path / EP4
    path.write_text(json.dumps({"64": B.to_dict(), "8": A.to_dict()}))
    assert read_config_file(path) == {8: A, 64: B}


def test_merge_keeps_old_batch_sizes_and_new_entries_win():
    assert merge({1: A, 16: A, 4096: C}, {16: B, 64: B}) == {1: A, 16: B, 64: B, 4096: C}
    assert merge({}, {1: A}) == {1: A}


# --- through vLLM's own loader ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fused_moe():
    return pytest.importorskip("vllm.model_executor.layers.fused_moe.fused_moe", reason="vLLM is not installed")


@pytest.mark.parametrize("name,args", [
    (EP4, (72, 1280, "fp8_w8a8", 128, 128)),
    ("E=288,N=320,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[64,64].json", (288, 320, "fp8_w8a8", 64, 64)),
    (BF16_TP4, (288, 320, None, None, None)),
])
def test_vllm_loader_reads_back_exactly_what_was_written(fused_moe, tmp_path, monkeypatch, name, args):
    write_config_file(tmp_path / name, CONFIGS, "3.8.0")
    provenance.write(tmp_path / name, provenance_for(tmp_path / name, CONFIGS))  # a sidecar must not disturb vLLM
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", str(tmp_path))
    monkeypatch.setattr(fused_moe, "get_device_name_as_file_name", lambda device_id=0: "NVIDIA_H200")
    fused_moe.get_moe_configs.cache_clear()
    try:
        loaded = fused_moe.get_moe_configs(*args)
    finally:
        fused_moe.get_moe_configs.cache_clear()
    assert loaded == {m: c.to_dict() for m, c in CONFIGS.items()}
    assert all(type(k) is int for k in loaded)
