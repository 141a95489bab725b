"""One file out of a wheel on PyPI, read with HTTP range requests: a wheel is a zip whose central directory,
at its end, says where each member lies, so a test reads vLLM's fused_moe.py (60 kB) without fetching the
300 MB wheel. Each member is pinned by its sha256 and cached; a cached copy is used as it is (offline too).
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

CHUNK = 1 << 20  # bytes per request: the central directory of vLLM's wheel (4626 files) takes one or two

# Raised when PyPI cannot be reached: the caller skips. A wrong hash or a server that ignores ranges is a failure.
OFFLINE = (urllib.error.URLError, TimeoutError, ConnectionError)


class RangeReader(io.RawIOBase):
    """A read-only, seekable file over HTTP range requests, read in cached ``CHUNK``-sized pieces."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url, self.timeout, self.pos, self.chunks = url, timeout, 0, {}
        head = self._get(0, 1)
        self.size = int(head[1].rsplit("/", 1)[1])

    def _get(self, start: int, end: int) -> tuple[bytes, str]:
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end - 1}"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            if resp.status != 206:
                raise RuntimeError(f"{self.url}: HTTP {resp.status} to a range request; the server must honour ranges")
            return resp.read(), resp.headers.get("Content-Range", "")

    def _chunk(self, index: int) -> bytes:
        if index not in self.chunks:
            start = index * CHUNK
            self.chunks[index] = self._get(start, min(start + CHUNK, self.size))[0]
        return self.chunks[index]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        index, offset = divmod(self.pos, CHUNK)
        data = self._chunk(index)[offset:offset + n]
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def fetch_member(url: str, member: str, sha256: str, dest: Path) -> Path:
    """``member`` of the wheel at ``url``, checked against ``sha256`` and kept at ``dest``."""
    if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == sha256:
        return dest
    with zipfile.ZipFile(io.BufferedReader(RangeReader(url), buffer_size=CHUNK)) as wheel:
        data = wheel.read(member)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise AssertionError(f"{url} {member}: sha256 {got}, expected {sha256}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


# --- a vLLM release's wheel, as the release test modules read it ----------------------------------------------

FUSED_MOE = "vllm/model_executor/layers/fused_moe/fused_moe.py"


def release_fixtures(url: str, sha256: dict[str, str]):
    """The module fixtures of a test module for one vLLM release: ``cache`` (pytest's cache folder, kept between
    runs, or a temporary one), ``src`` (the release's fused_moe.py) and ``wheel`` (a wheel of the pinned members
    under the release's own wheel name). ``sha256`` pins each member read; a test skips when PyPI is out of reach."""
    import pytest

    wheel_name = url.rsplit("/", 1)[1]
    release = wheel_name.split("-")[1]

    def member(cache: Path, name: str) -> Path:
        try:
            return fetch_member(url, name, sha256[name], cache / Path(name).name)
        except OFFLINE as exc:
            pytest.skip(f"offline: cannot fetch vLLM {release}'s {name} from PyPI ({exc})")

    @pytest.fixture(scope="module")
    def cache(request, tmp_path_factory) -> Path:
        plugin = getattr(request.config, "cache", None)
        return plugin.mkdir(f"vllm-{release}") if plugin is not None else tmp_path_factory.mktemp(f"vllm-{release}")

    @pytest.fixture(scope="module")
    def src(cache) -> Path:
        return member(cache, FUSED_MOE)

    @pytest.fixture(scope="module")
    def wheel(cache, src, tmp_path_factory) -> Path:
        path = tmp_path_factory.mktemp("wheel") / wheel_name
        with zipfile.ZipFile(path, "w") as zf:
            for name in sha256:
                zf.write(member(cache, name), name)
        return path

    return cache, src, wheel


def top_level_function(src: Path, name: str, namespace: dict, transform=None):
    """One top-level function of a vLLM source file, run in ``namespace`` (vLLM itself is not imported);
    ``transform``, an ``ast.NodeTransformer``, may rewrite it first."""
    import ast

    node = next(n for n in ast.parse(src.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == name)
    if transform is not None:
        node = ast.fix_missing_locations(transform.visit(node))
    exec(compile(ast.Module([node], []), str(src), "exec"), namespace)
    return namespace[name]


class Recorder:
    """Stands in for a jit function: records each launch's arguments by name, then launches it."""

    def __init__(self, fn):
        self.fn, self.arg_names, self.calls = fn, fn.arg_names, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            named = {**dict(zip(self.arg_names, args)), **kwargs}
            self.calls.append(((grid(named) if callable(grid) else grid), named))
            self.fn[grid](*args, **kwargs)
        return run
