"""The leave-one-source-out comparison's intervals: paired, so a model compared with itself differs by nothing."""

from __future__ import annotations

import numpy as np

from benchmarks.training.unseen_archive import difference_intervals, main


def _probs(labels: np.ndarray, separation: float, rng: np.random.Generator) -> np.ndarray:
    """Class probabilities whose true class scores ``separation`` higher, in logits, plus noise."""
    logits = rng.normal(size=(labels.size, 3))
    logits[np.arange(labels.size), labels] += separation
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def test_a_model_against_itself_differs_by_exactly_nothing() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    p = _probs(labels, 1.0, rng)
    assert difference_intervals(labels, 1, p, p, n=200) == {"melanoma_auc": [0.0, 0.0], "macro_auc": [0.0, 0.0]}


def test_a_clearly_better_model_gets_an_interval_above_zero_and_a_worse_one_below() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    weak, strong = _probs(labels, 0.5, rng), _probs(labels, 3.0, rng)
    better = difference_intervals(labels, 1, weak, strong, n=300)
    worse = difference_intervals(labels, 1, strong, weak, n=300)
    assert better["melanoma_auc"][0] > 0.1 and better["macro_auc"][0] > 0.1
    assert worse["melanoma_auc"][1] < -0.1 and worse["macro_auc"][1] < -0.1


def test_a_model_directory_without_a_model_is_one_clear_line(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--model", f"a={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: each --model is NAME=DIR") and "\n" not in err


def test_the_diagnostic_views_change_the_geometry_they_name() -> None:
    from PIL import Image

    from benchmarks.training.unseen_archive import VIEWS

    im = Image.new("RGB", (512, 512), (200, 120, 90))
    assert VIEWS["as_stored"] is None
    assert VIEWS["unsquash_4x3"](im).size == (512, 384)
    assert VIEWS["centre_75"](im).size == (384, 384)
    padded = VIEWS["mirror_padded_133"](im)
    assert padded.size == (682, 682) and padded.getpixel((0, 0)) == (200, 120, 90)
