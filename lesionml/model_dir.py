"""The model directory's seal: a manifest of every file's SHA-256 and a known-answer check.

The training job writes both (:mod:`training_image.evaluate`), serving checks both before it answers ``/ping``
(:mod:`inference_image.artifacts`, :mod:`inference_image.known_answers`). One module, so writer and reader cannot
drift apart. No torch here: the inference image imports it.

``manifest.json``, the last file the training job writes::

    {"format": 1, "algorithm": "sha256", "files": {"classes.json": "<hex>", "evaluation/roc.png": "<hex>", ...}}

It lists every regular file below the directory (POSIX paths relative to it) except itself. A directory matches
when it holds exactly those files with exactly those digests: a missing file, an extra file, a changed byte or a
symbolic link is refused, naming the file. The SHA-256 of ``manifest.json``'s bytes identifies the whole
directory (:func:`manifest_digest`; the model package records it, and serving compares it with
``MODEL_MANIFEST_SHA256`` when that is set).

``known_answers.json``: a few synthetic images (PNG, deterministic, no patient data) and the probabilities the
exported ``model.ts`` gives for them through :mod:`lesionml.preprocessing`, on the CPU in float32::

    {"format": 1, "classes": [...], "atol": 0.001,
     "answers": [{"png_base64": "...", "probabilities": {"akiec": 0.01, ...}}, ...]}

Serving runs the same images through its own decoder, transform and runtime (ONNX Runtime or TorchScript) and must
reproduce every probability within :data:`KNOWN_ANSWER_ATOL`: a manifest regenerated over a different ``model.ts``,
a reordered class list or a changed transform still fails there. The tolerance is serving's constant, not the
file's (``atol`` in the file is informative only), so an edited file cannot loosen it.

A directory written before manifests is refused by serving. To serve one anyway, someone who has checked it seals
it, a deliberate step with its own record (the printed digest is what the model package must then carry)::

    python -m lesionml.model_dir seal DIR     # known answers from DIR/model.ts, then the manifest; prints the digest
    python -m lesionml.model_dir verify DIR   # the manifest check alone; prints the digest
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lesionml.preprocessing import PreprocessingSpec, preprocess_batch

MANIFEST_NAME = "manifest.json"
KNOWN_ANSWERS_NAME = "known_answers.json"
MANIFEST_FORMAT = 1
KNOWN_ANSWERS_FORMAT = 1
# Serving against the training job's float32 CPU run of model.ts: the ONNX export agrees with model.ts to 1e-4
# (inference_image.runtime) and the two transforms to float32 rounding, so 1e-3 in probability only fails for a
# different model or a different transform; a flipped weight or another trained model moves them by far more.
KNOWN_ANSWER_ATOL = 1e-3
KNOWN_ANSWER_COUNT = 4
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ModelDirIntegrityError(ValueError):
    """The directory does not match its manifest or known answers; the one-line message names the file."""


@dataclass(frozen=True)
class Manifest:
    """A verified manifest.

    Attributes
    ----------
    digest : str
        SHA-256 of ``manifest.json``'s bytes.
    files : dict of str to str
        Relative path to SHA-256 of every other file.
    """

    digest: str
    files: dict[str, str]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_files(model_dir: str | Path) -> list[str]:
    """Every regular file below ``model_dir`` except the manifest, as sorted POSIX paths relative to it.

    Raises
    ------
    ModelDirIntegrityError
        A symbolic link or anything else that is neither a file nor a directory (its target could change after
        the check).
    """
    root = Path(model_dir)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise ModelDirIntegrityError(f"{rel} in {root} is a symbolic link; a model directory holds files only")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise ModelDirIntegrityError(f"{rel} in {root} is not a regular file")
            if rel != MANIFEST_NAME:
                found.append(rel)
    return sorted(found)


def write_manifest(model_dir: str | Path) -> str:
    """Write ``manifest.json`` over every other file of ``model_dir``; returns its SHA-256 (:func:`manifest_digest`).

    Call it last: a file written afterwards makes the directory unservable. Written to a temporary name and renamed,
    so a crash never leaves a partial manifest.
    """
    root = Path(model_dir)
    (root / MANIFEST_NAME).unlink(missing_ok=True)
    doc = {"format": MANIFEST_FORMAT, "algorithm": "sha256",
           "files": {rel: file_sha256(root / rel) for rel in model_files(root)}}
    data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    tmp = root / f".{MANIFEST_NAME}.tmp"  # listed above already; left behind by a crash, it makes an extra file
    tmp.write_bytes(data)
    os.replace(tmp, root / MANIFEST_NAME)
    return hashlib.sha256(data).hexdigest()


def manifest_digest(model_dir: str | Path) -> str:
    """SHA-256 of ``model_dir``'s ``manifest.json`` bytes: what the model package records."""
    return file_sha256(Path(model_dir) / MANIFEST_NAME)


def _parse_manifest(data: bytes, root: Path) -> dict[str, str]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirIntegrityError(f"{MANIFEST_NAME} in {root} is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or doc.get("algorithm") != "sha256":
        raise ModelDirIntegrityError(
            f"{MANIFEST_NAME} in {root} is not a format {MANIFEST_FORMAT} sha256 manifest")
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        raise ModelDirIntegrityError(f"{MANIFEST_NAME} in {root} lists no files")
    for rel, digest in files.items():
        parts = rel.split("/") if isinstance(rel, str) else []
        if not parts or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or rel == MANIFEST_NAME:
            raise ModelDirIntegrityError(f"{MANIFEST_NAME} in {root} lists an invalid path {rel!r}")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ModelDirIntegrityError(f"{MANIFEST_NAME} in {root} gives {rel} no valid sha256")
    return files


def verify_manifest(model_dir: str | Path, expected_digest: str | None = None) -> Manifest:
    """Check that ``model_dir`` holds exactly the files its manifest lists, with the listed digests.

    Parameters
    ----------
    model_dir : str or Path
        The directory.
    expected_digest : str, optional
        The SHA-256 the manifest itself must have (the model package's record).

    Raises
    ------
    ModelDirIntegrityError
        No manifest, a malformed one, a digest other than ``expected_digest``, or a file missing, extra, changed
        or not a regular file. The message names the first such file (and how many more there are).
    """
    root = Path(model_dir)
    path = root / MANIFEST_NAME
    if not path.is_file() or path.is_symlink():
        raise ModelDirIntegrityError(
            f"{root} has no {MANIFEST_NAME}: a model directory written before manifests, or not by the training "
            "job; serving refuses a directory it cannot verify (retrain it, or check it and run "
            "python -m lesionml.model_dir seal DIR)")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if expected_digest and digest != expected_digest.strip().lower():
        raise ModelDirIntegrityError(
            f"{MANIFEST_NAME} in {root} has sha256 {digest[:16]}..., the model package recorded "
            f"{expected_digest.strip()[:16]}...")
    files = _parse_manifest(data, root)
    present = model_files(root)
    missing = sorted(set(files) - set(present))
    extra = sorted(set(present) - set(files))
    problems = [f"{rel} is missing (listed in {MANIFEST_NAME})" for rel in missing]
    problems += [f"{rel} is not listed in {MANIFEST_NAME} (an extra file)" for rel in extra]
    if not problems:
        for rel in sorted(files):
            found = file_sha256(root / rel)
            if found != files[rel]:
                problems.append(f"{rel} does not match {MANIFEST_NAME} (sha256 {found[:16]}..., recorded "
                                f"{files[rel][:16]}...)")
                break  # one named file is the message; hashing the rest would only delay the refusal
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ModelDirIntegrityError(f"{problems[0]} in {root}{more}")
    return Manifest(digest, dict(files))


# ----------------------------------------------------------------------------------------------- known answers
def known_answer_images(width: int, height: int, count: int = KNOWN_ANSWER_COUNT, seed: int = 19) -> list[bytes]:
    """Deterministic synthetic lesion-like pictures as PNG bytes: a dark blotch on a skin-toned, textured ground.

    Sizes vary around the model input ``width x height`` (exactly it, larger, square, smaller), so the checks take
    the transform's crop and resize paths as real uploads do. Synthetic on purpose: the model package carries no
    patient image.
    """
    from PIL import Image

    sizes = [(width, height), (width * 3 // 2, height * 3 // 2), (height, height), (width // 2 + 7, height // 2 + 5)]
    images = []
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        skin = np.array([205, 150, 130], np.float32) + rng.uniform(-30, 30, 3).astype(np.float32)
        img = skin + (xx / w - 0.5)[..., None] * rng.uniform(-40, 40, 3).astype(np.float32)
        cx, cy = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
        ax, ay = rng.uniform(0.15, 0.35) * w, rng.uniform(0.15, 0.35) * h
        angle = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
        v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
        inside = np.clip(1.5 - np.sqrt((u / ax) ** 2 + (v / ay) ** 2), 0, 1)[..., None]
        lesion = np.array([110, 70, 55], np.float32) + rng.uniform(-40, 40, 3).astype(np.float32)
        img = img * (1 - inside) + lesion * inside
        coarse = rng.normal(0, 12, (h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
        img += np.kron(coarse, np.ones((8, 8, 1), np.float32))[:h, :w]
        img += rng.normal(0, 2, img.shape).astype(np.float32)
        buf = io.BytesIO()
        Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8)).save(buf, format="PNG", optimize=True)
        images.append(buf.getvalue())
    return images


def write_known_answers(
    model_dir: str | Path, images: Sequence[bytes], probabilities: np.ndarray, classes: Sequence[str]
) -> None:
    """Write ``known_answers.json``: ``images`` and the model's ``(N, C)`` probabilities, columns in ``classes``
    order."""
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.shape != (len(images), len(classes)) or not np.isfinite(probs).all():
        raise ValueError(f"probabilities of shape {probs.shape} for {len(images)} images and {len(classes)} classes")
    doc = {
        "format": KNOWN_ANSWERS_FORMAT, "classes": list(classes), "atol": KNOWN_ANSWER_ATOL,
        "answers": [
            {"png_base64": base64.b64encode(img).decode(),
             "probabilities": {c: float(v) for c, v in zip(classes, row, strict=True)}}
            for img, row in zip(images, probs.tolist(), strict=True)
        ],
    }
    (Path(model_dir) / KNOWN_ANSWERS_NAME).write_text(json.dumps(doc, indent=1) + "\n")


def record_known_answers(
    model_dir: str | Path, spec: PreprocessingSpec, classes: Sequence[str],
    predict: Callable[[np.ndarray], np.ndarray],
) -> None:
    """Make the known-answer images for ``spec``, preprocess them with :mod:`lesionml.preprocessing` and write
    ``predict``'s probabilities for them (``predict``: float32 NCHW batch to ``(N, C)``; the exported model)."""
    images = known_answer_images(spec.width, spec.height)
    write_known_answers(model_dir, images, np.asarray(predict(preprocess_batch(list(images), spec))), classes)


def read_known_answers(model_dir: str | Path, classes: Sequence[str]) -> list[tuple[bytes, np.ndarray]]:
    """``(png bytes, probabilities in classes order)`` of each known answer.

    Raises
    ------
    ModelDirIntegrityError
        Missing or malformed file, or class names other than ``classes``.
    """
    root = Path(model_dir)
    try:
        doc = json.loads((root / KNOWN_ANSWERS_NAME).read_text())
    except FileNotFoundError:
        raise ModelDirIntegrityError(f"{KNOWN_ANSWERS_NAME} is missing in {root}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelDirIntegrityError(f"{KNOWN_ANSWERS_NAME} in {root} is unreadable: {e}") from None
    out = []
    try:
        if doc["format"] != KNOWN_ANSWERS_FORMAT or not doc["answers"]:
            raise ValueError(f"format {doc['format']!r} with {len(doc['answers'])} answers")
        for i, answer in enumerate(doc["answers"]):
            probs = answer["probabilities"]
            if set(probs) != set(classes):
                raise ValueError(f"answer {i} gives classes {sorted(probs)}, classes.json {sorted(classes)}")
            row = np.array([float(probs[c]) for c in classes])
            if not np.isfinite(row).all():
                raise ValueError(f"answer {i} has a non-finite probability")
            out.append((base64.b64decode(answer["png_base64"], validate=True), row))
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        raise ModelDirIntegrityError(f"{KNOWN_ANSWERS_NAME} in {root} is invalid: {type(e).__name__}: {e}") from None
    return out


def compare_known_answers(expected: np.ndarray, got: np.ndarray, classes: Sequence[str], index: int,
                          atol: float = KNOWN_ANSWER_ATOL) -> str | None:
    """None when ``got`` reproduces ``expected`` within ``atol``; else one line naming the worst class."""
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    if got.shape != expected.shape or not np.isfinite(got).all():
        return f"known answer {index}: the model gives {got.shape[0]} probabilities, expected {expected.shape[0]}"
    diff = np.abs(got - expected)
    worst = int(diff.argmax())
    if diff[worst] <= atol:
        return None
    return (f"known answer {index}: P({classes[worst]}) = {got[worst]:.4f}, the training job recorded "
            f"{expected[worst]:.4f} (tolerance {atol:g})")


def seal(model_dir: str | Path) -> str:
    """Record known answers from ``model_dir``'s own ``model.ts`` (CPU, float32) and write the manifest, as the
    training job does; returns the manifest's digest. Needs torch."""
    import torch

    from lesionml.labels import parse_classes_document
    from lesionml.models import load_torchscript
    from lesionml.preprocessing import read_spec

    root = Path(model_dir)
    _, classes = parse_classes_document(json.loads((root / "classes.json").read_text()))
    module = load_torchscript(root / "model.ts", "cpu")

    def probabilities(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(module.predict(torch.from_numpy(x))[0].float().numpy())

    record_known_answers(root, read_spec(root / "preprocessing.json"), classes, probabilities)
    return write_manifest(root)


def main(argv: Sequence[str] | None = None) -> int:
    """``seal DIR`` or ``verify DIR``; prints the manifest digest."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("seal", "verify"):
        print("usage: python -m lesionml.model_dir seal|verify DIR", file=sys.stderr)
        return 2
    try:
        digest = seal(args[1]) if args[0] == "seal" else verify_manifest(args[1]).digest
    except (ModelDirIntegrityError, OSError, ValueError) as e:
        print(f"{args[0]}: {e}", file=sys.stderr)
        return 1
    print(digest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
