"""Hash-list parsing: ThreatExchange lines and HMA-style CSV, malformed rows reported one by one."""

from __future__ import annotations

from services.common.banks.exchange import guess_format, parse_list

PDQ = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"


def test_te_lines_with_every_kind_of_bad_row() -> None:
    text = "\n".join(
        [
            "# a comment",
            f"pdq {PDQ}",
            f"HASH_MD5 {'a' * 32}",
            "pdq nothex",
            "video_md5 " + "b" * 32,
            "pdq",
            "",
            f"sha256 {'c' * 64}",
        ]
    )
    signals, malformed, rows = parse_list(text, "te")
    assert [(s.kind, s.value) for s in signals] == [("pdq", PDQ), ("md5", "a" * 32), ("sha256", "c" * 64)]
    assert rows == 6
    assert [(m.row, m.text) for m in malformed] == [(4, "pdq nothex"), (5, "video_md5 " + "b" * 32), (6, "pdq")]
    assert "64 hex digits" in malformed[0].reason
    assert "unsupported signal type" in malformed[1].reason


def test_csv_header_id_and_metadata() -> None:
    text = f"signal_type,signal_value,content_id,tags\npdq,{PDQ},item-1,csam\nmd5,{'d' * 32},,\npdq,{PDQ[:-1]},x,y\n"
    signals, malformed, rows = parse_list(text, "csv")
    assert rows == 3
    assert signals[0].item_id == "item-1" and signals[0].metadata == {"tags": "csam"}
    assert signals[1].metadata == {} and len(signals[1].item_id) == 16
    assert [m.row for m in malformed] == [4]


def test_format_guess() -> None:
    assert guess_format(f"pdq {PDQ}\n") == "te"
    assert guess_format(f"signal_type,signal_value\npdq,{PDQ}\n") == "csv"
    assert guess_format("", "list.csv") == "csv"
