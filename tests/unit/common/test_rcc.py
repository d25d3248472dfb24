"""The .rcc reader against bundles built here byte by byte, so no Qt toolchain is needed to test it."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import pytest

from services.common.photos import rcc
from services.common.photos.rcc import RccError, RccReader, RccStats, iter_rcc


@dataclass(frozen=True)
class Stored:
    """A file whose payload is written exactly as given, under the given node flags."""

    payload: bytes
    flags: int


def zlib_entry(content: bytes) -> Stored:
    """What Qt's qCompress stores: big-endian uncompressed length, then a zlib stream."""
    return Stored(struct.pack(">I", len(content)) + zlib.compress(content, 9), rcc.FLAG_COMPRESSED)


Entry = Union[bytes, Stored, "dict[str, Entry]"]


def _qt_hash(name: str) -> int:
    h = 0
    raw = name.encode("utf-16-be")
    for (unit,) in struct.iter_unpack(">H", raw):
        h = ((h << 4) + unit) & 0xFFFFFFFF
        g = h & 0xF0000000
        h ^= g >> 23
        h &= ~g & 0xFFFFFFFF
    return h


def build_rcc(tree: dict[str, Entry], version: int = 3) -> bytes:
    """Serialise ``tree`` like ``rcc -binary``: header, data, names, then a breadth-first node table."""
    data = bytearray()
    names = bytearray()
    name_offsets: dict[str, int] = {}

    def name_off(name: str) -> int:
        if name not in name_offsets:
            name_offsets[name] = len(names)
            encoded = name.encode("utf-16-be")
            names.extend(struct.pack(">HI", len(encoded) // 2, _qt_hash(name)) + encoded)
        return name_offsets[name]

    # Breadth-first: a directory's children occupy consecutive node indices.
    order: list[tuple[str, Entry]] = [("", tree)]
    first_child: dict[int, int] = {}
    i = 0
    while i < len(order):
        entry = order[i][1]
        if isinstance(entry, dict):
            first_child[i] = len(order)
            order.extend(entry.items())
        i += 1

    mtime = struct.pack(">Q", 1_700_000_000_000) if version >= 2 else b""
    nodes = bytearray()
    for index, (name, entry) in enumerate(order):
        n_off = name_off(name) if index else 0
        if isinstance(entry, dict):
            nodes += struct.pack(">IHII", n_off, rcc.FLAG_DIRECTORY, len(entry), first_child[index]) + mtime
            continue
        stored = entry if isinstance(entry, Stored) else Stored(entry, 0)
        d_off = len(data)
        data.extend(struct.pack(">I", len(stored.payload)) + stored.payload)
        nodes += struct.pack(">IHHHI", n_off, stored.flags, 0, 1, d_off) + mtime

    header_len = 24 if version >= 3 else 20
    data_off = header_len
    names_off = data_off + len(data)
    tree_off = names_off + len(names)
    header = b"qres" + struct.pack(">IIII", version, tree_off, data_off, names_off)
    if version >= 3:
        header += struct.pack(">I", 0)
    return header + bytes(data) + bytes(names) + bytes(nodes)


JPEG_LIKE = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"

SAMPLE: dict[str, Entry] = {
    "readme.txt": b"plain bytes",
    "images": {
        "photo.jpg": JPEG_LIKE,
        "packed.webp": zlib_entry(b"RIFF" + b"webp-ish payload " * 100),
        "deep": {
            "caf\u00e9 \U0001f600.png": zlib_entry(bytes(range(256)) * 3),
            "empty.bin": b"",
        },
    },
    "empty_dir": {},
    "zero.dat": zlib_entry(b""),
}

EXPECTED = [
    ("readme.txt", b"plain bytes"),
    ("images/photo.jpg", JPEG_LIKE),
    ("images/packed.webp", b"RIFF" + b"webp-ish payload " * 100),
    ("images/deep/caf\u00e9 \U0001f600.png", bytes(range(256)) * 3),
    ("images/deep/empty.bin", b""),
    ("zero.dat", b""),
]


@pytest.mark.parametrize("version", [1, 2, 3])
def test_yields_every_file_with_exact_path_and_bytes(version: int) -> None:
    stats = RccStats()
    got = list(iter_rcc(build_rcc(SAMPLE, version), stats))
    assert got == EXPECTED
    assert (stats.files, stats.skipped_zstd, stats.skipped_corrupt) == (len(EXPECTED), 0, 0)
    assert RccReader(build_rcc(SAMPLE, version)).version == version


def test_reads_from_a_path(tmp_path: Path) -> None:
    bundle = tmp_path / "sample.rcc"
    bundle.write_bytes(build_rcc(SAMPLE))
    assert list(iter_rcc(bundle)) == EXPECTED


def test_empty_bundle_yields_nothing() -> None:
    assert list(iter_rcc(build_rcc({}))) == []


def test_zlib_length_mismatch_is_counted_not_fatal() -> None:
    bad = Stored(struct.pack(">I", 999) + zlib.compress(b"short"), rcc.FLAG_COMPRESSED)
    garbage = Stored(struct.pack(">I", 4) + b"not zlib", rcc.FLAG_COMPRESSED)
    stats = RccStats()
    got = list(iter_rcc(build_rcc({"bad.png": bad, "garbage.png": garbage, "ok.txt": b"ok"}), stats))
    assert got == [("ok.txt", b"ok")]
    assert stats.skipped_corrupt == 2
    assert [e.split(":")[0] for e in stats.errors] == ["bad.png", "garbage.png"]


def test_zstd_entries_are_skipped_and_counted_without_a_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rcc, "_zstd_decompressor", lambda: None)
    tree: dict[str, Entry] = {"a.png": Stored(b"\x28\xb5\x2f\xfd frame", rcc.FLAG_COMPRESSED_ZSTD), "b": b"B"}
    stats = RccStats()
    assert list(iter_rcc(build_rcc(tree), stats)) == [("b", b"B")]
    assert (stats.files, stats.skipped_zstd) == (1, 1)


def test_zstd_entries_go_through_the_decoder_when_one_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(buf: bytes) -> bytes:
        return buf.upper()

    monkeypatch.setattr(rcc, "_zstd_decompressor", lambda: fake)
    tree: dict[str, Entry] = {"d": {"z.png": Stored(b"frame", rcc.FLAG_COMPRESSED_ZSTD)}}
    assert list(iter_rcc(build_rcc(tree))) == [("d/z.png", b"FRAME")]


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "bad magic"),
        (b"RCC!" + bytes(20), "bad magic"),
        (b"qres" + struct.pack(">IIII", 9, 20, 20, 20), "version 9"),
        (b"qres" + struct.pack(">IIII", 3, 4000, 24, 24) + bytes(4), "past end"),
    ],
)
def test_rejects_non_bundles(blob: bytes, message: str) -> None:
    with pytest.raises(RccError, match=message):
        list(iter_rcc(blob))


def test_truncated_tree_raises() -> None:
    blob = build_rcc(SAMPLE)
    with pytest.raises(RccError):
        list(iter_rcc(blob[:-30]))


def test_data_offset_past_end_is_counted_as_corrupt() -> None:
    blob = bytearray(build_rcc({"a.txt": b"A", "b.txt": b"B"}))
    tree_off = struct.unpack_from(">I", blob, 8)[0]
    first_file = tree_off + 22  # node 1 (node 0 is the root)
    struct.pack_into(">I", blob, first_file + 10, 0x7FFF_0000)
    stats = RccStats()
    assert list(iter_rcc(bytes(blob), stats)) == [("b.txt", b"B")]
    assert stats.skipped_corrupt == 1
