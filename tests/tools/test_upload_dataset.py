"""tools.upload_dataset against moto: metadata first, parallel uploads, re-runs skip what is there."""

from __future__ import annotations

import shutil
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from tools.upload_dataset import upload_dataset

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images" / "nested"
    images.mkdir(parents=True)
    for path in sorted((SAMPLE / "images").glob("*.jpg"))[:12]:
        shutil.copy(path, images)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    return tmp_path


def test_upload_then_resume(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="data")
        first = upload_dataset(s3, "data", folder / "images", SAMPLE / "HAM10000_metadata.csv", dataset="ham",
                               workers=4, progress=False)
        assert (first.uploaded, first.skipped, first.failed) == (13, 0, 0)
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="data")["Contents"]}
        assert "incoming/ham/HAM10000_metadata.csv" in keys
        assert len([k for k in keys if k.startswith("incoming/ham/nested/") and k.endswith(".jpg")]) == 12
        assert not any(k.endswith(".txt") for k in keys)
        # An interrupted upload: one object missing, one of the wrong size; a re-run sends exactly those.
        victims = sorted(k for k in keys if k.endswith(".jpg"))[:2]
        s3.delete_object(Bucket="data", Key=victims[0])
        s3.put_object(Bucket="data", Key=victims[1], Body=b"partial")
        again = upload_dataset(s3, "data", folder / "images", None, dataset="ham", workers=4, progress=False)
        assert (again.uploaded, again.skipped, again.failed) == (2, 10, 0)
