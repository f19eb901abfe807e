"""The NumPy tests against SciPy's, and the drift score's calibration on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lesion_monitoring.drift import DriftBatch, compute_drift, drift_metrics
from lesion_monitoring.records import from_container_record
from lesion_monitoring.stats import (
    bonferroni_log10,
    chi2_homogeneity,
    drift_score,
    ks_2samp,
    log10_chi2_sf,
    round_significant,
)
from tests.monitoring import synthetic as sy
from tests.monitoring.realdata import capture_records

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize(("n", "m", "shift"), [(200, 500, 0.0), (200, 500, 0.3), (40, 300, 0.8), (5000, 500, 0.1)])
def test_ks_matches_scipy(n: int, m: int, shift: float) -> None:
    rng = np.random.default_rng(n + m)
    x, y = rng.normal(shift, 1, n), rng.normal(0, 1, m)
    d, log_p = ks_2samp(x, y, digits=None)
    ref = stats.ks_2samp(x, y, method="asymp")
    assert d == pytest.approx(ref.statistic, abs=1e-12)
    # Stephens' correction versus SciPy's own asymptotics: the same decision, p within a factor ~1.5.
    assert log_p == pytest.approx(math.log10(ref.pvalue), abs=0.2 + 0.05 * abs(math.log10(ref.pvalue)))


def test_ks_far_tail_stays_finite_and_ties_are_exact() -> None:
    d, log_p = ks_2samp(np.zeros(1000) + 5.0, np.zeros(500))
    assert d == 1.0 and -300 <= log_p < -100
    assert ks_2samp(np.full(300, 4 / 3), np.full(500, 1.33333))[0] == 0.0  # writers round differently
    assert ks_2samp(np.array([]), np.ones(3)) == (0.0, 0.0)
    assert list(round_significant(np.array([1.33333333, 0.000123456, -98766.0, np.nan]), 4)[:3]) == [
        1.333, 0.0001235, -98770.0]


@pytest.mark.parametrize(("statistic", "df"), [(0.5, 1), (3.0, 4), (12.0, 6), (80.0, 6), (700.0, 3), (25.0, 30)])
def test_chi2_sf_matches_scipy(statistic: float, df: int) -> None:
    expected = stats.chi2.logsf(statistic, df) / math.log(10)
    assert log10_chi2_sf(statistic, df) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_chi2_homogeneity_pools_sparse_classes() -> None:
    a = np.array([300, 150, 40, 3, 2, 0, 5])
    b = np.array([100, 60, 10, 0, 1, 0, 29])
    stat, df, log_p = chi2_homogeneity(a, b)
    # The empty class is dropped; the two sparse ones (3 and 3 in all, expected < 5 in the window) are pooled,
    # and the pool, still sparse, joins the next smallest class.
    table = np.array([[300, 150, 40, 10], [100, 60, 10, 30]], dtype=float)
    ref = stats.chi2_contingency(table, correction=False)
    assert df == 3 and stat == pytest.approx(ref.statistic) and log_p == pytest.approx(math.log10(ref.pvalue))
    assert chi2_homogeneity([10, 0], [0, 0]) == (0.0, 0, 0.0)


def test_score_scale() -> None:
    assert drift_score(math.log10(0.001), 0.001) == pytest.approx(1.0)
    assert drift_score(-6.0, 0.001) == pytest.approx(2.0)
    assert drift_score(0.0, 0.001) == 0.0
    assert bonferroni_log10([-3.0, -1.0]) == pytest.approx(math.log10(2e-3))
    assert bonferroni_log10([-0.1] * 20) == 0.0


def test_synthetic_calibration_and_power() -> None:
    """Under no drift the alarm rate stays near alpha; a shifted camera is caught."""
    world = sy.World()
    reference = world.reference()
    false_alarms = 0
    for seed in range(60):
        preds = [from_container_record(r) for r in capture_records(world.sample(150, seed=seed), reference)]
        false_alarms += compute_drift(DriftBatch().extend(preds), reference, alpha=0.01)["drifted"]
    assert false_alarms <= 3  # expected 0.6 at alpha = 0.01
    preds = [from_container_record(r) for r in capture_records(world.sample(150, seed=99, shift=2.0), reference)]
    result = compute_drift(DriftBatch().extend(preds), reference, alpha=0.01)
    assert result["drifted"] and result["tests"]["embedding"]["score"] >= 1.0
    published = drift_metrics(result)
    assert published["DriftScore"] == (result["drift_score"], "None") and published["DriftSampleSize"][0] == 150


def test_families_skip_with_reasons() -> None:
    world = sy.World()
    reference = world.reference()
    records = capture_records(world.sample(120, seed=1), reference)
    for r in records[:60]:
        del r["embedding"]  # an older container: no monitoring block
    result = compute_drift(DriftBatch().extend(from_container_record(r) for r in records), reference,
                           min_records=100)
    assert "embedding" in result["skipped"] and "60 records with an embedding" in result["skipped"]["embedding"]
    assert set(result["families_run"]) == {"prediction", "confidence", "image"}
    other = dict(reference, embedding={**reference["embedding"], "projections_sample": [[0.0] * 3] * 10})
    result = compute_drift(DriftBatch().extend(from_container_record(r) for r in records[60:]), other,
                           min_records=50)
    assert "another model's basis" in result["skipped"]["embedding"]
