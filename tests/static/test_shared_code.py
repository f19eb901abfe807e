"""Code the Lambdas and the images each need, kept equal where it cannot be shared physically."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load(path: Path, name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def test_label_sets_are_the_same_for_lambdas_and_models() -> None:
    """The layer cannot import lesionml (it would drag torch into Lambda), so it mirrors the label sets."""
    layer = _load(REPO / "layers" / "common" / "lesion_common" / "labels.py", "_layer_labels")
    models = _load(REPO / "lesionml" / "labels.py", "_model_labels")
    assert {k: list(v) for k, v in layer.LABEL_SETS.items()} == {k: list(v) for k, v in models.LABEL_SETS.items()}
    assert layer.MELANOMA == models.MELANOMA == "mel"


def test_lesionml_labels_do_not_import_torch() -> None:
    text = (REPO / "lesionml" / "labels.py").read_text()
    assert "import torch" not in text
