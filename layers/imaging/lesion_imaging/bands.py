"""Band keys of a perceptual hash, for near-duplicate search by key lookups instead of a scan.

The 256-bit hash is cut into ``BANDS`` contiguous slices of 32 bits; an image is stored in the bucket
``(band index, slice value)`` of each slice. A new hash looks up, in every band, its own slice and the 32 slices
one bit away from it (``1 + 32`` keys a band). Two hashes that differ in at most ``2 * BANDS - 1`` bits have a
band where they differ in at most one bit (pigeonhole: were every band two bits apart, they would differ in
``2 * BANDS``), so every stored hash within that radius is found, whatever the archive size, with a fixed
``BANDS * 33`` key lookups. Hashes further away are found when some band is still within a bit, which is likely
for realistic variants; benchmarks/ingestion/RESULTS.md measures the recall up to the near-duplicate distance.

32-bit slices keep buckets nearly empty: on HAM10000 (10k images) no bucket holds more than 3 images, and the
slices of different lesions spread over 2^32 values.
"""

from __future__ import annotations

from typing import Final

HASH_BITS: Final = 256
BANDS: Final = 8
PROBE_BITS: Final = 1  # slices looked up at Hamming distance <= this from the hash's own


def band_width(bands: int = BANDS) -> int:
    """Bits per band."""
    if HASH_BITS % (4 * bands):
        raise ValueError(f"{bands} bands do not cut a {HASH_BITS}-bit hash into whole hex digits")
    return HASH_BITS // bands


def guaranteed_radius(bands: int = BANDS, probe_bits: int = PROBE_BITS) -> int:
    """Largest Hamming distance at which a stored hash is always found: ``(probe_bits + 1) * bands - 1``."""
    return (probe_bits + 1) * bands - 1


def band_values(phash: str, bands: int = BANDS) -> list[int]:
    """Each slice of ``phash`` (64 hex digits) as an integer, most significant first."""
    if len(phash) * 4 != HASH_BITS:
        raise ValueError(f"a {HASH_BITS}-bit hash is 64 hex digits, got {len(phash)}")
    digits = band_width(bands) // 4
    return [int(phash[i * digits : (i + 1) * digits], 16) for i in range(bands)]


def bucket_key(band: int, value: int, bands: int = BANDS) -> str:
    """``band#<i>#<slice as fixed-width hex>``."""
    return f"band#{band}#{value:0{band_width(bands) // 4}x}"


def band_keys(phash: str, bands: int = BANDS) -> list[str]:
    """The buckets ``phash`` is stored in, one a band."""
    return [bucket_key(i, v, bands) for i, v in enumerate(band_values(phash, bands))]


def probe_keys(phash: str, bands: int = BANDS) -> list[str]:
    """The buckets to look up for ``phash``: in each band its own slice, then every slice one bit away."""
    width = band_width(bands)
    keys: list[str] = []
    for i, value in enumerate(band_values(phash, bands)):
        keys.append(bucket_key(i, value, bands))
        keys.extend(bucket_key(i, value ^ (1 << bit), bands) for bit in range(width))
    return keys
