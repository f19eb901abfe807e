"""Issue 16: no index partition takes every write (status sharded), and the readers still see every item."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from moto import mock_aws

from lesion_common.manifest import STATUS_INDEX
from tests.unit.handlers import Context, load_handler

REPO = Path(__file__).resolve().parents[2]
SAMPLE_IMAGES = sorted((REPO / "data" / "sample" / "images").glob("*.jpg"))
SHARDS = "4"
CHECK_ENV = {
    "MANIFEST_TABLE": "manifest", "DATA_BUCKET": "data", "ARTIFACTS_BUCKET": "artifacts",
    "MODEL_PACKAGE_GROUP": "grp", "LABEL_SET": "ham7", "MIN_NEW_IMAGES": "1", "MIN_IMAGES_PER_CLASS": "1",
    "STATUS_SHARDS": SHARDS, "HASH_INDEX_TABLE": "hashes",
}
VALIDATE_ENV = {
    "DATA_BUCKET": "data", "MANIFEST_TABLE": "manifest", "HASH_INDEX_TABLE": "hashes", "STATUS_SHARDS": SHARDS,
    "LABEL_SET": "ham7", "MIN_IMAGE_SIDE": "64", "MAX_IMAGE_SIDE": "10000", "MAX_IMAGE_PIXELS": "40000000",
    "MAX_ASPECT_RATIO": "4.0", "MAX_UPLOAD_BYTES": str(100 * 1024 * 1024),
}


class _Loader(yaml.SafeLoader):
    """Reads template.yaml's short-form intrinsics (!Ref, !Sub, ...) as plain values."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: (
    loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode)
    else loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node)))


def _template() -> dict[str, Any]:
    return yaml.load((REPO / "template.yaml").read_text(), Loader=_Loader)  # noqa: S506 - SafeLoader subclass


def _tables() -> dict[str, dict[str, Any]]:
    resources = _template()["Resources"]
    return {name: res["Properties"] for name, res in resources.items() if res["Type"] == "AWS::DynamoDB::Table"}


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        ddb = boto3.client("dynamodb")
        # The two tables exactly as template.yaml declares them (keys and indexes).
        tables = _tables()
        for name, logical in (("manifest", "ManifestTable"), ("hashes", "HashIndexTable")):
            props = tables[logical]
            kwargs = {k: props[k] for k in ("AttributeDefinitions", "KeySchema", "BillingMode")}
            if props.get("GlobalSecondaryIndexes"):
                kwargs["GlobalSecondaryIndexes"] = props["GlobalSecondaryIndexes"]
            ddb.create_table(TableName=name, **kwargs)
        for bucket in ("data", "artifacts"):
            boto3.client("s3").create_bucket(Bucket=bucket)
        boto3.client("sagemaker").create_model_package_group(ModelPackageGroupName="grp")
        yield


def test_no_index_is_keyed_by_status_alone() -> None:
    for name, props in _tables().items():
        for index in props.get("GlobalSecondaryIndexes", []):
            hash_key = next(k["AttributeName"] for k in index["KeySchema"] if k["KeyType"] == "HASH")
            assert hash_key != "status", f"{name}/{index['IndexName']} puts every write of a status on one partition"
    manifest = _tables()["ManifestTable"]
    assert [i["IndexName"] for i in manifest["GlobalSecondaryIndexes"]] == [STATUS_INDEX]  # the one the code queries
    hashes = _tables()["HashIndexTable"]
    assert hashes["SSESpecification"]["SSEType"] == "KMS" and hashes["PointInTimeRecoverySpecification"]
    resources = _template()["Resources"]
    assert resources["HashIndexTable"]["DeletionPolicy"] == resources["HashIndexTable"]["UpdateReplacePolicy"] \
        == "Retain"
    shards = {resources[f]["Properties"]["Environment"]["Variables"]["STATUS_SHARDS"]
              for f in ("ValidateImageFunction", "CheckDataFunction")}
    assert len(shards) == 1, "writer and reader must agree on the number of shards"


def _upload(app: Any, key: str, data: bytes) -> dict[str, Any]:
    etag = boto3.client("s3").put_object(Bucket="data", Key=key, Body=data)["ETag"].strip('"')
    event = {"source": "aws.s3", "detail-type": "Object Created",
             "detail": {"bucket": {"name": "data"}, "object": {"key": key, "size": len(data), "etag": etag}}}
    out: dict[str, Any] = app.lambda_handler(event, Context())
    return out


def test_validated_items_spread_over_shards_and_check_data_reads_them_all(
    aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    validate = load_handler("validate_image", VALIDATE_ENV, monkeypatch)
    outcomes = [_upload(validate, f"incoming/ham/nv/{p.name}", p.read_bytes()) for p in SAMPLE_IMAGES[:24]]
    copy = _upload(validate, "incoming/other/nv/COPY_OF_FIRST.jpg", SAMPLE_IMAGES[0].read_bytes())
    assert copy["outcome"] == "duplicate"
    validated = [o["image_id"] for o in outcomes if o["outcome"] == "validated"]
    assert len(validated) >= 20

    items = boto3.resource("dynamodb").Table("manifest").scan()["Items"]
    shards = Counter(str(i["status_shard"]) for i in items if i["status"] == "VALIDATED")
    assert all(s.startswith("VALIDATED#") and 0 <= int(s.split("#")[1]) < int(SHARDS) for s in shards)
    assert len(shards) == int(SHARDS), f"validated writes spread over every shard: {shards}"
    assert all(str(i["status_shard"]) == f"{i['status']}#{str(i['status_shard']).split('#')[1]}" for i in items)

    check = load_handler("check_data", CHECK_ENV, monkeypatch)
    table = boto3.resource("dynamodb").Table("manifest")
    assert sorted(i["image_id"] for i in check.validated_images(table)) == sorted(validated)
    links = check.duplicate_links(table)
    assert [(i["image_id"], i["duplicate_of"]) for i in links] == [("COPY_OF_FIRST", SAMPLE_IMAGES[0].stem)]
    # Reading one shard, as a reader unaware of sharding would, misses items: the test can fail.
    assert len(check.validated_images(table, shards=1)) < len(validated)
    out = check.lambda_handler({"executionName": "run-1", "request": {"force": True}}, Context())
    assert out["totalImages"] == len(validated) and out["counts"]["nv"] == len(validated)


def test_a_copy_of_a_copy_keeps_one_split(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    check = load_handler("check_data", CHECK_ENV, monkeypatch)
    items = [
        {"image_id": "A", "lesion_id": "LA", "label": "nv", "sha256": "1" * 64, "split": "train"},
        {"image_id": "C", "lesion_id": "LC", "label": "nv", "sha256": "3" * 64, "split": "test"},
    ]
    # B is a near copy of A (a DUPLICATE); C's lesion is tied to B, an exact copy's owner that is itself a copy.
    links = [{"image_id": "B", "lesion_id": "LB", "duplicate_of": "A"},
             {"image_id": "X", "lesion_id": "LC", "duplicate_of": "B"}]
    rows, _ = check.one_row_per_picture(items, links, ["nv"])
    assert {r["image_id"]: r["split"] for r in rows} == {"A": "train", "C": "train"}
