"""Classify images with the deployed endpoint: one line per image, and optionally a CSV of the answers.

Each image is one ``InvokeEndpoint`` call (boto3 ``sagemaker-runtime``, the image bytes as the body), so the
command works against AWS and against local mode alike (``python -m localmode up`` exports ``AWS_ENDPOINT_URL``,
which boto3 follows). With ``--inference-id-from-filename`` each call carries the file name without extension as
its ``InferenceId``: the id Data Capture records and the live-quality monitor joins ground truth on, so confirmed
diagnoses can later be sent by image id (``python -m tools.send_ground_truth``).

An image the endpoint refuses (the container's status and message are shown) or that cannot be read is reported
and the others go on; the exit status is then 1. Mistakes that no image can get past (no images, a missing file,
an unknown endpoint, no credentials) end the command with one ``error:`` line before anything more is sent.

Example
-------
``python -m tools.classify --stack skin-lesion --inference-id-from-filename --csv answers.csv ./images``
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, ReadTimeoutError

from tools.cli import ToolError, aws_message, region, run_main, stack_outputs
from tools.upload_dataset import IMAGE_SUFFIXES, find_images

# InvokeEndpoint's InferenceId (botocore sagemaker-runtime 2017-05-13: min 1, max 64, pattern \A\S[\p{Print}]*\z,
# where \p{Print} is printable ASCII). botocore checks neither the maximum nor the pattern before sending.
INFERENCE_ID_MAX = 64
_INFERENCE_ID = re.compile(r"[\x21-\x7e][\x20-\x7e]*")
# SageMaker real-time endpoints take request bodies of at most 6 MB (the container enforces the same limit).
MAX_BODY_BYTES = 6 * 1024 * 1024
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                 ".bmp": "image/bmp", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff"}
CSV_COLUMNS = ("file", "inference_id", "inference_time", "predicted_class", "confidence", "melanoma_probability",
               "melanoma_threshold", "melanoma_at_risk", "ood_flag", "ood_reasons", "model_version", "error")
# SageMaker answers a container that has not answered within 60 s itself (a ModelError); wait a little longer, and
# do not re-send an image that may already have been answered and captured.
CLIENT_CONFIG = Config(read_timeout=70, retries={"mode": "standard", "total_max_attempts": 2})


@dataclass
class Result:
    """One image's outcome: the answer's figures, or why it has none."""

    path: Path
    inference_id: str | None = None
    inference_time: str | None = None
    answer: dict[str, Any] = field(default_factory=dict)
    model_version: str | None = None
    error: str | None = None

    def row(self) -> dict[str, Any]:
        """The CSV row."""
        mel = self.answer.get("melanoma") or {}
        ood = self.answer.get("ood") or {}
        return {
            "file": str(self.path), "inference_id": self.inference_id or "",
            "inference_time": self.inference_time or "",
            "predicted_class": self.answer.get("predicted_class", ""), "confidence": self.answer.get("confidence", ""),
            "melanoma_probability": mel.get("probability", ""), "melanoma_threshold": mel.get("threshold", ""),
            "melanoma_at_risk": _flag(mel.get("at_risk")), "ood_flag": _flag(ood.get("flag")),
            "ood_reasons": ";".join(ood.get("reasons") or []), "model_version": self.model_version or "",
            "error": self.error or "",
        }

    def line(self, width: int) -> str:
        """``file  class  confidence ...  melanoma ... [AT RISK] [out of distribution]``, or ``file  FAILED``."""
        name = f"{str(self.path):<{width}}"
        if self.error is not None:
            return f"{name}  FAILED: {self.error}"
        mel = self.answer.get("melanoma") or {}
        ood = self.answer.get("ood") or {}
        text = f"{name}  {self.answer.get('predicted_class', '?'):<6} confidence {_num(self.answer.get('confidence'))}"
        if mel:
            text += f"  melanoma {_num(mel.get('probability'))} (threshold {_num(mel.get('threshold'))})"
            if mel.get("at_risk"):
                text += "  MELANOMA RISK"
        if ood.get("flag"):
            text += f"  OUT OF DISTRIBUTION ({', '.join(ood.get('reasons') or []) or 'score >= 1'})"
        return text


def _flag(value: Any) -> str:
    return "" if value is None else str(bool(value)).lower()


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def collect_images(args: list[Path]) -> list[Path]:
    """The files named, and the ``.jpg``/``.jpeg``/``.png`` files under the folders named, without repeats.

    Raises
    ------
    ToolError
        A path does not exist, a folder holds no image, or there is no image at all.
    """
    found: dict[Path, None] = {}
    for path in args:
        if path.is_dir():
            for image in find_images(path):
                found.setdefault(image, None)
        elif path.is_file():
            found.setdefault(path, None)
        else:
            raise ToolError(f"{path} does not exist: pass image files (.jpg, .jpeg, .png) or folders holding them")
    if not found:
        raise ToolError(f"no images found: pass image files ({', '.join(sorted(IMAGE_SUFFIXES))}) or folders")
    return list(found)


def inference_ids(images: list[Path]) -> dict[Path, str]:
    """Each image's ``InferenceId``: its file name without extension.

    Raises
    ------
    ToolError
        A name SageMaker refuses as an ``InferenceId`` (over 64 characters, not printable ASCII, or starting with
        white space), or two images with the same name (the monitor could not tell their labels apart).
    """
    ids = {path: path.stem for path in images}
    bad = [path.name for path, i in ids.items() if len(i) > INFERENCE_ID_MAX or not _INFERENCE_ID.fullmatch(i)]
    if bad:
        raise ToolError(f"{len(bad)} file name(s) cannot be an InferenceId (1 to {INFERENCE_ID_MAX} printable ASCII "
                        f"characters, the first not a space): {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; "
                        "rename them or leave out --inference-id-from-filename")
    seen: dict[str, Path] = {}
    for path, i in ids.items():
        if i in seen:
            raise ToolError(f"{seen[i]} and {path} would both send InferenceId {i}: ground truth could not tell them "
                            "apart; rename one or classify them separately")
        seen[i] = path
    return ids


def model_error(err: ClientError) -> str:
    """What the container answered, from SageMaker's ``ModelError``: its status and its message."""
    response: dict[str, Any] = err.response
    status = response.get("OriginalStatusCode")
    original = str(response.get("OriginalMessage") or response.get("Error", {}).get("Message") or "")
    try:
        doc = json.loads(original)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "message" in doc:  # the container's {"error", "message", "status"}
        original = f"{doc.get('error', 'error')}: {doc['message']}"
    text = f"the model answered {status}: {original}" if status else f"the model did not answer: {original}"
    if not status or int(status) >= 500:
        log = response.get("LogStreamArn")
        text += f" (container log: {log})" if log else " (see the endpoint's log in CloudWatch)"
    return text


def _endpoint_missing(err: ClientError, endpoint: str, where: str | None) -> ToolError | None:
    # AWS: ValidationError "Endpoint <name> of account <id> not found."
    error = err.response.get("Error", {})
    if error.get("Code") in ("ValidationError", "ValidationException") and "not found" in error.get("Message", ""):
        return ToolError(f"endpoint {endpoint} not found in region {where}: check the name (`aws sagemaker "
                         "list-endpoints`) and AWS_REGION; a stack's endpoint exists only once a model has been "
                         "approved and deployed")
    return None


def classify_one(runtime: Any, endpoint: str, path: Path, inference_id: str | None) -> Result:
    """Send one image; a refusal of this image is recorded in the result.

    Raises
    ------
    ToolError
        The endpoint does not exist.
    botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError
        Errors no other image can get past either (credentials, access, network).
    """
    result = Result(path, inference_id)
    try:
        body = path.read_bytes()
    except OSError as err:
        result.error = f"cannot read the file: {err.strerror or err}"
        return result
    if len(body) > MAX_BODY_BYTES:
        result.error = f"{len(body)} bytes; an endpoint takes at most {MAX_BODY_BYTES} bytes per request"
        return result
    request: dict[str, Any] = {"EndpointName": endpoint, "Body": body, "Accept": "application/json",
                               "ContentType": CONTENT_TYPES.get(path.suffix.lower(), "application/x-image")}
    if inference_id is not None:
        request["InferenceId"] = inference_id
    result.inference_time = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        out = runtime.invoke_endpoint(**request)
    except ClientError as err:
        missing = _endpoint_missing(err, endpoint, runtime.meta.region_name)
        if missing is not None:
            raise missing from err
        if aws_message(err) is not None:
            raise
        code = err.response.get("Error", {}).get("Code")
        result.error = model_error(err) if code == "ModelError" else f"{code}: {err.response['Error'].get('Message')}"
        return result
    except ReadTimeoutError as err:
        result.error = f"no answer in time ({err})"
        return result
    try:
        doc = json.loads(out["Body"].read())
        result.answer = dict(doc["predictions"][0])
        result.model_version = doc.get("model_version")
    except (ValueError, KeyError, IndexError, TypeError) as err:
        result.error = f"unexpected answer from the endpoint ({type(err).__name__}: {err}): is it this project's model?"
    return result


def write_csv(path: Path, results: list[Result]) -> None:
    """One row per image, in :data:`CSV_COLUMNS` (failed images too, with their ``error``)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(r.row() for r in results)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m tools.classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGES",
                        help="image files, or folders whose .jpg/.jpeg/.png files (searched recursively) are sent")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="endpoint name (the stack's EndpointName output, e.g. "
                                          "skin-lesion-classifier; in local mode $ENDPOINT_NAME)")
    where.add_argument("--stack", help="name of the deployed stack; its EndpointName output is the endpoint")
    parser.add_argument("--inference-id-from-filename", action="store_true",
                        help="send each file's name without extension as its InferenceId (at most 64 printable "
                             "ASCII characters), the id ground truth is later matched on")
    parser.add_argument("--csv", type=Path, metavar="OUT.csv", help="also write every answer to this CSV file")
    parser.add_argument("--region", help="AWS region (default: AWS_REGION or the profile's region)")
    return parser


def main(argv: list[str] | None = None, *, session: Any = None) -> int:
    """Command-line entry point; ``session`` (a boto3 Session) is for tests."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: _main(args, session))


def _main(args: argparse.Namespace, session: Any) -> int:
    images = collect_images(args.images)
    ids = inference_ids(images) if args.inference_id_from_filename else {}
    if args.csv is not None and not args.csv.parent.is_dir():
        raise ToolError(f"cannot write --csv {args.csv}: folder {args.csv.parent} does not exist")
    sess = session or boto3.Session(region_name=region(args.region))
    endpoint = args.endpoint
    if endpoint is None:
        outputs = stack_outputs(sess.client("cloudformation", region_name=region(args.region)), args.stack)
        if "EndpointName" not in outputs:
            raise ToolError(f"stack {args.stack} has no EndpointName output: it is not this project's stack, or its "
                            "deployment has not finished")
        endpoint = outputs["EndpointName"]
    runtime = sess.client("sagemaker-runtime", region_name=region(args.region), config=CLIENT_CONFIG)
    sys.stderr.write(f"classifying {len(images)} image(s) with endpoint {endpoint}\n")
    width = min(max(len(str(p)) for p in images), 60)
    results: list[Result] = []
    try:
        for path in images:
            result = classify_one(runtime, endpoint, path, ids.get(path))
            results.append(result)
            print(result.line(width), flush=True)
    finally:
        if args.csv is not None and results:
            write_csv(args.csv, results)
            sys.stderr.write(f"wrote {len(results)} row(s) to {args.csv}\n")
    failed = sum(r.error is not None for r in results)
    if failed:
        raise ToolError(f"{failed} of {len(results)} image(s) failed (see FAILED above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
