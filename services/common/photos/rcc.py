"""Minimal reader for Qt binary resource bundles (``.rcc``, as written by ``rcc -binary``).

Debian ships most of GCompris' real photos only inside these bundles, so we read them directly
instead of depending on Qt. Layout (all integers big-endian):

* header: ``b"qres"``, version (u32), tree offset, data offset, names offset (u32 each) and,
  from version 3 on, a u32 of overall flags;
* tree: fixed-size nodes; node 0 is the root directory. A node is name offset (u32), flags (u16),
  then either child count + first child index (directory) or country, language (u16 each) +
  data offset (file); version >= 2 appends a u64 modification time;
* names: u16 length, u32 hash, then the name in UTF-16BE;
* data: u32 length then payload. Flag ``0x01`` means ``qCompress`` output (u32 BE uncompressed
  length + zlib stream); flag ``0x04`` means a zstd frame.
"""

from __future__ import annotations

import functools
import importlib
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

MAGIC = b"qres"
FLAG_COMPRESSED = 0x01
FLAG_DIRECTORY = 0x02
FLAG_COMPRESSED_ZSTD = 0x04

# Guard against corrupt trees (cycles, absurd depth) so a bad bundle cannot hang a build.
_MAX_DEPTH = 64


class RccError(ValueError):
    """The bytes are not a readable Qt resource bundle."""


@dataclass
class RccStats:
    """Counts of entries a walk could not return, so callers can report rather than hide them."""

    files: int = 0
    skipped_zstd: int = 0
    skipped_corrupt: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Header:
    version: int
    tree: int
    data: int
    names: int
    node_size: int


@functools.cache
def _zstd_decompressor() -> Callable[[bytes], bytes] | None:
    """A zstd decoder if one is importable (stdlib ``compression.zstd`` on 3.14+, or ``zstandard``).

    The GCompris bundles Debian ships only use zlib, so a missing decoder merely skips (and counts)
    zstd entries instead of making the dependency mandatory.
    """
    try:
        stdlib = importlib.import_module("compression.zstd")
    except ImportError:
        pass
    else:
        func: Callable[[bytes], bytes] = stdlib.decompress
        return func
    try:
        zstandard = importlib.import_module("zstandard")
    except ImportError:
        return None

    def _dec(buf: bytes) -> bytes:
        # stream_reader copes with frames that do not record their decompressed size.
        with zstandard.ZstdDecompressor().stream_reader(buf) as reader:
            return bytes(reader.read())

    return _dec


class RccReader:
    """Random-access view of one bundle held in memory (bundles are a few MB at most)."""

    def __init__(self, blob: bytes) -> None:
        self._buf = memoryview(blob)
        self._hdr = self._parse_header()

    @classmethod
    def from_path(cls, path: Path) -> RccReader:
        return cls(path.read_bytes())

    @property
    def version(self) -> int:
        return self._hdr.version

    def _unpack(self, fmt: str, off: int) -> int:
        try:
            return int(struct.unpack_from(fmt, self._buf, off)[0])
        except struct.error as exc:  # an offset in a corrupt bundle points past its end
            raise RccError(f"read at offset {off} past end of file") from exc

    def _u16(self, off: int) -> int:
        return self._unpack(">H", off)

    def _u32(self, off: int) -> int:
        return self._unpack(">I", off)

    def _parse_header(self) -> _Header:
        if len(self._buf) < 20 or bytes(self._buf[:4]) != MAGIC:
            raise RccError("not a Qt resource bundle (bad magic)")
        version, tree, data, names = struct.unpack_from(">IIII", self._buf, 4)
        if version not in (1, 2, 3):
            raise RccError(f"unsupported rcc format version {version}")
        size = len(self._buf)
        if not (tree < size and data <= size and names < size):
            raise RccError("rcc offsets point past end of file")
        return _Header(version, tree, data, names, 14 if version == 1 else 22)

    def _name(self, name_off: int) -> str:
        off = self._hdr.names + name_off
        length = self._u16(off)
        raw = bytes(self._buf[off + 6 : off + 6 + 2 * length])
        if len(raw) != 2 * length:
            raise RccError("name runs past end of file")
        return raw.decode("utf-16-be")

    def _node(self, index: int) -> int:
        off = self._hdr.tree + index * self._hdr.node_size
        if off + self._hdr.node_size > len(self._buf):
            raise RccError(f"tree node {index} past end of file")
        return off

    def _payload(self, node_off: int, flags: int) -> bytes:
        data_off = self._hdr.data + self._u32(node_off + 10)
        length = self._u32(data_off)
        raw = bytes(self._buf[data_off + 4 : data_off + 4 + length])
        if len(raw) != length:
            raise RccError("data entry runs past end of file")
        if flags & FLAG_COMPRESSED:
            if length < 4:
                raise RccError("zlib entry too short")
            expected = struct.unpack_from(">I", raw, 0)[0]
            out = zlib.decompress(raw[4:])
            if len(out) != expected:
                raise RccError(f"zlib entry: expected {expected} bytes, got {len(out)}")
            return out
        if flags & FLAG_COMPRESSED_ZSTD:
            dec = _zstd_decompressor()
            if dec is None:
                raise _ZstdUnavailable
            return dec(raw)
        return raw

    def iter_files(self, stats: RccStats | None = None) -> Iterator[tuple[str, bytes]]:
        """Yield ``(path, bytes)`` for every file, depth-first in tree order.

        Paths are ``/``-joined from the root without a leading slash. Undecodable entries are
        counted in ``stats`` (and skipped) instead of aborting the whole bundle.
        """
        st = stats if stats is not None else RccStats()
        yield from self._walk(0, "", 0, st)

    def _walk(self, index: int, prefix: str, depth: int, st: RccStats) -> Iterator[tuple[str, bytes]]:
        if depth > _MAX_DEPTH:
            raise RccError("rcc tree too deep (cycle?)")
        off = self._node(index)
        flags = self._u16(off + 4)
        if not flags & FLAG_DIRECTORY:
            raise RccError(f"rcc node {index} is not a directory")
        count, first = self._u32(off + 6), self._u32(off + 10)
        for child in range(first, first + count):
            c_off = self._node(child)
            c_flags = self._u16(c_off + 4)
            path = prefix + self._name(self._u32(c_off))
            if c_flags & FLAG_DIRECTORY:
                yield from self._walk(child, path + "/", depth + 1, st)
                continue
            try:
                blob = self._payload(c_off, c_flags)
            except _ZstdUnavailable:
                st.skipped_zstd += 1
                continue
            except (RccError, zlib.error) as exc:
                st.skipped_corrupt += 1
                st.errors.append(f"{path}: {exc}")
                continue
            st.files += 1
            yield path, blob


class _ZstdUnavailable(Exception):
    """Internal: a zstd entry was met but no decoder is installed."""


def iter_rcc(source: bytes | Path, stats: RccStats | None = None) -> Iterator[tuple[str, bytes]]:
    """Yield ``(path, bytes)`` for every file of a bundle given as bytes or a path."""
    reader = RccReader.from_path(source) if isinstance(source, Path) else RccReader(source)
    yield from reader.iter_files(stats)
