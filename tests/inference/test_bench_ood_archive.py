"""bench_ood's count on the second archive: each picture counted once, flags and misses split as reported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.inference.bench_ood import archive_flags
from benchmarks.training.quality import job_splits


def test_flags_are_counted_on_the_archive_test_split_and_on_its_missed_melanomas(shared_data: Path) -> None:
    archive = shared_data / "isic_archive"
    splits, folders = job_splits(shared_data / "ham10000", archive)
    labels = {(folders[archive.name] / r["path"].partition("/")[2]).read_bytes(): r["label"]
              for r in splits["test"] if r["source"] == archive.name}
    calls = []

    def run(data: bytes) -> tuple[int, dict[str, Any]]:
        calls.append(data)
        mel = labels[data] == "mel"
        # Every melanoma flagged; every other melanoma missed; one in three other pictures flagged.
        missed = mel and sum(labels[c] == "mel" for c in calls) % 2 == 0
        return 200, {"melanoma": {"at_risk": mel and not missed}, "ood": {"flag": mel or len(calls) % 3 == 0}}

    out = archive_flags(run, archive)
    n_mel = sum(v == "mel" for v in labels.values())
    assert len(calls) == out["pictures"] == len(labels) == 323
    assert out["melanomas"] == out["melanomas_flagged"] == n_mel == 52
    assert out["melanomas_missed"] == out["melanomas_missed_flagged"] == n_mel // 2
    others_flagged = sum(1 for i, c in enumerate(calls, 1) if labels[c] != "mel" and i % 3 == 0)
    assert out["pictures_flagged"] == n_mel + others_flagged
