"""``tune-moe bake``: install one device's tuned configs into a folder vLLM reads.

Every vLLM JSON of ``kernels_configs/vllm-<release>/<device>/`` is validated (schema, device in its
name, sidecar) before anything is written. The folder is then built beside the target
and renamed into place, so the target holds either the old bake or the new one, never
half of one. A manifest marks the folder as a bake, so a re-bake replaces it while a
folder holding other files is refused unless ``--force``.

A target that cannot be renamed (a Docker or Kubernetes volume, a folder whose parent
is read-only), and a target holding other files (``--force``), keep their folder: the
new files are staged in a hidden folder inside it and renamed over the earlier bake's
files one by one, the earlier bake's files the new one lacks are removed, and the
manifest goes last. Every other entry is left exactly as it is. A failure puts back
every entry touched and leaves no staging folder.

The configs come from the image's vLLM release folder (``--vllm-version``, default the installed one, else the
default release), and files whose sidecar says they were tuned under a vLLM that launches their kernel otherwise
are refused: vLLM 0.34 reads block-FP8 weights through TMA, where 0.33's FP8 files lose to its default
(benchmarks/README §2w).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import provenance
from .configs import RELEASE_PREFIX, read_config_file, release_folder, releases_present
from .provenance import SUFFIX as PROVENANCE_SUFFIX, TOOL, sidecar_path as provenance_path
from .errors import UsageError
from .files import output_folder
from .vllm.kernel import installed_vllm_version
from .shapes import DEFAULT_VLLM_VERSION, FILE_NAME, file_name_error, parse_version
from .vllm.rules import launch_changes

DEFAULT_CONFIGS = Path("kernels_configs")  # one folder per vLLM release (vllm-0.33), one per device in each
IMAGE_FOLDER = "/opt/tune-moe/configs"
MANIFEST = ".tune-moe-bake.json"
STAGE = ".tune-moe-bake-"  # staging folder inside a target whose files are replaced in place
ENV = "VLLM_TUNED_CONFIG_FOLDER"
# renaming the target folder itself fails with these on a mount point (EBUSY), an image layer of
# overlayfs (EXDEV), a sticky or read-only parent (EPERM, EACCES, EROFS); its files can still be replaced
UNMOVABLE = frozenset({errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES, errno.EROFS})


def config_device(name: str) -> str | None:
    """The device a vLLM fused-MoE config file name is for; None for any other name (sidecars included)."""
    m = None if name.endswith(PROVENANCE_SUFFIX) else FILE_NAME.match(name)
    return m.group(3) if m else None


@dataclass(frozen=True)
class BakedFile:
    name: str
    data: bytes  # exactly the bytes that were validated, so what is copied is what was checked


@dataclass(frozen=True)
class Baked:
    files: list[BakedFile]
    in_place: str = ""  # why the files were replaced inside the folder; "" when the folder was renamed into place
    kept: tuple[str, ...] = ()  # entries of the target that are not the bake's, left as they were


def device_folder(configs: Path, device: str) -> Path:
    if configs.exists() and not configs.is_dir():
        raise UsageError(f"--configs {configs}: is a file, not a folder; pass the folder holding <device>/ folders "
                         f"(default {DEFAULT_CONFIGS}/vllm-<major.minor>)")
    folder = configs / device
    if not folder.is_dir() or not device or device.startswith(".") or "/" in device or os.sep in device:
        releases = releases_present(configs)
        if releases:
            raise UsageError(f"--configs {configs} holds one folder per vLLM release ({', '.join(releases)}): pass "
                             f"--configs {configs / releases[-1]}, or leave --configs out and give --vllm-version")
        present = sorted(d.name for d in configs.glob("*") if d.is_dir()) if configs.is_dir() else []
        listing = ", ".join(present) if present else f"none; {configs} is empty or missing"
        tuned = releases_present(configs.parent)
        if not configs.is_dir() and tuned:
            releases = ", ".join(r.removeprefix(RELEASE_PREFIX) for r in tuned)
            raise UsageError(f"no {configs}: {configs.parent} holds files for vLLM {releases} only; tune for this "
                             "release (tune-moe --gpu ... --vllm-version), or pass --vllm-version of one of those, "
                             "or --configs")
        if any(configs.glob(f"E=*device_name={device}*.json")):
            raise UsageError(f"--configs {configs} is {device}'s folder itself; pass the folder above it: "
                             f"--configs {configs.parent}")
        raise UsageError(f"--device {device}: no folder {folder}; device folders present: {listing}")
    return folder


def _read(path: Path, fix: str) -> bytes:
    """The bytes of a file to bake; one line for a folder, a link to nothing or a file that cannot be read."""
    provenance.check_file(path, fix)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror}); {fix}") from None


def _load_json(path: Path, data: bytes) -> object:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: corrupt JSON ({exc}); re-run tune-moe for it or delete it") from None


def _validate_config(path: Path, device: str) -> list[BakedFile]:
    """The config and its sidecar (if any), checked as vLLM and tune-moe would read them."""
    named = config_device(path.name)
    if named != device:
        raise UsageError(f"{path} is for device {named}, not {device}; move it to {path.parent.parent / named}/")
    data = _read(path, "remove it or put the config file tune-moe wrote there")
    read_config_file(path)
    side = provenance_path(path)
    if not os.path.lexists(side):  # a link to nothing is refused, not taken for no sidecar
        return [BakedFile(path.name, data)]
    side_data = _read(side, "remove it or put the sidecar tune-moe wrote there")
    prov = _load_json(side, side_data)
    if not isinstance(prov, dict) or prov.get("tool") != TOOL or prov.get("file") != path.name:
        raise UsageError(f"{side}: not a {TOOL} sidecar for {path.name}; regenerate it with tune-moe or delete it")
    return [BakedFile(path.name, data), BakedFile(side.name, side_data)]


def check_release(folder: Path, files: list[BakedFile], vllm_version: str | None) -> None:
    """Refuse, in one line, the files tuned under a vLLM that launches their kernel otherwise than
    ``vllm_version`` (None: nothing to check against)."""
    if vllm_version is None:
        return
    parse_version(vllm_version)  # one line for a malformed version
    stale = []
    for f in files:
        prov = None if f.name.endswith(PROVENANCE_SUFFIX) else provenance.read(folder / f.name)
        if prov is not None:
            changes = launch_changes(prov.run.vllm, vllm_version, prov.shape)
            stale += [(f.name, prov, changes)] if changes else []
    if stale:
        name, prov, changes = stale[0]
        raise UsageError(f"{folder}: {len(stale)} file(s) were tuned under vLLM {prov.run.vllm}, and vLLM {vllm_version} "
                         f"{' and '.join(changes)} (e.g. {name}); tune them for it (tune-moe --gpu {prov.gpu_key} "
                         f"--dtype {prov.shape.dtype} --vllm-version {vllm_version}) or pass --vllm-version "
                         f"{prov.run.vllm} for an image that serves vLLM {prov.run.vllm}")


def collect(folder: Path, device: str) -> list[BakedFile]:
    """Every vLLM config (and sidecar) of ``folder``, validated; nothing is written."""
    names = sorted(p.name for p in folder.glob("*.json") if not p.name.endswith(PROVENANCE_SUFFIX))
    configs = [n for n in names if config_device(n)]
    odd = [n for n in names if n.startswith("E=") and n not in configs]
    if odd:
        raise file_name_error(odd[0], folder / odd[0])
    if not configs:
        raise UsageError(f"{folder}: no vLLM config files (E=...,device_name={device}...json); run tune-moe first")
    return [f for n in configs for f in _validate_config(folder / n, device)]


def _manifest(target: Path) -> set[str] | None:
    """The files an earlier bake put in ``target`` (the names its manifest lists); None when it has no manifest.
    A manifest that lists anything but file names of ``target`` is refused: a re-bake removes what it lists."""
    path = target / MANIFEST
    if not os.path.lexists(path):
        return None
    fix = "delete it (the folder's files then count as not from a bake) or choose another --target"
    try:
        data = json.loads(_read(path, fix))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: corrupt bake manifest ({exc}); {fix}") from None
    if not isinstance(data, dict) or data.get("tool") != TOOL:
        raise UsageError(f"{path}: not a {TOOL} bake manifest; {fix}")
    files = data.get("files")
    if not isinstance(files, list) or not all(isinstance(n, str) and _plain_name(n) for n in files):
        raise UsageError(f"{path}: key 'files' is not a list of the file names a bake put in {target}; {fix}")
    return set(files)


def _plain_name(name: str) -> bool:
    """A file name inside one folder: no path, no . or .., nothing the OS refuses."""
    return bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name and "\0" not in name


def _manifest_bytes(device: str, names: list[str]) -> bytes:
    return (json.dumps({"tool": TOOL, "device": device, "files": sorted(names)}, indent=2) + "\n").encode()


def foreign_entries(target: Path) -> list[str]:
    """Entries of ``target`` that an earlier bake did not put there (a killed bake's staging folder is ours)."""
    if not target.exists():
        return []
    if not target.is_dir():
        raise UsageError(f"--target {target} exists and is not a folder; choose another --target")
    ours = (_manifest(target) or set()) | {MANIFEST}
    return sorted(p.name for p in target.iterdir() if p.name not in ours and not p.name.startswith(STAGE))


def _check_links(target: Path) -> None:
    """One line when ``target``, or a folder above it, is a link to nothing or a loop of links."""
    for path in (target, *target.parents):
        if os.path.lexists(path) and not path.exists():
            what = "" if path == target else f"{path} is "
            raise UsageError(f"--target {target}: {what}a link to {os.readlink(path)}, which does not exist or loops; "
                             "point it at a folder or pass another --target")


def check_target(source: Path, target: Path, force: bool) -> list[str]:
    _check_links(target)
    src, dst = source.resolve(), target.resolve()
    if src == dst or src in dst.parents or dst in src.parents:
        raise UsageError(f"--target {target} overlaps the configs folder {source}; choose a folder outside it")
    output_folder(target, "--target")
    foreign = foreign_entries(target)
    if foreign and not force:
        raise UsageError(f"--target {target} holds files not from a bake ({_listing(foreign)}); "
                         "choose an empty folder, or pass --force to bake beside them")
    return foreign


def _listing(names: list[str] | tuple[str, ...]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fill(stage: Path, files: list[BakedFile], device: str) -> None:
    for f in files:
        _write(stage / f.name, f.data)
    _write(stage / MANIFEST, _manifest_bytes(device, [f.name for f in files]))


def _stage(target: Path, files: list[BakedFile], device: str) -> Path:
    """A complete new folder beside ``target`` (same filesystem, so it can be renamed into place)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.bake-"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        stage.chmod(0o777 & ~umask)
        _fill(stage, files, device)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


def _swap(stage: Path, target: Path) -> OSError | None:
    """Rename ``stage`` to ``target``; an existing target is moved aside first and restored on failure.

    When ``target`` itself cannot be moved (``UNMOVABLE``), nothing has changed: the staging folder is
    removed and the error returned.
    """
    if not target.exists():
        try:
            os.rename(stage, target)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return None
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    try:
        try:
            os.rename(target, old / "prev")
        except OSError as exc:
            shutil.rmtree(stage, ignore_errors=True)
            if exc.errno in UNMOVABLE:
                return exc
            raise
        try:
            os.rename(stage, target)
        except BaseException:
            os.rename(old / "prev", target)
            shutil.rmtree(stage, ignore_errors=True)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return None


def _save(entry: Path, backup: Path) -> None:
    """Keep ``entry`` as ``backup`` while it stays in place (a hard link); moved aside where links fail."""
    try:
        os.link(entry, backup, follow_symlinks=False)
    except OSError:
        os.replace(entry, backup)


def replace_in_place(target: Path, files: list[BakedFile], device: str) -> None:
    """Replace the earlier bake's files inside ``target`` one rename each; every other entry is left as it is.

    The new files are staged in a hidden folder inside ``target`` (same filesystem). A manifest listing
    the earlier and the new files goes in first, so an interrupted bake still owns every file it placed;
    then each new file is renamed over its name, the earlier bake's files the new one lacks are removed,
    and the new manifest is renamed in last. On failure every entry touched is put back.
    """
    names = [f.name for f in files]
    folders = [n for n in [*names, MANIFEST] if (target / n).is_dir() and not (target / n).is_symlink()]
    if folders:
        raise UsageError(f"--target {target} holds a folder {folders[0]} where the bake writes a file; "
                         "move it away and bake again")
    previous = (_manifest(target) or set()) - {MANIFEST}
    gone = sorted(previous - set(names))
    for stale in target.glob(f"{STAGE}*"):  # left by a bake that was killed
        shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(dir=target, prefix=STAGE))
    new, old = stage / "new", stage / "old"
    undo: list[tuple[str, bool]] = []  # (name, its earlier entry is in old/), in the order done
    try:
        new.mkdir()
        old.mkdir()
        _fill(new, files, device)
        _write(stage / "interim", _manifest_bytes(device, sorted(previous | set(names))))
        for source, name in [(stage / "interim", MANIFEST), *((new / n, n) for n in names)]:
            entry, saved = target / name, os.path.lexists(target / name)
            if saved:
                _save(entry, old / name)
            undo.append((name, saved))
            os.replace(source, entry)
        for name in gone:
            if os.path.lexists(target / name):
                os.replace(target / name, old / name)
                undo.append((name, True))
        os.replace(new / MANIFEST, target / MANIFEST)
    except BaseException:
        for name, saved in reversed(undo):
            try:
                if saved:
                    os.replace(old / name, target / name)
                else:
                    (target / name).unlink(missing_ok=True)
            except OSError:
                pass  # best effort: the error that stopped the bake is the one reported
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def bake(configs: Path, device: str, target: Path, force: bool = False, vllm_version: str | None = None) -> Baked:
    """Validate everything (against the image's ``vllm_version`` too), then replace ``target`` with the device's
    configs in one rename.

    A target holding other files (``force``), or one that cannot be renamed, keeps its folder and
    gets the bake's files replaced inside it (``replace_in_place``).
    """
    source = device_folder(configs, device)
    files = collect(source, device)
    check_release(source, files, vllm_version)
    foreign = check_target(source, target, force)
    if foreign:
        replace_in_place(target, files, device)
        written = {f.name for f in files}
        return Baked(files, "it holds other files", tuple(n for n in foreign if n not in written))
    try:
        stage = _stage(target, files, device)
    except OSError as exc:  # the parent takes no new folder, but the target may still take files
        if not target.is_dir() or exc.errno not in UNMOVABLE:
            raise
        replace_in_place(target, files, device)
        return Baked(files, f"its parent folder takes no new folder ({exc.strerror})")
    unmovable = _swap(stage, target)
    if unmovable is not None:
        replace_in_place(target, files, device)
        return Baked(files, f"the folder itself cannot be renamed ({unmovable.strerror}), as with a mount point")
    return Baked(files)


def env_line(target: str) -> str:
    return f"export {ENV}={shlex.quote(target)}"


def _check_dockerfile_paths(source: Path, image_folder: str) -> None:
    """What a Dockerfile line can hold: the folder in the image absolute, neither path with a blank (COPY and ENV
    split on them), the configs inside the build context (this folder: COPY cannot reach above it)."""
    if not image_folder.startswith("/") or any(c.isspace() for c in image_folder):
        raise UsageError(f"--target {image_folder!r}: the folder in the image must be an absolute path without blanks, "
                         "e.g. --target /opt/tune-moe/configs")
    inside = Path(os.path.relpath(source.absolute()))
    if inside.parts[:1] == ("..",) or any(c.isspace() for c in str(inside)):
        raise UsageError(f"--configs {source.parent}: the Dockerfile's COPY reads {inside}, which is "
                         f"{'above the build context' if inside.parts[:1] == ('..',) else 'a path with blanks'}; run "
                         "tune-moe bake --dockerfile from the build context's folder, with --configs inside it and "
                         "no blanks in its path")


def dockerfile_snippet(configs: Path, device: str, image_folder: str, count: int) -> str:
    source = Path(os.path.relpath(configs / device)) if configs.is_absolute() else configs / device
    return "\n".join([
        f"# tune-moe: {count} fused-MoE config(s) for {device}; COPY paths are relative to the build context",
        f"COPY {source.as_posix()}/ {image_folder}/",
        f"ENV {ENV}={image_folder}",
    ])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", required=True, help="vLLM device name, i.e. the folder under --configs (NVIDIA_H200)")
    p.add_argument("--configs", help=f"tuned configs root, holding <device>/ folders (default: {DEFAULT_CONFIGS}/"
                   "vllm-<major.minor of --vllm-version>)")
    p.add_argument("--target", help="folder to install into (replaced as a whole, or its bake files one by one "
                   f"where it cannot be renamed); with --dockerfile the folder inside the image (default there: "
                   f"{IMAGE_FOLDER})")
    p.add_argument("--vllm-version", help="vLLM the image serves: its release folder is baked, and files tuned under "
                   "a release that launches their kernel otherwise are refused (default: the installed vLLM, else "
                   f"{DEFAULT_VLLM_VERSION}; with --configs and none installed, none checked)")
    p.add_argument("--force", action="store_true",
                   help="bake into a --target that holds other files (they are left exactly as they are)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dockerfile", action="store_true", help="validate, then print a Dockerfile snippet; copy nothing")
    mode.add_argument("--print-env", action="store_true", help="print only the export line for an existing bake")


def _print_env(target: Path, device: str) -> int:
    files = _manifest(target) if target.is_dir() else None
    if not files or device not in {config_device(n) for n in files}:
        raise UsageError(f"--target {target} holds no bake for {device}; run tune-moe bake without --print-env first")
    print(env_line(str(target.resolve())))
    return 0


def run(args: argparse.Namespace) -> int:
    version = args.vllm_version or installed_vllm_version() or (None if args.configs else DEFAULT_VLLM_VERSION)
    configs = Path(args.configs) if args.configs else release_folder(version, DEFAULT_CONFIGS)
    if args.dockerfile:
        files = collect(device_folder(configs, args.device), args.device)
        _check_dockerfile_paths(configs / args.device, args.target or IMAGE_FOLDER)
        check_release(device_folder(configs, args.device), files, version)
        count = sum(not f.name.endswith(PROVENANCE_SUFFIX) for f in files)
        print(dockerfile_snippet(configs, args.device, args.target or IMAGE_FOLDER, count))
        return 0
    if not args.target:
        raise UsageError("--target is required (the folder vLLM will read); e.g. --target /opt/tune-moe/configs")
    target = Path(args.target)
    if args.print_env:
        return _print_env(target, args.device)
    baked = bake(configs, args.device, target, args.force, version)
    count = sum(not f.name.endswith(PROVENANCE_SUFFIX) for f in baked.files)
    print(f"baked {count} config(s) and {len(baked.files) - count} sidecar(s) for {args.device} "
          f"into {target.resolve()}, " + (f"checked against vLLM {version}" if version else
                                          "not checked against a vLLM release (none installed; pass --vllm-version)"))
    if baked.in_place:
        print(f"replaced the bake's files inside the folder one by one, each in one rename, because {baked.in_place}")
    if baked.kept:
        print(f"kept {len(baked.kept)} other entr{'y' if len(baked.kept) == 1 else 'ies'} untouched: "
              f"{_listing(baked.kept)}")
    print("set this in the environment of vLLM:")
    print(env_line(str(target.resolve())))
    return 0
