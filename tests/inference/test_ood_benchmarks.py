"""The out-of-distribution benchmarks' own arithmetic: bench_ood's count on the second archive, and the embedding
distances ood_embedding compares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.inference.bench_ood import archive_flags
from benchmarks.inference.ood_embedding import diagonal_distance, separation, unit
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


def test_the_unit_length_distance_ignores_how_strongly_a_picture_fires() -> None:
    rng = np.random.default_rng(0)
    lesions = np.abs(rng.normal(size=(200, 16))) + np.linspace(0, 2, 16)
    mean, std = unit(lesions).mean(0), unit(lesions).std(0)
    e = lesions[:5]
    # A lesion that fires three times as strongly is as far as itself; on raw embeddings it is far away.
    np.testing.assert_allclose(diagonal_distance(unit(3 * e), mean, std), diagonal_distance(unit(e), mean, std))
    raw_mean, raw_std = lesions.mean(0), lesions.std(0)
    assert (diagonal_distance(3 * e, raw_mean, raw_std) > 2 * diagonal_distance(e, raw_mean, raw_std)).all()
    # Another direction is far on the unit sphere.
    other = np.zeros((1, 16))
    other[0, 0] = 1.0
    assert diagonal_distance(other, mean, std)[0] > np.percentile(diagonal_distance(unit(lesions), mean, std), 99)


def test_separation_counts_what_lies_past_the_lesions_99th_percentile() -> None:
    ham = np.arange(100.0)
    assert separation(np.array([200.0, 300.0]), ham) == {"auroc": 1.0, "caught_past_ham_p99": 2, "negatives": 2}
    assert separation(np.array([-1.0, 50.0]), ham) == {"auroc": 0.2525, "caught_past_ham_p99": 0, "negatives": 2}
