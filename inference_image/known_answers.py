"""The known-answer check: the server reproduces the training job's probabilities before it serves.

``known_answers.json`` (written by the training job, :mod:`lesionml.model_dir`) holds a few synthetic PNG images
and the probabilities ``model.ts`` gave for them. Each one goes through exactly what a request goes through here:
the decoder (:mod:`inference_image.imaging`), the transform (:mod:`inference_image.transform`) and the runtime
that will serve (ONNX Runtime or TorchScript, CPU or GPU). Every probability must agree within
:data:`lesionml.model_dir.KNOWN_ANSWER_ATOL` (1e-3). The manifest proves the files are the ones written; this
proves that what serves them computes what was trained, which the manifest cannot (a manifest regenerated over a
different ``model.ts``, classes reordered in every file, a poisoned export cache, a runtime that miscomputes).

The entry point runs it before gunicorn starts, and every worker again on its own backend before it accepts a
connection, so ``/ping`` never answers 200 from a worker that failed it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from inference_image.artifacts import ModelArtifacts, ModelDirError
from inference_image.imaging import ImageRequestError, decode_image
from inference_image.transform import ModelInputBuilder
from lesionml.model_dir import KNOWN_ANSWER_ATOL, KNOWN_ANSWERS_NAME, compare_known_answers

if TYPE_CHECKING:  # runtime imports this module
    from inference_image.runtime import Backend


def check_known_answers(artifacts: ModelArtifacts, backend: Backend, max_pixels: int = 40_000_000) -> None:
    """Run every known answer through the serving path on ``backend``.

    Raises
    ------
    ModelDirError
        An image the decoder refuses, a runtime error, or a probability off by more than the tolerance.
    """
    spec = artifacts.spec
    inputs = ModelInputBuilder(spec)
    if not artifacts.known_answers:
        raise ModelDirError(f"{KNOWN_ANSWERS_NAME} in {artifacts.model_dir} holds no answers")
    for i, (png, expected) in enumerate(artifacts.known_answers):
        try:
            decoded = decode_image(png, max_pixels, (spec.width, spec.height))
        except ImageRequestError as e:
            raise ModelDirError(f"{KNOWN_ANSWERS_NAME}: image {i} cannot be decoded: {e.message}") from None
        x, _ = inputs.model_input(decoded)
        try:
            probs, _ = backend.run(x[None])
        except Exception as e:  # a poisoned export or a broken runtime: onnxruntime and torch raise many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ModelDirError(f"known-answer check: the {backend.name} runtime failed on image {i}: "
                                f"{type(e).__name__}: {first[:300]}") from None
        problem = compare_known_answers(expected, probs[0], artifacts.classes, i, KNOWN_ANSWER_ATOL)
        if problem:
            raise ModelDirError(
                f"known-answer check failed ({backend.name}): {problem}; model.ts, preprocessing.json or "
                f"classes.json does not compute what the training job recorded in {KNOWN_ANSWERS_NAME}")
