"""Model runtimes: ONNX Runtime on CPU (the fastest here, see benchmarks/inference/RESULTS.md), TorchScript otherwise.

``model.ts`` is what the training job ships. For ONNX Runtime the entry point exports its ``backbone`` (image to
embedding; for a test-time-augmented model, to one embedding per view, whose probabilities are then averaged) to
ONNX once, before the workers start, and keeps the linear ``head`` as two numpy arrays: the legacy exporter only
exports a module's ``forward``, and the head is a 1280 x C product that costs microseconds. The
export is checked against ``model.ts``'s own ``predict`` on a fixed input and cached under a key that covers every
input to it: the digest of ``manifest.json`` (so of every model file, ``preprocessing.json``'s input size included),
the torch, onnx, onnxruntime and numpy versions, the opset and the export options. A restart reuses it; a changed
file can never pick up another directory's export. If the model does not have the backbone/head split or the check
fails, ``auto`` falls back to TorchScript (logged) and ``onnx`` refuses to start.

Whatever the runtime, the plan is only returned once that runtime has passed the known-answer check
(:mod:`inference_image.known_answers`); a cached export that fails it (or cannot even run) is discarded and made
again from ``model.ts``, so a damaged cache costs one export, never the service.

Only :func:`prepare` imports torch (not even it when the export is cached). Workers of the ONNX runtime import
onnxruntime and numpy only, which keeps their memory small (no libtorch per process).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from inference_image.artifacts import ModelArtifacts, ModelDirError

log = logging.getLogger("inference.runtime")
ONNX_OPSET = 17
# Everything torch.onnx.export is given besides the module and the input (part of the cache key).
_EXPORT_OPTIONS: dict[str, Any] = {
    "dynamo": False, "opset_version": ONNX_OPSET, "input_names": ["x"], "output_names": ["embedding"],
    "dynamic_axes": {"x": {0: "batch"}, "embedding": {0: "batch"}},
}
_CACHE_FORMAT = 2  # bump when what the cache holds changes shape
# ONNX Runtime fuses and reorders float operations: agreement to 1e-4 in probability is what "same model" means.
PROB_TOLERANCE = 1e-4
EMBEDDING_TOLERANCE = 1e-3  # relative to the largest embedding value


class Backend(Protocol):
    """Runs the model on a preprocessed float32 NCHW batch."""

    name: str

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities ``(N, C)`` and embeddings ``(N, D)``, both float32 numpy arrays."""
        ...


@dataclass(frozen=True)
class Plan:
    """What the entry point decided; handed to the workers through the environment (``SERVING_PLAN``).

    Attributes
    ----------
    runtime : str
        ``onnx`` or ``torchscript``.
    device : str
        ``cpu`` or ``cuda`` (TorchScript only; each worker takes GPU ``index % gpus``).
    onnx_path : str or None
        The exported backbone (ONNX runtime).
    head_path : str or None
        ``.npz`` with the head's ``weight`` ``(C, D)`` and ``bias`` ``(C,)`` (ONNX runtime).
    model_sha256 : str
        Digest of ``model.ts``.
    gpus : int
        GPUs usable by TorchScript.
    note : str
        Why this runtime (for the log).
    """

    runtime: str
    device: str
    onnx_path: str | None
    head_path: str | None
    model_sha256: str
    gpus: int = 0
    note: str = ""

    def to_json(self) -> str:
        """Serialise for the environment."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


class OnnxBackend:
    """ONNX Runtime session over the exported backbone, plus the linear head in numpy.

    Parameters
    ----------
    onnx_path, head_path : str
        Files written by :func:`prepare`.
    threads : int
        Intra-op threads; 1 runs the graph in the calling thread (no thread pool, no spinning).
    """

    name = "onnx"

    def __init__(self, onnx_path: str, head_path: str, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Busy-waiting pool threads would steal CPU from the other workers on the same machine.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        head = np.load(head_path)
        self.weight_t = np.ascontiguousarray(head["weight"].T.astype(np.float32))
        self.bias = head["bias"].astype(np.float32)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        (embedding,) = self.session.run(None, {self.input_name: x})
        probs = _softmax(embedding @ self.weight_t + self.bias)
        if embedding.ndim == 3:
            # A test-time-augmented model's backbone gives one embedding per view, (N, V, D); like its predict, the
            # answer is the mean of the views' probabilities and of their embeddings.
            return probs.mean(axis=1), embedding.mean(axis=1)
        return probs, embedding


class TorchScriptBackend:
    """``model.ts``'s ``predict`` under ``torch.inference_mode``.

    Parameters
    ----------
    model_path : str
        ``model.ts``.
    threads : int
        ``torch.set_num_threads`` (CPU).
    device : str
        ``cpu`` or ``cuda:<n>``.
    """

    name = "torchscript"

    def __init__(self, model_path: str, threads: int = 1, device: str = "cpu") -> None:
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set in this process
            pass
        if device.startswith("cuda"):
            # TF32 convolutions (cuDNN's default on Ampere and later) move probabilities by about 1e-3: full float32,
            # the arithmetic the training job recorded the known answers and the metrics with.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(model_path, map_location=device).eval()
        self.torch = torch
        self.device = torch.device(device)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.torch.inference_mode():
            probs, embedding = self.module.predict(self.torch.from_numpy(x).to(self.device))
            return probs.float().cpu().numpy(), embedding.float().cpu().numpy()


def load_backend(plan: Plan, artifacts: ModelArtifacts, threads: int, worker_index: int = 0) -> Backend:
    """The backend a worker uses, as planned by :func:`prepare`."""
    if plan.runtime == "onnx":
        assert plan.onnx_path and plan.head_path
        return OnnxBackend(plan.onnx_path, plan.head_path, threads)
    device = f"cuda:{worker_index % max(plan.gpus, 1)}" if plan.device == "cuda" else "cpu"
    return TorchScriptBackend(str(artifacts.model_dir / "model.ts"), threads, device)


def _check_input(spec_height: int, spec_width: int, batch: int = 2) -> np.ndarray:
    """A fixed, image-like input for the parity check (deterministic across runs)."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((batch, 3, spec_height, spec_width)).astype(np.float32)


def _load_and_check(artifacts: ModelArtifacts) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """Load ``model.ts`` and run ``predict`` once; refuse a model whose outputs do not fit the other files.

    Returns the module, the check input and its probabilities and embeddings.
    """
    import torch

    path = artifacts.model_dir / "model.ts"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu").eval()
        x = _check_input(artifacts.spec.height, artifacts.spec.width)
        with torch.inference_mode():
            probs, emb = (t.float().numpy() for t in module.predict(torch.from_numpy(x)))
    except Exception as e:  # a corrupt or foreign file: torch raises many types
        raise ModelDirError(f"{path} cannot be loaded or run: {type(e).__name__}: {e}") from None
    _check_outputs(artifacts, probs, emb)
    return module, x, probs, emb


def _check_outputs(artifacts: ModelArtifacts, probs: np.ndarray, emb: np.ndarray) -> None:
    """Refuse a model whose output widths do not fit classes.json and reference_stats.json."""
    dim = int(artifacts.reference["embedding"]["dim"])
    if probs.shape[1:] != (len(artifacts.classes),) or emb.shape[1:] != (dim,):
        raise ModelDirError(
            f"model.ts outputs probabilities {probs.shape[1:]} and embeddings {emb.shape[1:]}, but classes.json has "
            f"{len(artifacts.classes)} classes and reference_stats.json a {dim}-wide embedding"
        )


def _export_onnx(module: Any, x: np.ndarray, ref_probs: np.ndarray, ref_emb: np.ndarray, onnx_path: Path,
                 head_path: Path) -> None:
    """Export ``module``'s backbone to ONNX and its head to ``.npz``, then check both against its ``predict``."""
    import torch

    if not (hasattr(module, "backbone") and hasattr(module, "head")):
        raise RuntimeError("model.ts has no backbone/head submodules")
    head_state = {k: v.detach().float().numpy() for k, v in module.head.state_dict().items()}
    weights = [v for v in head_state.values() if v.ndim == 2]
    biases = [v for v in head_state.values() if v.ndim == 1]
    if len(weights) != 1 or len(biases) != 1:
        raise RuntimeError(f"model.ts head is not a single linear layer: {sorted(head_state)}")

    with tempfile.TemporaryDirectory(dir=onnx_path.parent) as tmp:
        tmp_onnx, tmp_head = Path(tmp) / "backbone.onnx", Path(tmp) / "head.npz"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated upstream, and says so
            torch.onnx.export(module.backbone, (torch.from_numpy(x),), str(tmp_onnx), **_EXPORT_OPTIONS)
        np.savez(tmp_head, weight=weights[0], bias=biases[0])

        probs, emb = OnnxBackend(str(tmp_onnx), str(tmp_head), threads=1).run(x)
        if probs.shape != ref_probs.shape or emb.shape != ref_emb.shape:
            raise RuntimeError(f"ONNX output shapes {probs.shape}, {emb.shape} != {ref_probs.shape}, {ref_emb.shape}")
        dp = float(np.abs(probs - ref_probs).max())
        de = float(np.abs(emb - ref_emb).max()) / max(float(np.abs(ref_emb).max()), 1e-6)
        if dp > PROB_TOLERANCE or de > EMBEDDING_TOLERANCE:
            raise RuntimeError(f"ONNX export disagrees with model.ts: probability {dp:.2e}, embedding {de:.2e}")
        log.info("ONNX export matches model.ts (max probability difference %.1e)", dp)
        # Rename into place last, so a crash never leaves a half-written cache entry that looks complete.
        os.replace(tmp_head, head_path)
        os.replace(tmp_onnx, onnx_path)


def prepare(artifacts: ModelArtifacts, runtime: str, cache_dir: Path, gpus_hint: int = 0) -> Plan:
    """Check ``model.ts`` against the other files, choose the runtime, export (or reuse) the model for ONNX, and
    pass the known-answer check with the chosen runtime.

    Runs once, in the entry point, before any worker starts.

    Parameters
    ----------
    artifacts : ModelArtifacts
        The checked model directory.
    runtime : str
        ``auto``, ``onnx`` or ``torchscript``.
    cache_dir : Path
        Where exports are kept, named by every input to the export (see the module docstring).
    gpus_hint : int
        GPUs the environment shows; torch has the last word.

    Raises
    ------
    ModelDirError
        ``model.ts`` cannot be loaded, its outputs do not fit classes.json / reference_stats.json, the runtime does
        not reproduce the known answers, or ``runtime="onnx"`` and the export failed.
    """
    if runtime == "torchscript" or (runtime == "auto" and gpus_hint > 0):
        import torch

        _load_and_check(artifacts)
        cuda = gpus_hint > 0 and torch.cuda.is_available()
        if runtime == "torchscript" or cuda:
            device = "cuda" if cuda else "cpu"
            gpus = torch.cuda.device_count() if cuda else 0
            return _verified(Plan("torchscript", device, None, None, artifacts.model_sha256, gpus,
                                  note=f"TorchScript on {device}"), artifacts)
    onnx_path, head_path = _cache_paths(artifacts, cache_dir)
    if onnx_path.is_file() and head_path.is_file():
        # Exported before from this very directory (the key covers every file): no torch import, which makes
        # restarts and blue/green swaps seconds faster. Still checked: the cache lives outside the model directory.
        cached = Plan("onnx", "cpu", str(onnx_path), str(head_path), artifacts.model_sha256, note="cached ONNX export")
        try:
            backend = OnnxBackend(str(onnx_path), str(head_path))
            _check_outputs(artifacts, *backend.run(_check_input(artifacts.spec.height, artifacts.spec.width)))
            return _verified(cached, artifacts, backend)
        except Exception as e:  # damaged or foreign cache entry: made again below from model.ts, never served
            log.warning("cached ONNX export %s is unusable (%s); exporting again", onnx_path.name, _one_line(e))
            _discard(onnx_path, head_path)
    module, x, ref_probs, ref_emb = _load_and_check(artifacts)
    try:
        _export_onnx(module, x, ref_probs, ref_emb, onnx_path, head_path)
    except Exception as e:  # any exporter failure: fall back or refuse, never serve an unchecked export
        if runtime == "onnx":
            raise ModelDirError(f"SERVING_RUNTIME=onnx but the ONNX export failed: {_one_line(e)}") from None
        log.warning("ONNX export failed (%s); serving model.ts with TorchScript", _one_line(e))
        return _verified(Plan("torchscript", "cpu", None, None, artifacts.model_sha256,
                              note=f"ONNX export failed: {_one_line(e)}"), artifacts)
    try:
        return _verified(Plan("onnx", "cpu", str(onnx_path), str(head_path), artifacts.model_sha256,
                              note="fresh ONNX export"), artifacts)
    except ModelDirError:
        _discard(onnx_path, head_path)  # a faithful export of a model that is not the one trained: not worth keeping
        raise


def _verified(plan: Plan, artifacts: ModelArtifacts, backend: Backend | None = None) -> Plan:
    """``plan`` once its runtime reproduces the known answers (raises ModelDirError otherwise)."""
    from inference_image.known_answers import check_known_answers

    if backend is None:
        try:
            backend = load_backend(plan, artifacts, threads=1)
        except Exception as e:  # e.g. no usable CUDA device: a start-up failure with its reason
            raise ModelDirError(f"the {plan.runtime} runtime cannot load the model: {_one_line(e)}") from None
    check_known_answers(artifacts, backend)
    log.info("known-answer check passed with %s on %s (%d images)", plan.runtime, plan.device,
             len(artifacts.known_answers))
    return plan


def _one_line(e: BaseException) -> str:
    """``Type: first line of the message`` (torch and onnxruntime put tracebacks in theirs)."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}"


def _discard(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def _cache_paths(artifacts: ModelArtifacts, cache_dir: Path) -> tuple[Path, Path]:
    """Export files named by every input to the export: all the model files (through the manifest's digest), the
    library versions (read from metadata, without imports), the opset and the export options."""
    inputs = {
        "format": _CACHE_FORMAT, "manifest_sha256": artifacts.manifest_sha256,
        "versions": {name: _version(name) for name in ("torch", "onnx", "onnxruntime", "numpy")},
        "export": _EXPORT_OPTIONS,
    }
    if not artifacts.manifest_sha256:  # load_artifacts always sets it; a hand-built ModelArtifacts must not share keys
        raise ModelDirError("no manifest digest: the model directory was not verified")
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir / f"{key}.onnx", cache_dir / f"{key}.head.npz"
