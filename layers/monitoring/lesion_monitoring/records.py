"""Captured predictions: parse every form they are stored in, and read an hour range of them from S3.

Three line formats, told apart per line (docs/contracts.md, "Monitoring record"):

* **SageMaker Data Capture** (``{"captureData": {"endpointInput": ..., "endpointOutput": {"data", "encoding"}},
  "eventMetadata": {"eventId", "inferenceId", "inferenceTime"}}``): the endpoint's JSON answer is in
  ``endpointOutput.data`` (``encoding`` ``JSON`` or ``BASE64``); each of its ``predictions[i]`` carries the compact
  ``monitoring`` block.
* **Container capture record** (one JSON object per prediction, ``CAPTURE_DIR`` of the serving container):
  ``predicted_class``, ``confidence``, ``melanoma``, ``ood``, ``embedding``, ``image`` at the top level.
* **An answer** (``{"model_version", "predictions": [...]}``), e.g. a client that logs what it received.

Image ``i > 0`` of a multi-image request is identified as ``<inference id>#<i>``, in every format.

Files of an hour are found under a prefix in either layout: ``<prefix>yyyy/mm/dd/hh/…`` (Data Capture) or
``<prefix>capture-yyyymmddThh…`` (the container's file names, as local mode uploads them).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

IMAGE_FIELDS = ("brightness", "contrast", "red_mean", "green_mean", "blue_mean", "saturation", "width", "height",
                "aspect")


class RecordFormatError(ValueError):
    """A line is not a capture record in any known format."""


@dataclass(frozen=True, slots=True)
class Prediction:
    """One image's prediction as monitoring sees it (every field but the class may be absent)."""

    predicted_class: str
    inference_id: str | None = None
    event_id: str | None = None
    time: datetime | None = None
    model_version: str | None = None
    confidence: float | None = None
    melanoma_probability: float | None = None
    melanoma_at_risk: bool | None = None
    ood_flag: bool | None = None
    pca: tuple[float, ...] | None = None
    norm: float | None = None
    image: tuple[float, ...] | None = None  # IMAGE_FIELDS order; NaN where a statistic is missing


def parse_time(value: Any) -> datetime | None:
    """An ISO-8601 time (``Z`` or offset; naive means UTC), or None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _suffix(identifier: Any, index: int) -> str | None:
    if not isinstance(identifier, str) or not identifier:
        return None
    return identifier if index == 0 else f"{identifier}#{index}"


def _prediction(
    block: dict[str, Any],
    monitoring: dict[str, Any] | None,
    *,
    index: int,
    inference_id: Any,
    event_id: Any,
    time: Any,
    model_version: Any,
) -> Prediction:
    """Build a :class:`Prediction` from a prediction block and its monitoring block (or a container record)."""
    cls = block.get("predicted_class")
    if not isinstance(cls, str) or not cls:
        raise RecordFormatError("no predicted_class")
    mel = block.get("melanoma")
    ood = block.get("ood")
    pca = norm = image = None
    if isinstance(monitoring, dict):
        emb = monitoring.get("embedding")
        if isinstance(emb, dict) and isinstance(emb.get("pca"), list) and emb["pca"]:
            values = [_float(v) for v in emb["pca"]]
            if all(v is not None for v in values):
                pca = tuple(v for v in values if v is not None)
            norm = _float(emb.get("norm"))
        img = monitoring.get("image")
        if isinstance(img, dict):
            stats = [_float(img.get(name)) for name in IMAGE_FIELDS]
            image = tuple(float("nan") if v is None else v for v in stats)
    return Prediction(
        predicted_class=cls,
        inference_id=_suffix(inference_id, index),
        event_id=_suffix(event_id, index),
        time=parse_time(time),
        model_version=str(model_version) if model_version not in (None, "") else None,
        confidence=_float(block.get("confidence")),
        melanoma_probability=_float(mel.get("probability")) if isinstance(mel, dict) else None,
        melanoma_at_risk=mel.get("at_risk") if isinstance(mel, dict) and isinstance(mel.get("at_risk"), bool)
        else None,
        ood_flag=ood.get("flag") if isinstance(ood, dict) and isinstance(ood.get("flag"), bool) else None,
        pca=pca,
        norm=norm,
        image=image,
    )


def from_answer(answer: Any, *, inference_id: Any = None, event_id: Any = None, time: Any = None) -> list[Prediction]:
    """The predictions of one endpoint answer (an error answer has none)."""
    if not isinstance(answer, dict):
        raise RecordFormatError("the answer is not a JSON object")
    preds = answer.get("predictions")
    if not isinstance(preds, list):
        if "error" in answer:
            return []  # a refused request: nothing was predicted
        raise RecordFormatError("the answer has no predictions list")
    out = []
    for i, block in enumerate(preds):
        if not isinstance(block, dict):
            raise RecordFormatError(f"predictions[{i}] is not an object")
        out.append(_prediction(block, block.get("monitoring"), index=i, inference_id=inference_id,
                               event_id=event_id, time=time, model_version=answer.get("model_version")))
    return out


def from_data_capture(doc: dict[str, Any]) -> list[Prediction]:
    """The predictions in one SageMaker Data Capture line."""
    try:
        output = doc["captureData"]["endpointOutput"]
        data = output["data"]
    except (KeyError, TypeError):
        raise RecordFormatError("Data Capture line without captureData.endpointOutput.data") from None
    raw_meta = doc.get("eventMetadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    encoding = str(output.get("encoding", "JSON")).upper()
    try:
        text: str | bytes = base64.b64decode(data, validate=True) if encoding == "BASE64" else data
        answer = json.loads(text)
    except (binascii.Error, ValueError, TypeError):
        raise RecordFormatError(f"endpointOutput.data ({encoding}) is not a JSON answer") from None
    return from_answer(answer, inference_id=meta.get("inferenceId"), event_id=meta.get("eventId"),
                       time=meta.get("inferenceTime"))


def from_container_record(doc: dict[str, Any]) -> Prediction:
    """The prediction in one container capture record."""
    raw_index = doc.get("index")
    index = raw_index if isinstance(raw_index, int) else 0
    return _prediction(doc, doc, index=index, inference_id=doc.get("inference_id"), event_id=doc.get("request_id"),
                       time=doc.get("timestamp"), model_version=doc.get("model_version"))


def parse_line(line: str | bytes) -> list[Prediction]:
    """The predictions in one JSONL line of any supported format.

    Raises
    ------
    RecordFormatError
        Not JSON, or JSON of no known shape.
    """
    try:
        doc = json.loads(line)
    except ValueError:
        raise RecordFormatError("not JSON") from None
    if not isinstance(doc, dict):
        raise RecordFormatError("not a JSON object")
    if "captureData" in doc:
        return from_data_capture(doc)
    if "predictions" in doc:
        return from_answer(doc, inference_id=doc.get("inference_id"), time=doc.get("timestamp"))
    if "predicted_class" in doc:
        return [from_container_record(doc)]
    if "error" in doc:
        return []  # a logged refusal: nothing was predicted
    raise RecordFormatError("unknown record shape")


# ---------------------------------------------------------------------------------------------- reading from S3
def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> ``("bucket", "prefix")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, prefix


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    """The UTC hours that overlap ``[start, end)``, oldest first."""
    hour = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    out = []
    while hour < end:
        out.append(hour)
        hour += timedelta(hours=1)
    return out


def hour_prefixes(prefix: str, hour: datetime) -> tuple[str, str]:
    """The two key prefixes of one hour's files under ``prefix`` (Data Capture layout, container file names)."""
    base = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    return f"{base}{hour:%Y/%m/%d/%H}/", f"{base}capture-{hour:%Y%m%dT%H}"


@dataclass
class ReadStats:
    """What a read went through (reported with every result)."""

    files: int = 0
    lines: int = 0
    predictions: int = 0
    bad_lines: int = 0
    outside_window: int = 0
    bad_examples: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """Plain counters."""
        return {"files": self.files, "lines": self.lines, "predictions": self.predictions,
                "bad_lines": self.bad_lines, "outside_window": self.outside_window,
                "bad_examples": list(self.bad_examples)}


def parse_lines(lines: Iterable[bytes | str], stats: ReadStats, where: str, start: datetime | None = None,
                end: datetime | None = None) -> list[Prediction]:
    """Parse lines, counting (not raising on) malformed ones and dropping predictions timed outside the window."""
    out: list[Prediction] = []
    n_lines = bad = outside = 0
    examples: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        n_lines += 1
        try:
            preds = parse_line(line)
        except RecordFormatError as err:
            bad += 1
            if len(examples) < 3:
                examples.append(f"{where}:{number}: {err}")
            continue
        for p in preds:
            if p.time is not None and ((start is not None and p.time < start) or (end is not None and p.time >= end)):
                outside += 1
            else:
                out.append(p)
    with stats._lock:
        stats.lines += n_lines
        stats.bad_lines += bad
        stats.outside_window += outside
        stats.predictions += len(out)
        stats.bad_examples.extend(examples[: max(0, 5 - len(stats.bad_examples))])
    return out


def list_hour_keys(s3: Any, uri: str, hour: datetime) -> list[tuple[str, str]]:
    """``(bucket, key)`` of every ``.jsonl`` / ``.jsonl.gz`` file of ``hour`` under ``uri`` (either layout)."""
    bucket, prefix = split_s3_uri(uri)
    found: dict[str, None] = {}
    paginator = s3.get_paginator("list_objects_v2")
    for p in hour_prefixes(prefix, hour):
        for page in paginator.paginate(Bucket=bucket, Prefix=p):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith((".jsonl", ".jsonl.gz", ".json")):
                    found[key] = None
    return [(bucket, k) for k in found]


def read_s3_file(s3: Any, bucket: str, key: str) -> list[bytes]:
    """The lines of one capture file (gunzipped when its name ends in ``.gz``)."""
    # Whole-object reads: capture files are a few MB, and botocore's iter_lines is several times slower.
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    if key.endswith(".gz"):
        body = gzip.decompress(body)
    return body.splitlines()


def iter_s3_predictions(
    s3: Any,
    uris: Iterable[str],
    start: datetime,
    end: datetime,
    stats: ReadStats,
    workers: int = 8,
    hours: Iterable[datetime] | None = None,
    keep: Callable[[Prediction], bool] | None = None,
) -> Iterator[Prediction]:
    """Every prediction captured in ``[start, end)`` under the given prefixes, one file's worth at a time.

    Files are fetched and parsed on ``workers`` threads (S3 latency dominates); only the predictions ``keep``
    accepts are held, so memory follows what the caller keeps rather than the files' size.
    """
    hour_list = list(hours) if hours is not None else hours_between(start, end)
    listings = [(uri, hour) for uri in uris if uri for hour in hour_list]
    if not listings:
        return
    # Listing is per hour (two prefixes each), so a day's window is 48+ requests: worth the threads too.
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(listings)))) as pool:
        files = [f for found in pool.map(lambda item: list_hour_keys(s3, *item), listings) for f in found]
    stats.files += len(files)

    def load(item: tuple[str, str]) -> list[Prediction]:
        bucket, key = item
        preds = parse_lines(read_s3_file(s3, bucket, key), stats, f"s3://{bucket}/{key}", start, end)
        return [p for p in preds if keep(p)] if keep is not None else preds

    if not files:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files)))) as pool:
        for preds in pool.map(load, files):
            yield from preds
