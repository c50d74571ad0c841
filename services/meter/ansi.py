"""Incremental ANSI escape stripping, to count log bytes the way they are stored (SPEC 2.1).

Feed byte chunks exactly as they come off a pipe; `feed` returns the visible bytes. A sequence
split across chunks at any byte is recognised as if the stream had come whole.

What is stripped (ECMA-48 / xterm syntax):
- CSI: `ESC [` params (0x30-0x3F), intermediates (0x20-0x2F), one final byte (0x40-0x7E):
  colours `ESC[31m`, cursor moves `ESC[2J`, private modes `ESC[?25l`.
- Strings: OSC `ESC ]`, DCS `ESC P`, SOS `ESC X`, PM `ESC ^`, APC `ESC _`, each ended by BEL
  or ST (`ESC \\`); a new ESC also ends one, as in terminals.
- Other escapes: `ESC` + intermediates (0x20-0x2F) + a final 0x30-0x7E (`ESC(B`, `ESC=`, `ESC7`).
- C1 CSI only in its UTF-8 form `C2 9B` (U+009B). Output is treated as UTF-8, where a raw 0x9B
  byte is a continuation byte (the second byte of "ě" is 0x9B): stripping it would eat text.
  Raw 8-bit C1 controls are therefore never interpreted, like a UTF-8 terminal does.

Metering must not be evaded, so bytes are only left uncounted when they form a complete,
well-formed sequence. A sequence that meets an impossible byte, grows past its length limit,
or is still open at end of stream is counted as visible text, byte for byte; the byte that
broke it is then read afresh. Otherwise one stray `ESC ]` could hide everything after it.
"""

from __future__ import annotations

import re
from enum import Enum, auto
from typing import Final

ESC: Final = 0x1B
BEL: Final = 0x07
# Longest escape or control sequence, and longest string (OSC 8 links, OSC 52 clipboards
# are long; anything longer is far more likely a stray introducer than a real sequence).
MAX_SEQUENCE: Final = 256
MAX_STRING: Final = 64 * 1024

# Where something other than plain text may start: ESC, C1 CSI in UTF-8, or a C2 lead byte
# at the very end of a chunk (its 9B may be the first byte of the next chunk).
_SPECIAL = re.compile(rb"\x1b|\xc2\x9b|\xc2\Z")
# A whole CSI inside one chunk: the common case (colours), skipped without the byte loop.
_WHOLE_CSI = re.compile(rb"(?:\x1b\[|\xc2\x9b)[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]")
# Inside a string, only C0 controls (BEL, ESC or a breaking control) need a look.
_STRING_STOP = re.compile(rb"[\x00-\x1f]")
_STRING_INTRODUCERS: Final = frozenset(b"]PX^_")


class _State(Enum):
    GROUND = auto()
    LEAD_C2 = auto()  # saw C2 at the end of a chunk: maybe C1 CSI, maybe a letter like "é"
    ESCAPE = auto()
    ESCAPE_INTERMEDIATE = auto()
    CSI_PARAM = auto()
    CSI_INTERMEDIATE = auto()
    STRING = auto()
    STRING_ESCAPE = auto()  # ESC inside a string: ST if "\" follows


class AnsiStripper:
    """Strips ANSI escape sequences from a byte stream fed in arbitrary chunks."""

    def __init__(self) -> None:
        self._state = _State.GROUND
        self._pending = bytearray()  # the sequence in progress, emitted if it breaks
        self.visible_bytes = 0
        """Visible bytes returned so far, including by `finish`."""

    def feed(self, chunk: bytes) -> bytes:
        """Take the next chunk of the stream; return its visible bytes."""
        out = bytearray()
        i, n = 0, len(chunk)
        while i < n:
            if self._state is _State.GROUND:
                i = self._ground(chunk, i, out)
            elif self._state is _State.STRING:
                i = self._string_run(chunk, i, out)
            else:
                i = self._step(chunk[i], i, out)
        self.visible_bytes += len(out)
        return bytes(out)

    def finish(self) -> bytes:
        """End of stream: a sequence still open is counted as text."""
        out = bytes(self._pending)
        self._pending.clear()
        self._state = _State.GROUND
        self.visible_bytes += len(out)
        return out

    def _ground(self, chunk: bytes, i: int, out: bytearray) -> int:
        found = _SPECIAL.search(chunk, i)
        if found is None:
            out += chunk[i:]
            return len(chunk)
        start = found.start()
        out += chunk[i:start]
        whole = _WHOLE_CSI.match(chunk, start)
        if whole is not None and whole.end() - start <= MAX_SEQUENCE:
            return whole.end()
        if chunk[start] == ESC:
            self._begin(_State.ESCAPE, chunk[start : start + 1])
            return start + 1
        if start + 1 < len(chunk):  # C2 9B: C1 CSI, not complete in this chunk
            self._begin(_State.CSI_PARAM, chunk[start : start + 2])
            return start + 2
        self._begin(_State.LEAD_C2, chunk[start : start + 1])
        return start + 1

    def _string_run(self, chunk: bytes, i: int, out: bytearray) -> int:
        stop = _STRING_STOP.search(chunk, i)
        end = len(chunk) if stop is None else stop.start()
        take = min(end - i, MAX_STRING - len(self._pending))
        self._pending += chunk[i : i + take]
        if len(self._pending) >= MAX_STRING:
            self._abort(out)
            return i + take
        if take < end - i or stop is None:
            return i + take
        return self._step(chunk[end], end, out)

    def _step(self, byte: int, i: int, out: bytearray) -> int:
        """Advance the sequence in progress by one byte; return where to continue."""
        state = self._state
        if state is _State.LEAD_C2:
            if byte == 0x9B:
                return self._continue(_State.CSI_PARAM, byte, i, out)
            return self._break(i, out)
        if state is _State.ESCAPE:
            if byte == ord("["):
                return self._continue(_State.CSI_PARAM, byte, i, out)
            if byte in _STRING_INTRODUCERS:
                return self._continue(_State.STRING, byte, i, out)
            if 0x20 <= byte <= 0x2F:
                return self._continue(_State.ESCAPE_INTERMEDIATE, byte, i, out)
            return self._complete(i) if 0x30 <= byte <= 0x7E else self._break(i, out)
        if state is _State.ESCAPE_INTERMEDIATE:
            if 0x20 <= byte <= 0x2F:
                return self._continue(state, byte, i, out)
            return self._complete(i) if 0x30 <= byte <= 0x7E else self._break(i, out)
        if state is _State.CSI_PARAM and 0x30 <= byte <= 0x3F:
            return self._continue(state, byte, i, out)
        if state in (_State.CSI_PARAM, _State.CSI_INTERMEDIATE):
            if 0x20 <= byte <= 0x2F:
                return self._continue(_State.CSI_INTERMEDIATE, byte, i, out)
            return self._complete(i) if 0x40 <= byte <= 0x7E else self._break(i, out)
        if state is _State.STRING:
            if byte == BEL:
                return self._complete(i)
            if byte == ESC:
                return self._continue(_State.STRING_ESCAPE, byte, i, out)
            return self._break(i, out)  # another C0 control: not a real string
        # STRING_ESCAPE: "ESC \" is ST; any other ESC ends the string and starts anew.
        if byte == ord("\\"):
            return self._complete(i)
        self._begin(_State.ESCAPE, b"\x1b")
        return i

    def _begin(self, state: _State, introducer: bytes) -> None:
        self._state = state
        self._pending[:] = introducer

    def _continue(self, state: _State, byte: int, i: int, out: bytearray) -> int:
        self._state = state
        self._pending.append(byte)
        limit = MAX_STRING if state in (_State.STRING, _State.STRING_ESCAPE) else MAX_SEQUENCE
        if len(self._pending) >= limit:
            self._abort(out)
        return i + 1

    def _complete(self, i: int) -> int:
        self._pending.clear()
        self._state = _State.GROUND
        return i + 1

    def _break(self, i: int, out: bytearray) -> int:
        # The byte at i cannot continue the sequence: the sequence was text; read i afresh.
        self._abort(out)
        return i

    def _abort(self, out: bytearray) -> None:
        out += self._pending
        self._pending.clear()
        self._state = _State.GROUND


def strip_ansi(data: bytes) -> bytes:
    """The visible bytes of a whole stream."""
    stripper = AnsiStripper()
    return stripper.feed(data) + stripper.finish()
