"""Damaged and altered model directories against the serving entry point (issue 19, item 1): a table of
case, outcome, expected.

Each case copies a genuine model directory (built by tests/inference/model_factory.py, sealed as the training job
seals it), alters it, and runs ``python -m inference_image.serve check``: exactly what ``serve`` does before it
starts gunicorn (manifest, content checks, ONNX export or cache, known-answer check with the runtime that would
serve), then exits. The outcome is the exit status and the last line of stderr, which is what SageMaker's log
shows last for an endpoint that fails to start. All cases share one ONNX export cache, as restarts on one host do.

Run: ``.venv/bin/python -m benchmarks.robustness.model_dir_attacks [--model-dir DIR]`` (about 2 minutes).
Writes ``benchmarks/robustness/results/model_dir_attacks.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.robustness.ping_under_load import default_model_dir
from lesionml.model_dir import manifest_digest
from tests.inference.helpers import another_model, flip_weight_bytes, reorder_classes, server_env
from tests.inference.model_factory import reseal

REPO = Path(__file__).resolve().parents[2]

RESULTS = Path(__file__).resolve().parent / "results"


def _edit_json(name: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        doc = json.loads((d / name).read_text())
        change(doc)
        (d / name).write_text(json.dumps(doc))
    return edit


def _poison_cache(genuine: Path, cache: Path) -> Callable[[Path], None]:
    def poison(d: Path) -> None:
        from inference_image.artifacts import load_artifacts
        from inference_image.runtime import _cache_paths

        onnx_path, head_path = _cache_paths(load_artifacts(genuine), cache)
        onnx_path.write_bytes(b"\x08\x07not an onnx model")
        head_path.write_bytes(b"junk")
    return poison


def _extra_file(d: Path) -> None:
    (d / "evaluation").mkdir(exist_ok=True)
    (d / "evaluation" / "notes.txt").write_text("added after training")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS / "model_dir_attacks.json")
    args = ap.parse_args()
    genuine = args.model_dir or default_model_dir()
    work = Path(tempfile.mkdtemp(prefix="model-dir-attacks-"))
    cache = work / "cache"
    flip: Callable[[Path], None] = lambda d: flip_weight_bytes(d / "model.ts")  # noqa: E731
    size = _edit_json("preprocessing.json", lambda doc: doc.update(height=120, width=160))
    threshold = _edit_json("metrics.json", lambda doc: doc.update(melanoma_threshold=0.9))
    # (case, alteration, regenerate the manifest, extra environment, expected: "ok" or a text the last line has)
    cases: list[tuple[str, Callable[[Path], None] | None, bool, dict[str, str], str]] = [
        ("genuine directory (cold cache)", None, False, {}, "ok"),
        ("weights flipped in model.ts", flip, False, {}, "model.ts does not match manifest.json"),
        ("weights flipped, manifest regenerated", flip, True, {}, "known-answer check failed"),
        ("another valid model.ts, manifest regenerated", another_model, True, {}, "known-answer check failed"),
        ("classes reordered in every JSON file", reorder_classes, False, {}, "classes.json does not match"),
        ("classes reordered, manifest regenerated", reorder_classes, True, {}, "but label_set 'ham7' is"),
        ("preprocessing.json changed, warm cache", size, False, {}, "preprocessing.json does not match"),
        ("preprocessing.json changed, manifest regenerated", size, True, {}, "known-answer check failed"),
        ("genuine directory again (warm cache)", None, False, {}, "ok"),
        ("reference_stats.json missing", lambda d: (d / "reference_stats.json").unlink(), False, {},
         "reference_stats.json is missing"),
        ("extra file evaluation/notes.txt", _extra_file, False, {}, "evaluation/notes.txt is not listed"),
        ("no manifest (written before this change)", lambda d: (d / "manifest.json").unlink(), False, {},
         "has no manifest.json"),
        ("threshold changed, manifest regenerated, package digest given", threshold, True,
         {"MODEL_MANIFEST_SHA256": manifest_digest(genuine)}, "the model package recorded"),
        ("ONNX cache entry poisoned (genuine directory)", _poison_cache(genuine, cache), False, {}, "ok"),
        ("TorchScript runtime, weights flipped, manifest regenerated", flip, True,
         {"SERVING_RUNTIME": "torchscript"}, "known-answer check failed (torchscript)"),
    ]
    rows = []
    for i, (name, alter, resealed, extra, expected) in enumerate(cases):
        d = work / f"case{i}" / "model"
        shutil.copytree(genuine, d)
        if alter is not None:
            alter(d)
        if resealed:
            reseal(d)
        env = server_env(d, 8080, cache, extra)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "inference_image.serve", "check"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - t0
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        if expected == "ok":
            passed = proc.returncode == 0
        else:
            passed = proc.returncode == 1 and last.startswith("serve: model not servable:") and expected in last
        passed = passed and "Traceback" not in proc.stderr
        outcome = "starts" if proc.returncode == 0 else f"exit {proc.returncode}: {last.removeprefix('serve: ')}"
        rows.append({"case": name, "outcome": outcome.replace(str(d), "<dir>"), "expected": "starts" if
                     expected == "ok" else f"refused: ...{expected}...", "pass": passed, "seconds": round(seconds, 1)})
        print(f"{'PASS' if passed else 'FAIL'}  {name}: {rows[-1]['outcome'][:160]}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print()
    print("| case | outcome | expected | |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['case']} | {r['outcome'][:200]} | {r['expected']} | {'pass' if r['pass'] else 'FAIL'} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cases": rows, "all_pass": all(r["pass"] for r in rows),
                                    "load_average_1m": round(os.getloadavg()[0], 2)}, indent=2) + "\n")
    sys.exit(0 if all(r["pass"] for r in rows) else 1)


if __name__ == "__main__":
    main()
