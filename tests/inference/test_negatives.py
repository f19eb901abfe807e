"""Every file of ../shared/data/negatives gets the behaviour its negatives.csv row expects; HAM10000 passes.

Skipped where the shared data is absent (a user's machine).
"""

from __future__ import annotations

import csv
from typing import Any

import numpy as np
import pytest

from .helpers import HAM_IMAGES, NEGATIVES, SAMPLE_IMAGES, Server

_CSV = NEGATIVES / "negatives.csv"
ROWS = list(csv.DictReader(_CSV.read_text().splitlines())) if _CSV.is_file() else []
needs_data = pytest.mark.skipif(not ROWS, reason="../shared/data/negatives is not present")


def _invoke(server: Server, name: str) -> tuple[int, dict[str, Any]]:
    # application/x-image: the bytes decide the format, as the file names of these files cannot be trusted.
    return server.invoke((NEGATIVES / name).read_bytes(), "application/x-image")


def _check(expected: str, status: int, answer: dict[str, Any]) -> None:
    """The behaviour a negatives.csv ``expected_behaviour`` asks for."""
    if status != 200:
        assert 400 <= status < 500 and answer["error"], answer
    pred = answer["predictions"][0] if status == 200 else None
    if expected == "reject / out-of-distribution":
        assert pred is None or pred["ood"]["flag"], pred
    elif expected == "error":
        assert status == 400
    elif expected in ("error or handled gracefully", "decodes with artefacts or error"):
        assert status in (200, 400)
    elif expected == "low confidence / reject":
        assert pred is not None and pred["ood"]["flag"] and "blank_image" in pred["ood"]["reasons"]
    elif expected == "reject or handle tiny input":
        assert pred is None or "too_small" in pred["ood"]["reasons"]
    elif expected.startswith("EXIF transpose"):
        assert pred is not None and (pred["image"]["width"], pred["image"]["height"]) == (450, 600)
    elif expected == "convert to RGB":
        assert pred is not None and any(c.endswith("->RGB") for c in pred["image"]["conversions"])
    elif expected == "drop alpha":
        assert pred is not None and "RGBA->RGB" in pred["image"]["conversions"]
    elif expected == "convert / scale correctly":
        assert pred is not None and "I;16->RGB" in pred["image"]["conversions"]
        assert abs(pred["ood"]["image_z"]["brightness"]) < 3  # clipping to 8 bits would make it white
    else:  # decode normally, by content, resize, channel handling: answered
        assert pred is not None, answer


@needs_data
@pytest.mark.parametrize("row", ROWS, ids=[r["file"] for r in ROWS])
def test_negative_file_gets_expected_behaviour(server: Server, row: dict[str, str]) -> None:
    status, answer = _invoke(server, row["file"])
    _check(row["expected_behaviour"], status, answer)


@needs_data
def test_every_non_dermoscopic_picture_is_flagged(server: Server) -> None:
    """The photos, scans, plots and masks: flagged out-of-distribution, or refused when unreadable."""
    flagged, refused, missed = [], [], []
    for row in ROWS:
        if row["expected_behaviour"] != "reject / out-of-distribution":
            continue
        status, answer = _invoke(server, row["file"])
        if status != 200:
            refused.append(row["file"])
        elif answer["predictions"][0]["ood"]["flag"]:
            flagged.append(row["file"])
        else:
            missed.append(row["file"])
    assert not missed, f"not flagged: {missed}"
    assert len(flagged) >= 23 and refused == ["sk_multipage_rgb.tif"], (flagged, refused)


@pytest.mark.skipif(not HAM_IMAGES.is_dir(), reason="../shared/data/ham10000 is not present")
def test_few_real_dermoscopy_images_are_flagged(server: Server) -> None:
    """Held-out HAM10000 images (not the ones the reference was built from): at most 3 % flagged."""
    seen = {p.name for p in SAMPLE_IMAGES.glob("*.jpg")}
    names = sorted(p.name for p in HAM_IMAGES.glob("*.jpg") if p.name not in seen)
    pick = np.random.default_rng(3).choice(len(names), 150, replace=False)
    flags = []
    for i in pick:
        status, answer = server.invoke((HAM_IMAGES / names[i]).read_bytes())
        assert status == 200, answer
        flags.append(answer["predictions"][0]["ood"]["flag"])
    assert sum(flags) <= 0.03 * len(flags), f"{sum(flags)} of {len(flags)} HAM10000 images flagged"
