"""Remove metadata from a JPEG without re-encoding it: keep only the segments decoding needs, each one checked.

The validation's fast path (``lesion_imaging.validation``): where this declines, the upload is re-encoded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Final

import simplejpeg

# The JFIF header of every clean JPEG, the one Pillow writes (version 1.01, no units, 1:1 density, no
# thumbnail). Regenerated, not copied: the upload's version and density fields and any bytes after them are free
# for text, and none of them changes a decoded pixel.
_JFIF_APP0: Final = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
_SOF0, _SOF1, _DHT, _SOS, _DQT, _DRI, _APP0, _APP14, _COM, _EOI = (
    0xC0, 0xC1, 0xC4, 0xDA, 0xDB, 0xDD, 0xE0, 0xEE, 0xFE, 0xD9
)
# libjpeg's JWRN_HIT_MARKER: the decoder needed bits that the data did not have.
_NEEDED_BITS_MISSING: Final = "premature end of data segment"
_DC_SYMBOLS: Final = frozenset(range(12))  # DC difference categories of 8-bit samples
# AC run/size pairs of 8-bit samples: sizes 1-10 with any run, EOB (0x00) and ZRL (0xF0).
_AC_SYMBOLS: Final = frozenset({0x00, 0xF0} | {run << 4 | size for run in range(16) for size in range(1, 11)})


class _Decline(Exception):
    """Something the lossless path does not vouch for: the caller re-encodes instead."""


@dataclass(frozen=True, slots=True)
class _Rebuilt:
    """A JPEG rebuilt from the segments decoding needs; ``data[scan_start:scan_end]`` is its entropy-coded data."""

    data: bytes
    scan_start: int
    scan_end: int


def _u16(data: bytes, pos: int) -> int:
    if pos + 2 > len(data):
        raise _Decline
    return int.from_bytes(data[pos : pos + 2], "big")


@functools.lru_cache(maxsize=256)
def _dqt_slots(payload: bytes) -> tuple[int, ...] | None:
    """The slots a DQT segment defines (8-bit tables exactly filling it), or None when it is not one.

    Cached: most uploads carry one of a few encoders' tables.
    """
    slots: list[int] = []
    for i in range(0, len(payload), 65):
        precision, slot = payload[i] >> 4, payload[i] & 0x0F
        table = payload[i + 1 : i + 65]
        if precision != 0 or slot > 3 or len(table) != 64 or 0 in table:
            return None
        slots.append(slot)
    return tuple(slots) if slots else None


@functools.lru_cache(maxsize=256)
def _dht_slots(payload: bytes) -> tuple[tuple[int, int], ...] | None:
    """The (class, slot) pairs a DHT segment defines, or None when it is not exactly a run of valid tables.

    Each table must be a prefix code over distinct symbols that are valid for its class: decoders never check
    symbols they do not meet, so anything else could spell text.
    """
    slots: list[tuple[int, int]] = []
    i = 0
    while i < len(payload):
        table_class, slot = payload[i] >> 4, payload[i] & 0x0F
        counts = payload[i + 1 : i + 17]
        if table_class > 1 or slot > 3 or len(counts) != 16:
            return None
        total = sum(counts)
        symbols = payload[i + 17 : i + 17 + total]
        distinct = set(symbols)
        if not total or len(symbols) != total or len(distinct) != total:
            return None
        if not distinct <= (_AC_SYMBOLS if table_class else _DC_SYMBOLS):
            return None
        free = 1
        for count in counts:  # Kraft: the codes of each length must fit in what the shorter ones left
            free = 2 * free - count
            if free < 0:
                return None
        slots.append((table_class, slot))
        i += 17 + total
    return tuple(slots) if slots else None


def _define(slots: tuple[int, ...] | tuple[tuple[int, int], ...] | None, defined: dict[Any, bool]) -> None:
    """Record table definitions; a slot defined twice before the scan hides the first table: refused."""
    if slots is None or len(set(slots)) != len(slots) or any(slot in defined for slot in slots):
        raise _Decline
    defined.update(dict.fromkeys(slots, False))


def _check_sof(payload: bytes) -> dict[int, int]:
    """An 8-bit sequential frame of 1 or 3 components with a size in the header; component id -> table slot."""
    if len(payload) < 6:
        raise _Decline
    count = payload[5]
    if payload[0] != 8 or not _u16(payload, 1) or not _u16(payload, 3) or count not in (1, 3):
        raise _Decline
    if len(payload) != 6 + 3 * count:
        raise _Decline
    components: dict[int, int] = {}
    for k in range(count):
        ident, sampling, slot = payload[6 + 3 * k : 9 + 3 * k]
        if ident in components or not (1 <= sampling >> 4 <= 4 and 1 <= sampling & 0x0F <= 4) or slot > 3:
            raise _Decline
        components[ident] = slot
    return components


def _check_sos(
    payload: bytes, frame: dict[int, int], quant: dict[int, bool], huffman: dict[tuple[int, int], bool]
) -> None:
    """The one sequential scan, interleaving every component, and every table defined is one it uses.

    A table nothing uses never reaches a pixel, so it is free for text.
    """
    count = payload[0] if payload else 0
    if count != len(frame) or len(payload) != 4 + 2 * count or payload[1 + 2 * count :] != b"\x00\x3f\x00":
        raise _Decline
    for k, ident in enumerate(frame):
        if payload[1 + 2 * k] != ident:
            raise _Decline
        dc, ac, slot = (0, payload[2 + 2 * k] >> 4), (1, payload[2 + 2 * k] & 0x0F), frame[ident]
        if dc not in huffman or ac not in huffman or slot not in quant:
            raise _Decline
        huffman[dc] = huffman[ac] = quant[slot] = True
    if not all(quant.values()) or not all(huffman.values()):
        raise _Decline


def _next_segment(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """The marker at ``pos`` (after any fill bytes), its segment (with its length field) and the position after it."""
    n = len(data)
    if pos >= n or data[pos] != 0xFF:
        raise _Decline
    while pos < n and data[pos] == 0xFF:  # fill bytes
        pos += 1
    if pos >= n:
        raise _Decline
    marker = data[pos]
    length = _u16(data, pos + 1)
    if length < 2 or pos + 1 + length > n:
        raise _Decline
    return marker, data[pos + 1 : pos + 1 + length], pos + 1 + length


def _rebuild(data: bytes) -> _Rebuilt:
    """Copy the segments decoding needs, checked, and refuse (``_Decline``) anything else (see the caller)."""
    if data[:2] != b"\xff\xd8":
        raise _Decline
    out = bytearray(b"\xff\xd8" + _JFIF_APP0)
    frame: dict[int, int] | None = None
    quant: dict[int, bool] = {}
    huffman: dict[tuple[int, int], bool] = {}
    marker, segment, pos = _next_segment(data, 2)
    # JFIF first, as today's stored form: it tells decoders the colour transform (YCbCr).
    if marker != _APP0 or not segment[2:].startswith(b"JFIF\x00") or len(segment) - 2 < 14:
        raise _Decline
    while True:
        marker, segment, pos = _next_segment(data, pos)
        payload = segment[2:]
        if marker == _APP14:  # Adobe: decides the colour transform, so the pixels would change without it
            raise _Decline
        if _APP0 <= marker <= 0xEF or marker == _COM:
            continue
        if marker == _DQT:
            _define(_dqt_slots(payload), quant)
        elif marker == _DHT:
            _define(_dht_slots(payload), huffman)
        elif marker in (_SOF0, _SOF1) and frame is None:
            frame = _check_sof(payload)
        elif marker == _DRI and payload == b"\x00\x00":
            continue  # "no restart interval": the default, so nothing to keep
        elif marker == _SOS and frame is not None:
            _check_sos(payload, frame, quant, huffman)
            out += bytes((0xFF, marker)) + segment
            break
        else:
            # Everything else: other frame types (progressive, lossless, hierarchical, arithmetic), DAC, DNL,
            # restart intervals (each interval can end in bytes no decoder reads), DHP, EXP, JPGn, RSTn and TEM
            # outside a scan, a second SOI, EOI before a scan.
            raise _Decline
        out += bytes((0xFF, marker)) + segment
    return _copy_scan(data, pos, out)


def _copy_scan(data: bytes, pos: int, out: bytearray) -> _Rebuilt:
    """Append the entropy-coded data starting at ``pos`` and EOI to ``out``; it must be the last thing but EOI."""
    n = len(data)
    start, end = pos, pos
    while True:  # the entropy-coded data runs to the first 0xFF that is not a stuffed 0xFF00
        end = data.find(b"\xff", end)
        if end < 0 or end + 1 >= n:
            raise _Decline
        if data[end + 1] != 0x00:
            break
        end += 2
    if end == start:
        raise _Decline
    scan_start = len(out)
    out += data[start:end]
    scan_end = len(out)
    while end < n and data[end] == 0xFF:
        end += 1
    if end >= n or data[end] != _EOI:  # one scan only, then EOI; what follows EOI is dropped
        raise _Decline
    out += b"\xff\xd9"
    return _Rebuilt(bytes(out), scan_start, scan_end)


def _scan_has_slack(rebuilt: _Rebuilt) -> bool:
    """Whether bytes after the last coded block ride along in the scan (decoders skip them: room for text).

    Where the coded data ends is only known by Huffman-decoding the whole scan, so libjpeg-turbo is asked: decode
    without the scan's last byte. Only when that byte holds bits the decoder needs does it report running out
    ("premature end of data segment"); slack of any length gives no warning or "extraneous bytes". Strict mode
    turns either warning into an error; decoding grey at 1/8 scale skips most of the work after entropy decoding.
    """
    data, start, end = rebuilt.data, rebuilt.scan_start, rebuilt.scan_end
    cut = end - 2 if end - 2 >= start and data[end - 2 : end] == b"\xff\x00" else end - 1  # a stuffed 0xFF is one
    try:
        simplejpeg.decode_jpeg(
            data[:cut] + data[end:], colorspace="GRAY", strict=True, min_height=1, min_width=1, min_factor=8
        )
    except Exception as err:  # anything but the one warning means "not proven": the caller re-encodes
        return _NEEDED_BITS_MISSING not in str(err)
    return True


def strip_jpeg_metadata(data: bytes) -> bytes | None:
    """The same picture, coded data byte for byte, with nothing but what decoding needs; None when not possible.

    An allow-list, every kept segment checked: SOI; a JFIF APP0 first (regenerated with fixed fields and no
    thumbnail); 8-bit DQT and valid-symbol DHT tables, each used by the scan and defined once; one 8-bit baseline
    or extended sequential frame (SOF0/SOF1) of 1 or 3 components; one interleaved scan (SOS and its entropy-coded
    data, with no bytes after the last coded block); EOI. APP1-APP15 (EXIF with GPS, XMP, ICC, IPTC, MPF...)
    other than APP14, and COM, are dropped, and so is anything after EOI. Everything else (an Adobe APP14,
    progressive and other frame types, restart intervals, DNL, DAC, the reserved markers, a table no component
    uses) makes it decline (None), and the caller re-encodes. The pixels are exactly those the upload decodes to,
    at a fraction of a re-encode's cost.

    What is left is what decoders read; information encoded on purpose into the used tables' values or into the
    coefficients is part of the picture and cannot be removed without changing it.
    """
    try:
        rebuilt = _rebuild(data)
    except _Decline:
        return None
    return None if _scan_has_slack(rebuilt) else rebuilt.data
