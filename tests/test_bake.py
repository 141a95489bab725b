"""``tune-moe bake``: validate a device folder, install it atomically, print the environment."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest

from tuning import bake
from tuning.cli import main
from conftest import provenance_for
from tuning import provenance
from tuning.configs import TileConfig, read_config_file, write_config_file
from tuning.provenance import sidecar_path as provenance_path
from tuning.errors import UsageError

DEVICE = "NVIDIA_H200"
FP8 = "E=72,N=1280,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json"
BF16 = "E=288,N=320,device_name=NVIDIA_H200.json"
TILE = TileConfig(16, 64, 128, 1, 4, 3)


@pytest.fixture
def configs(tmp_path: Path) -> Path:
    root = tmp_path / "kernels_configs" / "vllm-0.33"  # one release's folder, as the repository lays them out
    for name in (FP8, BF16):
        write_config_file(root / DEVICE / name, {1: TILE, 96: TILE}, "3.6.0")
    provenance.write(root / DEVICE / FP8, provenance_for(root / DEVICE / FP8, read_config_file(root / DEVICE / FP8)))
    (root / DEVICE / "REPORT.md").write_text("# report\n")
    (root / DEVICE / "summary.json").write_text("{}\n")
    (root / "NVIDIA_B200").mkdir()
    return root


def bake_cli(*argv: str) -> int:
    return main(["bake", *argv])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_bake_copies_configs_and_sidecars_and_prints_env(configs: Path, tmp_path: Path, capsys):
    target = tmp_path / "opt" / "configs"
    assert bake_cli("--device", DEVICE, "--configs", str(configs), "--target", str(target)) == 0
    baked = sorted(p.name for p in target.iterdir())
    assert baked == sorted([FP8, BF16, provenance_path(Path(FP8)).name, bake.MANIFEST])
    for name in (FP8, BF16):
        assert (target / name).read_bytes() == (configs / DEVICE / name).read_bytes()
        assert read_config_file(target / name) == {1: TILE, 96: TILE}
    out = capsys.readouterr().out
    assert "baked 2 config(s) and 1 sidecar(s)" in out
    assert out.strip().endswith(f"export VLLM_TUNED_CONFIG_FOLDER={target.resolve()}")
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_rebake_replaces_previous_bake(configs: Path, tmp_path: Path):
    target = tmp_path / "target"
    bake.bake(configs, DEVICE, target)
    (configs / DEVICE / BF16).unlink()
    bake.bake(configs, DEVICE, target)
    assert not (target / BF16).exists() and (target / FP8).exists()


def test_foreign_target_refused_unless_force(configs: Path, tmp_path: Path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "E=256,N=256,device_name=NVIDIA_H200.json").write_text('{"1": {}}')
    before = snapshot(target)
    with pytest.raises(UsageError, match="not from a bake.*--force"):
        bake.bake(configs, DEVICE, target)
    assert snapshot(target) == before
    bake.bake(configs, DEVICE, target, force=True)
    assert (target / FP8).exists()
    assert (target / "E=256,N=256,device_name=NVIDIA_H200.json").read_bytes() == before[
        "E=256,N=256,device_name=NVIDIA_H200.json"]


def test_corrupt_json_leaves_target_untouched(configs: Path, tmp_path: Path, capsys):
    target = tmp_path / "target"
    bake.bake(configs, DEVICE, target)
    before = snapshot(target)
    (configs / DEVICE / BF16).write_text('{"1": {"BLOCK_SIZE_M": 16,')
    assert bake_cli("--device", DEVICE, "--configs", str(configs), "--target", str(target)) == 2
    err = capsys.readouterr().err
    assert BF16 in err and "corrupt JSON" in err and err.count("\n") == 1
    assert snapshot(target) == before


def test_failure_while_staging_leaves_target_unchanged(configs: Path, tmp_path: Path, monkeypatch):
    target = tmp_path / "target"
    bake.bake(configs, DEVICE, target)
    before = snapshot(target)
    calls = []

    def failing_write(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        path.write_bytes(data)

    monkeypatch.setattr(bake, "_write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        bake.bake(configs, DEVICE, target)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels_configs", "target"]


def test_failure_while_swapping_restores_previous_bake(configs: Path, tmp_path: Path, monkeypatch):
    target = tmp_path / "target"
    bake.bake(configs, DEVICE, target)
    before = snapshot(target)
    real_rename, calls = bake.os.rename, []

    def failing_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # moving the staged folder into place
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(bake.os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        bake.bake(configs, DEVICE, target)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels_configs", "target"]


def test_file_for_another_device_refused(configs: Path, tmp_path: Path):
    other = "E=72,N=1280,device_name=NVIDIA_H20,dtype=fp8_w8a8,block_shape=[128,128].json"
    write_config_file(configs / DEVICE / other, {1: TILE}, "3.6.0")
    with pytest.raises(UsageError, match="is for device NVIDIA_H20, not NVIDIA_H200"):
        bake.bake(configs, DEVICE, tmp_path / "target")
    assert not (tmp_path / "target").exists()


def test_unknown_and_empty_device_folders(configs: Path, tmp_path: Path):
    with pytest.raises(UsageError, match="present: NVIDIA_B200, NVIDIA_H200"):
        bake.bake(configs, "NVIDIA_H20", tmp_path / "target")
    with pytest.raises(UsageError, match="no vLLM config files"):
        bake.bake(configs, "NVIDIA_B200", tmp_path / "target")


def test_schema_error_and_bad_sidecar(configs: Path, tmp_path: Path):
    (configs / DEVICE / BF16).write_text(json.dumps({"1": TILE.to_dict(), "note": "hand-tuned"}))
    with pytest.raises(UsageError, match="'note' is not a batch size"):
        bake.bake(configs, DEVICE, tmp_path / "target")
    write_config_file(configs / DEVICE / BF16, {1: TILE}, "3.6.0")
    provenance_path(configs / DEVICE / BF16).write_text(json.dumps({"tool": "tune-moe", "file": FP8}))
    with pytest.raises(UsageError, match=f"not a tune-moe sidecar for {BF16}"):
        bake.bake(configs, DEVICE, tmp_path / "target")


def test_target_inside_the_configs_is_refused(configs: Path):
    with pytest.raises(UsageError, match="overlaps"):
        bake.bake(configs, DEVICE, configs / DEVICE / "baked")


def test_dockerfile_snippet_copies_nothing(configs: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert bake_cli("--device", DEVICE, "--dockerfile", "--vllm-version", "0.33.0") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == [f"COPY kernels_configs/vllm-0.33/{DEVICE}/ /opt/tune-moe/configs/",
                       "ENV VLLM_TUNED_CONFIG_FOLDER=/opt/tune-moe/configs"]
    assert "2 fused-MoE config(s)" in out[0]
    monkeypatch.setattr(bake, "installed_vllm_version", lambda: None)  # none installed: the default release's folder
    assert bake_cli("--device", DEVICE, "--dockerfile") == 0
    assert capsys.readouterr().out.splitlines()[1] == f"COPY kernels_configs/vllm-0.33/{DEVICE}/ /opt/tune-moe/configs/"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_print_env_only_for_an_existing_bake(configs: Path, tmp_path: Path, capsys):
    target = tmp_path / "with space"
    assert bake_cli("--device", DEVICE, "--configs", str(configs), "--target", str(target), "--print-env") == 2
    assert "run tune-moe bake without --print-env" in capsys.readouterr().err
    bake.bake(configs, DEVICE, target)
    assert bake_cli("--device", DEVICE, "--configs", str(configs), "--target", str(target), "--print-env") == 0
    assert capsys.readouterr().out == f"export VLLM_TUNED_CONFIG_FOLDER='{target.resolve()}'\n"


def test_target_is_required_to_install(configs: Path, capsys):
    assert bake_cli("--device", DEVICE, "--configs", str(configs)) == 2
    assert "--target is required" in capsys.readouterr().err


# ------------------------------------------------------------------ unusable paths: one line

def listing(folder: Path) -> list[str]:
    """Every path under ``folder``, hidden ones included, so a stray staging folder shows."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_file_or_read_only_folder_as_target_is_one_line(configs: Path, tmp_path: Path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere; make access() answer as it would for a user
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != read_only and real_access(p, mode, **kw))
    before = listing(tmp_path)
    for target in ("file", "file/configs", "ro", "ro/configs"):
        assert bake_cli("--device", DEVICE, "--configs", str(configs), "--target", str(tmp_path / target)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tune-moe: error: --target {tmp_path / target}") and err.count("\n") == 1, err
    assert listing(tmp_path) == before


def tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: a link (not followed), a folder, or a file's bytes."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            out[str(path.relative_to(folder))] = (f"link {os.readlink(path)}" if path.is_symlink() else
                                                  "folder" if path.is_dir() else path.read_bytes().hex())
    return out


@pytest.mark.parametrize("which", ["config", "sidecar"])
def test_a_config_or_sidecar_that_is_a_link_to_nothing_is_one_line(configs: Path, tmp_path: Path, capsys, which):
    """Neither is read through a dangling link, nor is a sidecar link to nothing taken for no sidecar."""
    config = configs / DEVICE / FP8
    path = config if which == "config" else provenance_path(config)
    path.unlink()
    path.symlink_to("gone.json")
    before = tree(tmp_path)
    assert bake_cli("--device", DEVICE, "--configs", str(configs), "--target", str(tmp_path / "t")) == 2
    assert capsys.readouterr().err == (f"tune-moe: error: {path}: a link to gone.json, which does not exist or loops; "
                                       f"remove it or put the {which} {'file ' if which == 'config' else ''}"
                                       "tune-moe wrote there\n")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("target, link, named", [("t", "gone", "t"), ("t", "t", "t"), ("loop/t", "loop", "loop")],
                         ids=["dangling", "loop", "under-a-loop"])
def test_a_target_that_is_a_link_to_nothing_or_a_loop_is_one_line(configs: Path, tmp_path: Path, capsys, target,
                                                                    link, named):
    (tmp_path / named).symlink_to(link)
    before = tree(tmp_path)
    assert bake_cli("--device", DEVICE, "--configs", str(configs), "--target", str(tmp_path / target)) == 2
    where = "" if named == target else f"{tmp_path / named} is "
    assert capsys.readouterr().err == (f"tune-moe: error: --target {tmp_path / target}: {where}a link to {link}, "
                                       "which does not exist or loops; point it at a folder or pass another "
                                       "--target\n")
    assert tree(tmp_path) == before


def test_a_manifest_listing_a_path_outside_the_target_removes_nothing(configs: Path, tmp_path: Path, capsys):
    """A re-bake removes the files the earlier bake's manifest lists: only names of the target's own files count."""
    target = tmp_path / "t"
    target.mkdir()
    (target / "mine.txt").write_text("mine")
    (tmp_path / "victim.txt").write_text("victim")
    manifest = target / bake.MANIFEST
    manifest.write_text(json.dumps({"tool": "tune-moe", "device": DEVICE, "files": ["../victim.txt"]}))
    before = tree(tmp_path)
    assert bake_cli("--device", DEVICE, "--configs", str(configs), "--target", str(target), "--force") == 2
    assert capsys.readouterr().err == (
        f"tune-moe: error: {manifest}: key 'files' is not a list of the file names a bake put in {target}; delete it "
        "(the folder's files then count as not from a bake) or choose another --target\n")
    assert tree(tmp_path) == before


def test_configs_that_is_a_file_is_one_line(tmp_path: Path, capsys):
    (tmp_path / "configs.json").write_text("{}")
    argv = ("--device", DEVICE, "--configs", str(tmp_path / "configs.json"))
    assert bake_cli(*argv, "--target", str(tmp_path / "t")) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and err.count("\n") == 1
    assert bake_cli(*argv, "--dockerfile") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs.json"]


# ----------------------------------------------------------- targets that cannot be renamed

def unmovable(monkeypatch, target: Path, code: int = errno.EBUSY) -> None:
    """``target`` behaves as a mount point: renaming the folder itself fails with ``code``."""
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == target or Path(dst) == target:
            raise OSError(code, os.strerror(code), str(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize("code", [errno.EBUSY, errno.EXDEV, errno.EPERM], ids=["EBUSY", "EXDEV", "EPERM"])
def test_mount_point_target_gets_its_files_replaced_in_place(configs: Path, tmp_path: Path, monkeypatch, capsys,
                                                             code):
    target = tmp_path / "volume"
    bake.bake(configs, DEVICE, target)
    inode = target.stat().st_ino
    (configs / DEVICE / BF16).unlink()
    write_config_file(configs / DEVICE / FP8, {1: TILE, 4096: TILE}, "3.6.0")
    unmovable(monkeypatch, target, code)
    assert bake_cli("--device", DEVICE, "--configs", str(configs), "--target", str(target)) == 0
    assert target.stat().st_ino == inode  # the same folder, not a new one
    assert listing(target) == sorted([FP8, provenance_path(Path(FP8)).name, bake.MANIFEST])
    assert (target / FP8).read_bytes() == (configs / DEVICE / FP8).read_bytes()
    assert json.loads((target / bake.MANIFEST).read_text())["files"] == sorted([FP8, provenance_path(Path(FP8)).name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels_configs", "volume"]
    out = capsys.readouterr().out
    assert "replaced the bake's files inside the folder one by one" in out and os.strerror(code) in out
    assert out.strip().endswith(f"export VLLM_TUNED_CONFIG_FOLDER={target.resolve()}")


def test_empty_mount_point_and_read_only_parent_take_a_first_bake(configs: Path, tmp_path: Path, monkeypatch):
    target = tmp_path / "volume"
    target.mkdir()
    unmovable(monkeypatch, target)
    bake.bake(configs, DEVICE, target)
    assert listing(target) == sorted([FP8, BF16, provenance_path(Path(FP8)).name, bake.MANIFEST])
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(dir=None, prefix=None, **kw):  # a parent this user cannot write (Kubernetes: a volume under /opt)
        if Path(dir) == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkdtemp(dir=dir, prefix=prefix, **kw)

    monkeypatch.setattr(bake.tempfile, "mkdtemp", mkdtemp)
    (configs / DEVICE / BF16).unlink()
    baked = bake.bake(configs, DEVICE, target)
    assert "Permission denied" in baked.in_place
    assert listing(target) == sorted([FP8, provenance_path(Path(FP8)).name, bake.MANIFEST])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels_configs", "volume"]


# os.replace in place: 1 the interim manifest, 2 FP8, 3 its sidecar, 4 removing BF16, 5 the final manifest
@pytest.mark.parametrize("failing", [2, 4, 5], ids=["new-file", "removal", "manifest"])
@pytest.mark.parametrize("hard_links", [True, False], ids=["links", "no-links"])
def test_failure_in_place_restores_previous_bake(configs: Path, tmp_path: Path, monkeypatch, failing, hard_links):
    target = tmp_path / "volume"
    bake.bake(configs, DEVICE, target)
    before = snapshot(target)
    (configs / DEVICE / BF16).unlink()
    write_config_file(configs / DEVICE / FP8, {1: TILE, 4096: TILE}, "3.6.0")
    unmovable(monkeypatch, target)
    if not hard_links:  # each earlier file is then moved aside just before its replacement: one more os.replace
        failing = {2: 4, 4: 7, 5: 8}[failing]

        def link(*args, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", link)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == failing:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        bake.bake(configs, DEVICE, target)
    assert snapshot(target) == before
    assert listing(target) == sorted(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels_configs", "volume"]


# ------------------------------------------------------------------ --force beside other files

def test_force_leaves_symlinks_and_special_files_as_they_are(configs: Path, tmp_path: Path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "elsewhere.json").write_text("{}")
    (target / "link.json").symlink_to(tmp_path / "elsewhere.json")
    os.mkfifo(target / "pipe")
    (target / "notes").mkdir()
    (target / "notes" / "a.txt").write_text("a")
    fifo = (target / "pipe").stat().st_ino
    argv = ("--device", DEVICE, "--configs", str(configs), "--target", str(target), "--force")
    assert bake_cli(*argv) == 0
    out = capsys.readouterr().out
    assert "because it holds other files" in out and "kept 3 other entries untouched: link.json, notes, pipe" in out
    for _ in range(2):  # a first bake, then a re-bake that drops BF16
        assert os.readlink(target / "link.json") == str(tmp_path / "elsewhere.json")
        assert stat.S_ISFIFO((target / "pipe").lstat().st_mode) and (target / "pipe").stat().st_ino == fifo
        assert (target / "notes" / "a.txt").read_text() == "a"
        assert (tmp_path / "elsewhere.json").read_text() == "{}"
        (configs / DEVICE / BF16).unlink(missing_ok=True)
        assert bake_cli(*argv) == 0
    assert listing(target) == sorted(["link.json", "pipe", "notes", "notes/a.txt", FP8,
                                      provenance_path(Path(FP8)).name, bake.MANIFEST])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.json", "kernels_configs", "target"]


def test_force_refuses_a_folder_named_like_a_config(configs: Path, tmp_path: Path, capsys):
    target = tmp_path / "target"
    (target / BF16).mkdir(parents=True)
    (target / BF16 / "mine.txt").write_text("mine")
    before = listing(target)
    assert bake_cli("--device", DEVICE, "--configs", str(configs), "--target", str(target), "--force") == 2
    err = capsys.readouterr().err
    assert f"holds a folder {BF16} where the bake writes a file" in err and err.count("\n") == 1
    assert listing(target) == before and (target / BF16 / "mine.txt").read_text() == "mine"


def test_files_tuned_under_another_launch_are_refused_for_the_image_vllm(configs: Path, tmp_path: Path, capsys):
    """The FP8 file's sidecar says vLLM 0.33.0; vLLM 0.34 reads its weights through TMA (benchmarks §2w), so an image
    that serves 0.34 gets nothing. The bf16 file, whose launch 0.34 keeps, passes the same check."""
    target = tmp_path / "bake"
    assert bake_cli("--device", DEVICE, "--configs", str(configs), "--target", str(target),
                    "--vllm-version", "0.34.0") == 2
    err = capsys.readouterr().err
    assert err == (f"tune-moe: error: {configs / DEVICE}: 1 file(s) were tuned under vLLM 0.33.0, and vLLM 0.34.0 "
                   f"reads block-FP8 weights through a TMA descriptor (e.g. {FP8}); tune them for it (tune-moe --gpu "
                   "H200 --dtype fp8 --vllm-version 0.34.0) or pass --vllm-version 0.33.0 for an image that serves "
                   "vLLM 0.33.0\n")
    assert not target.exists()
    assert bake_cli("--device", DEVICE, "--configs", str(configs), "--dockerfile", "--vllm-version", "0.34") == 2
    assert bake_cli("--device", DEVICE, "--configs", str(configs), "--target", str(target),
                    "--vllm-version", "0.33.0") == 0
    assert "checked against vLLM 0.33.0\n" in capsys.readouterr().out
    (configs / DEVICE / FP8).unlink()
    provenance_path(configs / DEVICE / FP8).unlink()
    provenance.write(configs / DEVICE / BF16, provenance_for(configs / DEVICE / BF16, read_config_file(configs / DEVICE / BF16)))
    assert bake_cli("--device", DEVICE, "--configs", str(configs), "--target", str(target),
                    "--vllm-version", "0.34.0") == 0
    assert sorted(p.name for p in target.glob("E=*")) == [BF16, provenance_path(configs / DEVICE / BF16).name]


def test_each_release_bakes_its_own_committed_h200_set(capsys, monkeypatch):
    """kernels_configs/vllm-0.33 bakes for 0.33 and not for 0.34 (its FP8 files lose to 0.34's default, §2w);
    --vllm-version picks the release's folder; a release with none, or the root of the releases, is one line."""
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    v33 = str(Path("kernels_configs") / "vllm-0.33")
    assert bake_cli("--device", DEVICE, "--configs", v33, "--dockerfile", "--vllm-version", "0.33.0") == 0
    assert bake_cli("--device", DEVICE, "--configs", v33, "--dockerfile", "--vllm-version", "0.34.0") == 2
    assert "8 file(s) were tuned under vLLM 0.33.0, and vLLM 0.34.0 reads block-FP8 weights" in capsys.readouterr().err
    for release in ("0.33", "0.34"):
        assert bake_cli("--device", DEVICE, "--dockerfile", "--vllm-version", f"{release}.0") == 0
        out = capsys.readouterr().out.splitlines()
        assert out[1] == f"COPY kernels_configs/vllm-{release}/{DEVICE}/ /opt/tune-moe/configs/"
        assert "12 fused-MoE config(s)" in out[0]
    assert bake_cli("--device", DEVICE, "--dockerfile", "--vllm-version", "0.35.0") == 2
    assert capsys.readouterr().err == (
        "tune-moe: error: no kernels_configs/vllm-0.35: kernels_configs holds files for vLLM 0.33, 0.34 only; tune "
        "for this release (tune-moe --gpu ... --vllm-version), or pass --vllm-version of one of those, or --configs\n")
    assert bake_cli("--device", DEVICE, "--configs", "kernels_configs", "--dockerfile") == 2
    assert capsys.readouterr().err == (
        "tune-moe: error: --configs kernels_configs holds one folder per vLLM release (vllm-0.33, vllm-0.34): pass "
        "--configs kernels_configs/vllm-0.34, or leave --configs out and give --vllm-version\n")
