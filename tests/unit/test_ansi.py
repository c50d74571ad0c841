"""The ANSI stripper: what log.bytes counts, however the pipe happens to chunk the output."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.meter.ansi import MAX_SEQUENCE, MAX_STRING, AnsiStripper, strip_ansi


def fed_in_pieces(data: bytes, cuts: list[int]) -> tuple[bytes, int]:
    """Feed `data` cut at the given offsets; return the visible bytes and the running count."""
    stripper = AnsiStripper()
    out, start = bytearray(), 0
    for cut in [*sorted(set(cuts)), len(data)]:
        out += stripper.feed(data[start:cut])
        start = cut
    out += stripper.finish()
    return bytes(out), stripper.visible_bytes


@pytest.mark.parametrize(
    ("raw", "visible"),
    [
        (b"\x1b[31mred\x1b[0m", b"red"),
        (b"\x1b[1;38;2;255;128;0mbold\x1b[m", b"bold"),
        (b"\x1b[2J\x1b[Htop-left", b"top-left"),
        (b"\x1b[?25lhidden cursor\x1b[?25h", b"hidden cursor"),
        (b"\x1b[1 qcursor shape", b"cursor shape"),
        (b"\x1b]0;my title\x07after", b"after"),
        (b"\x1b]8;;https://example.com/\x1b\\link\x1b]8;;\x1b\\", b"link"),
        (b"\x1bP1$r0m\x1b\\dcs", b"dcs"),
        (b"\x1b_apc payload\x07apc", b"apc"),
        (b"\x1b(Bcharset", b"charset"),
        (b"\x1b=keypad\x1b>", b"keypad"),
        (b"\x1b7saved\x1b8", b"saved"),
        (b"\x1b#8align", b"align"),
        (b"\xc2\x9b31mC1 CSI\xc2\x9b0m", b"C1 CSI"),
        (b"\x1b]0;title\x1b[31mred", b"red"),  # a new ESC ends an unterminated string
    ],
)
def test_escape_sequences_are_stripped(raw: bytes, visible: bytes) -> None:
    assert strip_ansi(raw) == visible


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii\n",
        "ě š ř, Ûber: the second byte of ě is 0x9b\n",
        "emoji 🎉 and CJK 漢字, NBSP\u00a0and ©\n",
        "tabs\tcarriage\rreturns\bbackspace\x07bell\n",
    ],
)
def test_text_without_escapes_is_counted_byte_for_byte(text: str) -> None:
    data = text.encode()
    assert strip_ansi(data) == data


def test_a_raw_c1_byte_is_text_not_a_csi() -> None:
    # A lone 0x9b is not valid UTF-8 on its own, and we never read raw C1 as a control.
    assert strip_ansi(b"a\x9b31mb") == b"a\x9b31mb"


@pytest.mark.parametrize(
    ("raw", "visible"),
    [
        (b"\x1b[31\nred", b"\x1b[31\nred"),  # a newline cannot be inside a CSI
        (b"\x1b[3\x1b[0mx", b"\x1b[3x"),  # ESC breaks the first, starts a proper second
        (b"\x1b\x1b[0mx", b"\x1bx"),
        (b"\x1b]0;title\nnext line", b"\x1b]0;title\nnext line"),
        (b"\x1b[5;", b"\x1b[5;"),  # still open at end of stream
        (b"\x1b", b"\x1b"),
    ],
)
def test_broken_or_unfinished_sequences_count_as_text(raw: bytes, visible: bytes) -> None:
    assert strip_ansi(raw) == visible


def test_a_stray_string_introducer_cannot_hide_unbounded_output() -> None:
    body = b"x" * (3 * MAX_STRING)
    visible = strip_ansi(b"\x1b]" + body)
    assert visible == b"\x1b]" + body


def test_parsing_resumes_exactly_at_the_string_limit() -> None:
    raw = b"\x1b]" + b"x" * MAX_STRING + b"\xc2\x9b0my"
    assert strip_ansi(raw) == b"\x1b]" + b"x" * MAX_STRING + b"y"
    assert fed_in_pieces(raw, [7, MAX_STRING - 1, MAX_STRING + 3])[0] == strip_ansi(raw)


def test_an_overlong_csi_counts_as_text() -> None:
    raw = b"\x1b[" + b"1;" * MAX_SEQUENCE + b"m"
    assert strip_ansi(raw) == raw


def test_a_csi_at_the_length_limit_is_still_stripped() -> None:
    raw = b"\x1b[" + b"1" * (MAX_SEQUENCE - 3) + b"m"
    assert len(raw) == MAX_SEQUENCE
    assert strip_ansi(raw + b"ok") == b"ok"
    assert fed_in_pieces(raw + b"ok", [1, 100])[0] == b"ok"


def test_a_sequence_split_at_every_byte_is_still_recognised() -> None:
    raw = b"a\x1b[38;5;196mb\x1b]0;t\x1b\\c\xc2\x9b0md\xc3\xa9"
    assert fed_in_pieces(raw, list(range(len(raw)))) == (b"abcd\xc3\xa9", 6)


def test_visible_bytes_counts_everything_returned() -> None:
    stripper = AnsiStripper()
    got = stripper.feed(b"\x1b[1mab") + stripper.feed(b"\x1b[") + stripper.finish()
    assert got == b"ab\x1b["
    assert stripper.visible_bytes == 4


# Bytes that make sequences likely: introducers, parameters, finals, terminators, UTF-8.
noisy = st.lists(
    st.sampled_from(
        [
            *(b"\x1b", b"[", b"]", b"P", b"(", b"\\", b"\x07", b"\xc2", b"\x9b", b"\xc3\xa9"),
            *(b"0", b"1;", b"?", b" ", b"m", b"H", b"B", b"\n", b"a", b"xyz"),
        ]
    ),
    max_size=80,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(data=st.one_of(noisy, st.binary(max_size=200)), cuts=st.lists(st.integers(0, 200)))
def test_chunk_boundaries_never_change_the_result(data: bytes, cuts: list[int]) -> None:
    whole = strip_ansi(data)
    pieces, count = fed_in_pieces(data, [c for c in cuts if c <= len(data)])
    assert pieces == whole
    assert count == len(whole)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300)))
def test_bytes_without_an_escape_pass_whole(data: bytes, cuts: list[int]) -> None:
    plain = data.replace(b"\x1b", b"").replace(b"\xc2\x9b", b"")
    visible, count = fed_in_pieces(plain, [c for c in cuts if c <= len(plain)])
    assert visible == plain
    assert count == len(plain)


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(codec="utf-8", exclude_characters="\x1b\x9b")))
def test_utf8_text_is_counted_byte_for_byte(text: str) -> None:
    data = text.encode()
    assert strip_ansi(data) == data


sgr = st.lists(st.integers(0, 255), max_size=6).map(
    lambda ps: b"\x1b[" + b";".join(str(p).encode() for p in ps) + b"m"
)
other = st.sampled_from(
    [b"\x1b[2J", b"\x1b[?1049h", b"\x1b]0;job 42\x07", b"\x1b]2;t\x1b\\", b"\x1b(B", b"\xc2\x9bK"]
)


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.tuples(st.one_of(sgr, other), st.text(max_size=20)), max_size=20),
    cuts=st.lists(st.integers(0, 2000)),
)
def test_well_formed_sequences_around_text_leave_exactly_the_text(
    parts: list[tuple[bytes, str]], cuts: list[int]
) -> None:
    text = "".join(t for _, t in parts).replace("\x1b", "").replace("\x9b", "")
    raw = b"".join(seq + t.replace("\x1b", "").replace("\x9b", "").encode() for seq, t in parts)
    visible, count = fed_in_pieces(raw, [c for c in cuts if c <= len(raw)])
    assert visible == text.encode()
    assert count == len(text.encode())
