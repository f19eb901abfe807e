"""A damaged or altered model directory is never served (issue 19, item 1), attacked as a class.

Each attack is tried twice where it matters: as found (the manifest names the file), and with the manifest
regenerated over the altered directory, as someone who knows the format would do (then the label-set order, the
content checks or the known-answer check, which reruns the training job's reference images through the serving
path, must still refuse). The export cache is attacked too: it lives outside the model directory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from inference_image.artifacts import ModelDirError, load_artifacts
from inference_image.known_answers import check_known_answers
from inference_image.runtime import OnnxBackend, TorchScriptBackend, _cache_paths, prepare
from lesionml.model_dir import (
    KNOWN_ANSWER_ATOL,
    MANIFEST_NAME,
    ModelDirIntegrityError,
    known_answer_images,
    manifest_digest,
    verify_manifest,
    write_manifest,
)

from .helpers import another_model, flip_weight_bytes, reorder_classes
from .model_factory import reseal


@pytest.fixture()
def copy(model_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(model_dir, dest)
    return dest


def _preprocessing(**change: object) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        doc = json.loads((d / "preprocessing.json").read_text())
        doc.update(change)
        (d / "preprocessing.json").write_text(json.dumps(doc))

    return edit


# (id, alteration, what the refusal names as found, what it names with the manifest regenerated)
ATTACKS: list[tuple[str, Callable[[Path], None], str, str]] = [
    ("weights flipped", lambda d: flip_weight_bytes(d / "model.ts"), "model.ts does not match", "known-answer"),
    ("classes reordered in every file", reorder_classes, "classes.json does not match", "label_set"),
    ("another valid model.ts", another_model, "model.ts does not match", "known-answer"),
    ("input size changed", _preprocessing(height=160, width=160), "preprocessing.json does not match",
     "known-answer"),
    ("normalisation changed", _preprocessing(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
     "preprocessing.json does not match", "known-answer"),
    ("melanoma threshold changed", lambda d: (d / "metrics.json").write_text(
        (d / "metrics.json").read_text().replace('"melanoma_threshold": 0.3', '"melanoma_threshold": 0.9')),
     "metrics.json does not match", ""),
]


@pytest.mark.parametrize(("alter", "as_found", "resealed"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_altered_directory_is_refused_as_found_and_after_regenerating_the_manifest(
    copy: Path, tmp_path: Path, alter: Callable[[Path], None], as_found: str, resealed: str
) -> None:
    alter(copy)
    with pytest.raises(ModelDirError, match=f"^{as_found}"):
        load_artifacts(copy)
    reseal(copy)
    if not resealed:  # a consistent edit of a setting: only the model package's digest can tell (next test)
        assert load_artifacts(copy).manifest_sha256 == manifest_digest(copy)
        return
    with pytest.raises(ModelDirError, match=resealed):
        prepare(load_artifacts(copy), "onnx", tmp_path / "cache")
    if resealed == "known-answer":  # the same with the other runtime
        with pytest.raises(ModelDirError, match=resealed):
            prepare(load_artifacts(copy), "torchscript", tmp_path / "cache")


def test_the_model_packages_digest_catches_a_consistent_edit(copy: Path, model_dir: Path) -> None:
    genuine = manifest_digest(model_dir)
    assert load_artifacts(copy, manifest_sha256=genuine).manifest_sha256 == genuine
    metrics = json.loads((copy / "metrics.json").read_text())
    (copy / "metrics.json").write_text(json.dumps({**metrics, "melanoma_threshold": 0.9}))
    reseal(copy)
    with pytest.raises(ModelDirError, match="the model package recorded"):
        load_artifacts(copy, manifest_sha256=genuine)


def test_missing_extra_and_linked_files_are_named(copy: Path, tmp_path: Path) -> None:
    (copy / "known_answers.json").rename(tmp_path / "known_answers.json")
    with pytest.raises(ModelDirError, match="^known_answers.json is missing"):
        load_artifacts(copy)
    (tmp_path / "known_answers.json").rename(copy / "known_answers.json")

    (copy / ".manifest.json.tmp").write_text("{}")  # what a crash while sealing leaves
    with pytest.raises(ModelDirError, match=r"^\.manifest\.json\.tmp is not listed"):
        load_artifacts(copy)
    (copy / ".manifest.json.tmp").unlink()

    (copy / "classes.json").rename(tmp_path / "classes.json")
    (copy / "classes.json").symlink_to(tmp_path / "classes.json")
    with pytest.raises(ModelDirError, match="classes.json .* is a symbolic link"):
        load_artifacts(copy)
    (copy / "classes.json").unlink()
    (tmp_path / "classes.json").rename(copy / "classes.json")
    load_artifacts(copy)  # back to the genuine directory


def test_several_problems_name_the_first_and_count_the_rest(copy: Path) -> None:
    (copy / "metrics.json").unlink()
    (copy / "reference_stats.json").unlink()
    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(ModelDirError, match=r"^metrics.json is missing .* \(and 2 more\)$"):
        load_artifacts(copy)


@pytest.mark.parametrize("edit", [
    lambda doc: doc["files"].update({"metrics.json": "0" * 64}),  # lies about a digest
    lambda doc: doc["files"].update({"../outside.json": "0" * 64}),  # reaches out of the directory
    lambda doc: doc["files"].pop("model.ts"),  # forgets a file
    lambda doc: doc.update({"format": 2}),
    lambda doc: doc.update({"files": {}}),
], ids=["wrong digest", "path outside", "file left out", "unknown format", "no files"])
def test_a_manifest_that_lies_is_refused(copy: Path, edit: Callable[[dict], None]) -> None:
    doc = json.loads((copy / MANIFEST_NAME).read_text())
    edit(doc)
    (copy / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(ModelDirError, match="manifest.json"):
        load_artifacts(copy)


def test_directory_written_before_manifests_is_refused(copy: Path) -> None:
    (copy / MANIFEST_NAME).unlink()
    (copy / "known_answers.json").unlink()
    with pytest.raises(ModelDirError, match="has no manifest.json: a model directory written before manifests"):
        load_artifacts(copy)


def test_known_answers_that_lie_are_caught_by_serving_not_trusted(copy: Path, tmp_path: Path) -> None:
    """Edited answers (and a regenerated manifest): the tolerance is serving's, not the file's."""
    doc = json.loads((copy / "known_answers.json").read_text())
    doc["atol"] = 1.0
    doc["answers"][2]["probabilities"]["mel"] += 5 * KNOWN_ANSWER_ATOL
    (copy / "known_answers.json").write_text(json.dumps(doc))
    reseal(copy)
    with pytest.raises(ModelDirError, match=r"known answer 2: P\(mel\)"):
        prepare(load_artifacts(copy), "onnx", tmp_path / "cache")


def test_changed_preprocessing_never_poisons_the_export_cache(model_dir: Path, copy: Path, tmp_path: Path) -> None:
    """The reported sequence: genuine directory exported, then a changed preprocessing.json against the warm cache,
    then the genuine directory again. Refused cleanly, and the genuine directory still starts from its cache."""
    cache = tmp_path / "cache"
    genuine = load_artifacts(model_dir)
    assert prepare(genuine, "onnx", cache).note == "fresh ONNX export"
    _preprocessing(height=120, width=160)(copy)
    with pytest.raises(ModelDirError, match="^preprocessing.json does not match manifest.json"):
        load_artifacts(copy)
    reseal(copy)
    altered = load_artifacts(copy)
    assert _cache_paths(altered, cache) != _cache_paths(genuine, cache)  # every model file is in the key
    with pytest.raises(ModelDirError, match="known-answer check failed"):
        prepare(altered, "onnx", cache)
    plan = prepare(load_artifacts(model_dir), "onnx", cache)
    assert plan.note == "cached ONNX export"
    assert plan.onnx_path is not None and plan.head_path is not None
    check_known_answers(genuine, OnnxBackend(plan.onnx_path, plan.head_path))


@pytest.mark.parametrize("poison", ["garbage bytes", "another model's export"])
def test_a_poisoned_cache_entry_is_exported_again_not_served(model_dir: Path, copy: Path, tmp_path: Path,
                                                             poison: str) -> None:
    cache = tmp_path / "cache"
    genuine = load_artifacts(model_dir)
    onnx_path, head_path = _cache_paths(genuine, cache)
    if poison == "garbage bytes":
        onnx_path.write_bytes(b"\x08\x07garbage")
        head_path.write_bytes(b"garbage")
    else:
        another_model(copy)
        reseal(copy, answers=True)  # a genuine other model: its own export passes its own check
        other = prepare(load_artifacts(copy), "onnx", cache)
        assert other.onnx_path is not None and other.head_path is not None
        shutil.copyfile(other.onnx_path, onnx_path)
        shutil.copyfile(other.head_path, head_path)
    plan = prepare(genuine, "onnx", cache)
    assert plan.note == "fresh ONNX export"
    assert plan.onnx_path is not None and plan.head_path is not None
    check_known_answers(genuine, OnnxBackend(plan.onnx_path, plan.head_path))


def test_both_runtimes_reproduce_the_known_answers(model_dir: Path, tmp_path: Path) -> None:
    art = load_artifacts(model_dir)
    assert len(art.known_answers) == 4
    plan = prepare(art, "onnx", tmp_path / "cache")
    assert plan.onnx_path is not None and plan.head_path is not None
    check_known_answers(art, OnnxBackend(plan.onnx_path, plan.head_path))
    check_known_answers(art, TorchScriptBackend(str(model_dir / "model.ts")))


def test_manifest_round_trip_and_digest(tmp_path: Path) -> None:
    d = tmp_path / "m"
    (d / "evaluation").mkdir(parents=True)
    (d / "a.json").write_text("{}")
    (d / "evaluation" / "roc.png").write_bytes(b"\x89PNG")
    digest = write_manifest(d)
    manifest = verify_manifest(d, digest)
    assert manifest.digest == digest == manifest_digest(d)
    assert sorted(manifest.files) == ["a.json", "evaluation/roc.png"]
    assert not list(d.glob(".*"))  # no temporary file left
    with pytest.raises(ModelDirIntegrityError, match="the model package recorded"):
        verify_manifest(d, "f" * 64)


def test_known_answer_images_are_deterministic_and_take_every_transform_path() -> None:
    from io import BytesIO

    from PIL import Image

    a, b = known_answer_images(200, 150), known_answer_images(200, 150)
    assert a == b and len(a) == 4
    sizes = [Image.open(BytesIO(x)).size for x in a]
    assert sizes == [(200, 150), (300, 225), (150, 150), (107, 80)]
    pixels = np.asarray(Image.open(BytesIO(a[0])))
    assert pixels.std() > 10  # not a flat picture: every weight of the network takes part


def test_a_checked_old_directory_can_be_sealed_deliberately(model_dir: Path, copy: Path) -> None:
    """The way to serve a directory written before manifests: ``python -m lesionml.model_dir seal DIR``. Sealing is
    deterministic: the genuine directory's own known answers and digest come back."""
    import subprocess
    import sys

    (copy / MANIFEST_NAME).unlink()
    (copy / "known_answers.json").unlink()
    run = [sys.executable, "-m", "lesionml.model_dir"]
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(repo), str(repo / "layers" / "common")))}  # the image's
    refused = subprocess.run([*run, "verify", str(copy)], cwd=repo, capture_output=True, text=True, timeout=60,
                             env=env)
    assert refused.returncode == 1 and "has no manifest.json" in refused.stderr
    sealed = subprocess.run([*run, "seal", str(copy)], cwd=repo, capture_output=True, text=True, timeout=120,
                            env=env)
    assert sealed.returncode == 0, sealed.stderr[-2000:]
    assert sealed.stdout.strip() == manifest_digest(model_dir) == manifest_digest(copy)
    assert load_artifacts(copy).manifest_sha256 == manifest_digest(model_dir)
