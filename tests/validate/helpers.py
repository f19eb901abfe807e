"""Shared helpers of the validate_image tests: paths, a mocked account, events, image builders."""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image

REPO = Path(__file__).resolve().parents[2]

SHARED = REPO.parent / "shared" / "data"
NEGATIVES = SHARED / "negatives"
HAM_IMAGES = SHARED / "ham10000" / "images"
SAMPLE = REPO / "data" / "sample"
SAMPLE_IMAGES = SAMPLE / "images"

BUCKET = "skin-lesion-data-123456789012"
TABLE = "skin-lesion-manifest-test"
HASH_TABLE = "skin-lesion-hashes-test"
STATUS_SHARDS = 4
REGION = "us-east-1"
ENV = {
    "DATA_BUCKET": BUCKET,
    "MANIFEST_TABLE": TABLE,
    "HASH_INDEX_TABLE": HASH_TABLE,
    "STATUS_SHARDS": str(STATUS_SHARDS),
    "LABEL_SET": "ham7",
    "MIN_IMAGE_SIDE": "64",
    "MAX_IMAGE_SIDE": "10000",
    "MAX_IMAGE_PIXELS": "40000000",
    "MAX_ASPECT_RATIO": "4.0",
    "MAX_UPLOAD_BYTES": str(100 * 1024 * 1024),
    "AWS_DEFAULT_REGION": REGION,
    # The handler creates its clients at import, and botocore resolves credentials then: fake ones for moto.
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "POWERTOOLS_SERVICE_NAME": "validate-image-test",
    "POWERTOOLS_METRICS_NAMESPACE": "SkinLesionTest",
    "POWERTOOLS_TRACE_DISABLED": "true",
}


def create_resources(s3: Any, ddb: Any) -> None:
    """The data bucket, the manifest table (key image_id, GSI by-status-shard on status_shard+validated_at, ALL)
    and the hash index table (pk, sk), as template.yaml declares them."""
    s3.create_bucket(Bucket=BUCKET)
    ddb.create_table(
        TableName=TABLE,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[
            {"AttributeName": "image_id", "AttributeType": "S"},
            {"AttributeName": "status_shard", "AttributeType": "S"},
            {"AttributeName": "validated_at", "AttributeType": "S"},
        ],
        KeySchema=[{"AttributeName": "image_id", "KeyType": "HASH"}],
        GlobalSecondaryIndexes=[
            {
                "IndexName": "by-status-shard",
                "KeySchema": [
                    {"AttributeName": "status_shard", "KeyType": "HASH"},
                    {"AttributeName": "validated_at", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
        ],
    )
    ddb.create_table(
        TableName=HASH_TABLE,
        BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": n, "AttributeType": "S"} for n in ("pk", "sk")],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
    )


class FakeContext:
    """What Powertools reads from the Lambda context."""

    function_name = "validate-image"
    function_version = "$LATEST"
    invoked_function_arn = f"arn:aws:lambda:{REGION}:123456789012:function:validate-image"
    memory_limit_in_mb = 2048
    aws_request_id = "00000000-0000-0000-0000-000000000000"
    log_group_name = "/aws/lambda/validate-image"
    log_stream_name = "test"

    def get_remaining_time_in_millis(self) -> int:
        return 300_000


def object_created(key: str, size: int, etag: str | None, bucket: str = BUCKET) -> dict[str, Any]:
    """An EventBridge S3 "Object Created" event."""
    obj: dict[str, Any] = {"key": key, "size": size, "sequencer": "0062E99A88DC407460"}
    if etag is not None:
        obj["etag"] = etag
    return {
        "version": "0",
        "id": hashlib.md5(key.encode()).hexdigest(),
        "detail-type": "Object Created",
        "source": "aws.s3",
        "account": "123456789012",
        "time": "2026-11-29T12:00:00Z",
        "region": REGION,
        "resources": [f"arn:aws:s3:::{bucket}"],
        "detail": {
            "version": "0",
            "bucket": {"name": bucket},
            "object": obj,
            "request-id": "N4N7GDK58NMKJ12R",
            "requester": "123456789012",
            "reason": "PutObject",
        },
    }


def _plain(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: next(iter(v.values())) for k, v in raw.items()}


@dataclass
class Cloud:
    """A mocked account and helpers to upload and invoke."""

    app: ModuleType
    s3: Any
    ddb: Any

    def put(self, key: str, data: bytes) -> dict[str, Any]:
        """Upload and return the event S3 would send through EventBridge."""
        resp = self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        return object_created(key, len(data), resp["ETag"].strip('"'))

    def upload(self, key: str, data: bytes) -> dict[str, Any]:
        """Upload, invoke the handler with the matching event, return its outcome."""
        return self.invoke(self.put(key, data))

    def invoke(self, event: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.app.lambda_handler(event, FakeContext())
        return result

    def body(self, key: str) -> bytes:
        data: bytes = self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        return data

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for p in pages for o in p.get("Contents", []))

    def item(self, image_id: str) -> dict[str, Any] | None:
        resp = self.ddb.get_item(TableName=TABLE, Key={"image_id": {"S": image_id}}, ConsistentRead=True)
        raw = resp.get("Item")
        return None if raw is None else _plain(raw)

    def items(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for page in self.ddb.get_paginator("scan").paginate(TableName=TABLE):
            for raw in page["Items"]:
                item = _plain(raw)
                out[item["image_id"]] = item
        return out


def negatives_rows() -> list[dict[str, str]]:
    """negatives.csv rows, or [] where the shared data is absent (the parametrised tests then have no cases)."""
    path = NEGATIVES / "negatives.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def sample_image_paths() -> list[Path]:
    """The bundled HAM10000 sample images (always present), sorted."""
    return sorted(SAMPLE_IMAGES.glob("*.jpg"))


def sample_jpeg(index: int = 0) -> bytes:
    """A real dermoscopy JPEG (200x150) from the bundled sample."""
    return sample_image_paths()[index].read_bytes()


def encode(im: Image.Image, fmt: str = "JPEG", **kwargs: Any) -> bytes:
    """Encode a PIL image."""
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    """Open and fully load bytes."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def jpeg_markers(data: bytes) -> list[int]:
    """The marker bytes of a JPEG's segments, up to and including SOS (the header, where metadata lives)."""
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    markers, pos = [0xD8], 2
    while pos < len(data):
        assert data[pos] == 0xFF, f"lost sync at {pos}"
        marker = data[pos + 1]
        markers.append(marker)
        if marker == 0xDA:
            return markers
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        pos += 2 + length
    raise AssertionError("no SOS")
