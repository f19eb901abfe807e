"""Issue 16, nothing lost under a bulk upload: lesion_common.reconcile, tools/reconcile.py (list, --redrive,
--backfill) and the hourly check_uploads function with its alarm."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import boto3
import pytest
from moto import mock_aws

from lesion_common import reconcile as rec
from lesion_common.manifest import items_with_status
from lesion_common.uploads import alternate_id_for
from localmode.template import function_environment, load_template
from tests.unit.handlers import Context, load_handler
from tools import reconcile as tool

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = load_template(REPO / "template.yaml")
RESOURCES = TEMPLATE["Resources"]
IMAGES = sorted((REPO / "data" / "sample" / "images").glob("*.jpg"))
# validate_image's environment as the template gives it; every table is named after its logical id (lower case).
VALIDATE_ENV = function_environment(TEMPLATE, "ValidateImageFunction")
BUCKET, TABLE, HASHES = VALIDATE_ENV["DATA_BUCKET"], VALIDATE_ENV["MANIFEST_TABLE"], VALIDATE_ENV["HASH_INDEX_TABLE"]
SHARDS = VALIDATE_ENV["STATUS_SHARDS"]
LATER = datetime.now(UTC) + timedelta(hours=1)  # "now" for reconcile: every object put by a test is past the grace


def _create_tables(ddb: Any) -> None:
    """Every table of template.yaml with its keys and indexes, named as function_environment names it."""
    for logical, res in RESOURCES.items():
        if res["Type"] != "AWS::DynamoDB::Table":
            continue
        props = res["Properties"]
        kwargs = {k: props[k] for k in ("AttributeDefinitions", "KeySchema", "BillingMode")}
        if props.get("GlobalSecondaryIndexes"):
            kwargs["GlobalSecondaryIndexes"] = props["GlobalSecondaryIndexes"]
        ddb.create_table(TableName=logical.lower(), **kwargs)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        _create_tables(boto3.client("dynamodb"))
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        # A stack's data bucket, as CloudFormation tags it (aws: tags, which PutBucketTagging refuses to others).
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        s3_backends[DEFAULT_ACCOUNT_ID]["global"].put_bucket_tagging(
            BUCKET, {"aws:cloudformation:logical-id": "DataBucket", "aws:cloudformation:stack-name": "skin-lesion"})
        yield


@pytest.fixture
def validate(aws: None, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    return load_handler("validate_image", VALIDATE_ENV, monkeypatch)


def _event(key: str, etag: str, size: int) -> dict[str, Any]:
    return {"source": "aws.s3", "detail-type": "Object Created",
            "detail": {"bucket": {"name": BUCKET}, "object": {"key": key, "size": size, "etag": etag}}}


def _upload(app: ModuleType | None, key: str, data: bytes, **put: Any) -> dict[str, Any]:
    """Put an object; with ``app``, deliver its event to the validation handler as EventBridge would."""
    etag = boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=data, **put)["ETag"].strip('"')
    if app is None:
        return {}
    out: dict[str, Any] = app.lambda_handler(_event(key, etag, len(data)), Context())
    return out


def _deliver(app: ModuleType, key: str) -> dict[str, Any]:
    """The event S3 sends for the object as it is now (a re-drive's copy)."""
    head = boto3.client("s3").head_object(Bucket=BUCKET, Key=key)
    out: dict[str, Any] = app.lambda_handler(_event(key, head["ETag"].strip('"'), head["ContentLength"]), Context())
    return out


def _run() -> rec.Report:
    return rec.reconcile(boto3.client("s3"), boto3.client("dynamodb"), BUCKET, TABLE, now=LATER,
                         sleep=lambda s: None)


def _reasons(report: rec.Report) -> dict[str, str]:
    return {u.key: u.reason for u in report.unreconciled}


def _delete_item(image_id: str) -> None:
    boto3.client("dynamodb").delete_item(TableName=TABLE, Key={"image_id": {"S": image_id}})


def _put_item(image_id: str, **attrs: str) -> None:
    item = {"image_id": {"S": image_id}, **{k: {"S": v} for k, v in attrs.items()}}
    boto3.client("dynamodb").put_item(TableName=TABLE, Item=item)


# ------------------------------------------------------------------ what is reconciled, and why not
def test_uploads_with_a_final_item_are_reconciled(validate: ModuleType) -> None:
    outcomes = [_upload(validate, f"incoming/ham/nv/{p.name}", p.read_bytes()) for p in IMAGES[:3]]
    outcomes.append(_upload(validate, "incoming/other/COPY.jpg", IMAGES[0].read_bytes()))
    outcomes.append(_upload(validate, "incoming/phone/mel/broken.jpg", b"not a jpeg"))
    outcomes.append(_upload(validate, "incoming/phone/bad name.jpg", b"not a usable id either"))
    _upload(None, "incoming/ham/metadata.csv", b"image_id,dx\n")
    assert [o["outcome"] for o in outcomes] == ["validated"] * 3 + ["duplicate", "quarantined", "quarantined"]
    report = _run()
    assert report.unreconciled == []
    # The upload with an unusable file name has no item by design: its quarantine reason file accounts for it.
    assert (report.images, report.reconciled, report.label_files, report.reason_files_read) == (6, 6, 1, 1)


def test_a_missing_item_a_non_final_item_and_another_uploads_name_are_told_apart(validate: ModuleType) -> None:
    _upload(None, "incoming/lost/LOST_1.jpg", IMAGES[0].read_bytes())  # its event never arrived
    _put_item("WAITING_1", status="LABEL_ONLY", label="nv", label_source="incoming/lost/labels.csv")  # a label alone
    _upload(None, "incoming/lost/WAITING_1.jpg", IMAGES[1].read_bytes())
    # Two pictures under one file name: the second is recorded under its alternate id...
    first = _upload(validate, "incoming/a/SAME_NAME.jpg", IMAGES[2].read_bytes())
    second = _upload(validate, "incoming/b/SAME_NAME.jpg", IMAGES[3].read_bytes())
    assert first["image_id"] == "SAME_NAME" and second["image_id"] == alternate_id_for("SAME_NAME", _sha(IMAGES[3]))
    # ... a third one's event was lost: the name is another upload's and its own alternate id has no item.
    _upload(None, "incoming/c/SAME_NAME.jpg", IMAGES[4].read_bytes())
    # The same bytes under the same name from another folder: the item stands for that picture.
    _upload(None, "incoming/d/SAME_NAME.jpg", IMAGES[2].read_bytes())
    # An unusable file name whose event was lost: no item, and no quarantine reason either.
    _upload(None, "incoming/lost/bad name.jpg", b"x")

    report = _run()
    assert _reasons(report) == {
        "incoming/lost/LOST_1.jpg": "no_item",
        "incoming/lost/WAITING_1.jpg": "not_final",
        "incoming/c/SAME_NAME.jpg": "other_upload",
        "incoming/lost/bad name.jpg": "no_item",
    }
    by_key = {u.key: u for u in report.unreconciled}
    assert by_key["incoming/lost/WAITING_1.jpg"].status == "LABEL_ONLY"
    assert by_key["incoming/c/SAME_NAME.jpg"].image_id == alternate_id_for("SAME_NAME", _sha(IMAGES[4]))
    assert "incoming/a/SAME_NAME.jpg" in by_key["incoming/c/SAME_NAME.jpg"].detail
    assert report.reconciled == 3 and report.by_reason() == {"no_item": 2, "not_final": 1, "other_upload": 1}
    # Only the objects whose name holds another upload were read (b, c, d), not the others.
    assert report.objects_read == 3

    # The alternate id's item lost (its event never arrived): the second upload is now unreconciled too.
    _delete_item(second["image_id"])
    assert _reasons(_run())["incoming/b/SAME_NAME.jpg"] == "other_upload"
    # An item under the upload's own name that is not final (validation writes no such item; a hand-made one).
    _put_item("LOST_1", source_key="incoming/lost/LOST_1.jpg", status="PROCESSING")
    stuck = {u.key: u for u in _run().unreconciled}["incoming/lost/LOST_1.jpg"]
    assert (stuck.reason, stuck.status) == ("not_final", "PROCESSING")


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_uploads_within_the_grace_period_are_in_flight(aws: None) -> None:
    _upload(None, "incoming/new/JUST_NOW.jpg", b"x")
    s3, ddb = boto3.client("s3"), boto3.client("dynamodb")
    now = datetime.now(UTC)
    fresh = rec.reconcile(s3, ddb, BUCKET, TABLE, now=now)
    assert (fresh.recent, fresh.images, fresh.unreconciled) == (1, 0, [])
    later = rec.reconcile(s3, ddb, BUCKET, TABLE, now=now + rec.GRACE + timedelta(seconds=5))
    assert (later.recent, _reasons(later)) == (0, {"incoming/new/JUST_NOW.jpg": "no_item"})
    assert _reasons(rec.reconcile(s3, ddb, BUCKET, TABLE, grace=timedelta(0), now=now + timedelta(seconds=5)))


def test_batches_of_100_names_and_pages_of_1000_keys(aws: None) -> None:
    """1,050 uploads: two list pages, eleven BatchGetItem requests, each missing item found wherever it falls."""
    ddb = boto3.client("dynamodb")
    keys = [f"incoming/bulk/IMG_{i:05d}.jpg" for i in range(1050)]
    missing = {0, 99, 100, 101, 199, 999, 1000, 1049}
    for k in keys:
        _upload(None, k, b"x")
    items = [{"PutRequest": {"Item": {"image_id": {"S": f"IMG_{i:05d}"}, "source_key": {"S": k},
                                      "status": {"S": "VALIDATED"}}}}
             for i, k in enumerate(keys) if i not in missing]
    for start in range(0, len(items), 25):
        ddb.batch_write_item(RequestItems={TABLE: items[start : start + 25]})
    # The same file name in another folder, in the same batch: a request may not name one key twice.
    _upload(None, "incoming/bulk2/IMG_00001.jpg", b"x")
    report = _run()
    assert _reasons(report) == {
        **{keys[i]: "no_item" for i in missing}, "incoming/bulk2/IMG_00001.jpg": "other_upload"}
    assert report.images == 1051 and report.reconciled == 1050 - len(missing)
    assert report.list_requests == 2
    assert report.batch_requests == 11 + 1  # 1,050 names in 11 requests, 1 for the alternate id


class _Throttled:
    """A DynamoDB client whose BatchGetItem leaves keys unprocessed the first ``times`` times (throttling)."""

    def __init__(self, client: Any, times: int):
        self.client, self.times, self.calls = client, times, 0

    def batch_get_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:  # noqa: N803 - boto3's name
        self.calls += 1
        if self.calls <= self.times:
            return {"Responses": {}, "UnprocessedKeys": RequestItems}
        out: dict[str, Any] = self.client.batch_get_item(RequestItems=RequestItems)
        return out


def test_unprocessed_keys_are_asked_again_with_backoff(aws: None) -> None:
    _upload(None, "incoming/x/A.jpg", b"x")
    _put_item("A", source_key="incoming/x/A.jpg", status="VALIDATED")
    waits: list[float] = []
    ddb = _Throttled(boto3.client("dynamodb"), times=3)
    report = rec.reconcile(boto3.client("s3"), ddb, BUCKET, TABLE, now=LATER, sleep=waits.append)
    assert report.reconciled == 1 and waits == [0.05, 0.1, 0.2]
    with pytest.raises(rec.ManifestThrottledError):
        rec.reconcile(boto3.client("s3"), _Throttled(boto3.client("dynamodb"), times=99), BUCKET, TABLE, now=LATER,
                      sleep=lambda s: None)


# ------------------------------------------------------------------ the tool: list and re-drive
class _Session:
    """A boto3 Session stand-in: the given (stubbed) clients, else real ones (under moto)."""

    def __init__(self, **clients: Any) -> None:
        self.clients = clients

    def client(self, name: str, **kwargs: Any) -> Any:
        return self.clients.get(name) or boto3.client(name, region_name="us-east-1")


def _tool(capsys: pytest.CaptureFixture[str], *args: str, session: Any = None) -> tuple[int, str, str]:
    capsys.readouterr()  # the handlers' log and metric lines so far
    code = tool.main(list(args), session=session or _Session())
    out, err = capsys.readouterr()
    return code, out, err


def _stack(outputs: dict[str, str] | None) -> Any:
    """A CloudFormation client that knows one stack, ``s``, with these outputs (None: no such stack)."""
    from botocore.stub import Stubber

    cfn = boto3.client("cloudformation", region_name="us-east-1")
    stub = Stubber(cfn)
    for _ in range(2):
        if outputs is None:
            stub.add_client_error("describe_stacks", "ValidationError", "Stack with id s does not exist")
        else:
            stub.add_response("describe_stacks", {"Stacks": [{
                "StackName": "s", "CreationTime": "2026-01-01T00:00:00Z", "StackStatus": "UPDATE_COMPLETE",
                "Outputs": [{"OutputKey": k, "OutputValue": v} for k, v in outputs.items()]}]})
    stub.activate()
    return cfn


def test_redrive_copies_in_place_keeps_the_bytes_and_validation_records_it(
        validate: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    s3 = boto3.client("s3")
    key = "incoming/ham/nv/LOST_EVENT.jpg"
    data = IMAGES[5].read_bytes()
    _upload(validate, "incoming/ham/nv/FINE.jpg", IMAGES[6].read_bytes())
    _upload(None, key, data, ContentType="image/jpeg", Metadata={"clinic": "a"})  # its event was lost
    before = s3.head_object(Bucket=BUCKET, Key=key)

    code, out, err = _tool(capsys, "--bucket", BUCKET, "--table", TABLE, "--grace-minutes", "0")
    assert code == 1 and err == ""
    assert out.splitlines()[0].startswith(f"no_item       {key}")
    assert "2 image uploads checked" in out and "1 unreconciled (1 no_item)" in out

    code, out, _ = _tool(capsys, "--bucket", BUCKET, "--table", TABLE, "--redrive", "--grace-minutes", "0")
    assert code == 0 and f"re-driven     {key}" in out
    after = s3.head_object(Bucket=BUCKET, Key=key)
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == data
    assert after["ContentType"] == "image/jpeg" and after["Metadata"]["clinic"] == "a"
    assert "redriven-at" in after["Metadata"] and after["LastModified"] >= before["LastModified"]

    # The copy's event runs the normal path: processed, not "same upload already processed".
    outcome = _deliver(validate, key)
    assert outcome["outcome"] == "validated" and outcome["image_id"] == "LOST_EVENT"
    code, out, _ = _tool(capsys, "--bucket", BUCKET, "--table", TABLE, "--grace-minutes", "0")
    assert code == 0 and "0 unreconciled" in out


def test_redrive_leaves_an_object_replaced_since_it_was_listed(aws: None) -> None:
    s3 = boto3.client("s3")
    _upload(None, "incoming/x/R.jpg", b"first")
    (open_,) = _run().unreconciled
    _upload(None, "incoming/x/R.jpg", b"second")  # replaced: its own event handles it
    assert rec.redrive(s3, BUCKET, open_) == "changed"
    assert "redriven-at" not in s3.head_object(Bucket=BUCKET, Key="incoming/x/R.jpg")["Metadata"]
    huge = rec.Unreconciled("incoming/x/R.jpg", rec.MAX_COPY_BYTES + 1, "e", "R", "no_item")
    assert rec.redrive(s3, BUCKET, huge) == "too_large"


# ------------------------------------------------------------------ the tool: backfill
def _snapshot() -> dict[str, list[dict[str, Any]]]:
    ddb = boto3.client("dynamodb")
    out = {}
    for table in (TABLE, HASHES):
        items = ddb.scan(TableName=table)["Items"]
        for item in items:
            for value in item.values():
                if "SS" in value:
                    value["SS"] = sorted(value["SS"])
        out[table] = sorted(items, key=lambda i: json.dumps(i, sort_keys=True))
    return out


def test_backfill_makes_pre_index_items_findable_and_a_second_run_changes_nothing(
        validate: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    from lesion_imaging.hash_index import claim_picture, find_near_duplicate

    ddb = boto3.client("dynamodb")
    originals = [_upload(validate, f"incoming/ham/nv/{p.name}", p.read_bytes()) for p in IMAGES[:3]]
    copy = _upload(validate, "incoming/other/AN_EXACT_COPY.jpg", IMAGES[0].read_bytes())
    bad = _upload(validate, "incoming/phone/BROKEN.jpg", b"not a jpeg")
    assert copy["outcome"] == "duplicate" and bad["outcome"] == "quarantined"
    # As items were before issue 16: no status_shard, no hash index. The copy is put back first, so that a scan
    # meets it before its original (its claim must not take the original's bytes).
    for page in ddb.scan(TableName=HASHES)["Items"]:
        ddb.delete_item(TableName=HASHES, Key={"pk": page["pk"], "sk": page["sk"]})
    items = {i["image_id"]["S"]: i for i in ddb.scan(TableName=TABLE)["Items"]}
    for image_id in [copy["image_id"], *sorted(set(items) - {copy["image_id"]})]:
        item = items[image_id]
        item.pop("status_shard")
        _delete_item(image_id)
        ddb.put_item(TableName=TABLE, Item=item)
    settings = tool.IndexSettings(HASHES)
    first = originals[0]
    assert find_near_duplicate(ddb, settings, "A_NEW_UPLOAD", first["phash"]) is None
    table = boto3.resource("dynamodb").Table(TABLE)
    assert items_with_status(table, "VALIDATED", int(SHARDS)) == []

    code, out, err = _tool(capsys, "--bucket", BUCKET, "--table", TABLE, "--hash-table", HASHES, "--backfill",
                           "--status-shards", SHARDS)
    assert (code, err) == (0, ""), out
    assert "backfill: 5 items given status_shard, 4 sha256 claims, 3 images added" in out
    assert find_near_duplicate(ddb, settings, "A_NEW_UPLOAD", first["phash"]) == (first["image_id"], 0)
    # The original, not its copy, holds the bytes: a new copy is a DUPLICATE of the original.
    assert claim_picture(ddb, HASHES, first["sha256"], "A_NEW_UPLOAD", "incoming/x.jpg") == first["image_id"]
    assert sorted(i["image_id"] for i in items_with_status(table, "VALIDATED", int(SHARDS))) == sorted(
        o["image_id"] for o in originals)
    assert [i["image_id"] for i in items_with_status(table, "DUPLICATE", int(SHARDS))] == [copy["image_id"]]
    # (A QUARANTINED item has no validated_at, the index's sort key: it gets its shard, outside the index.)
    assert table.get_item(Key={"image_id": "BROKEN"})["Item"]["status_shard"].startswith("QUARANTINED#")

    # A new upload of the same picture now finds it through the index, as after issue 16.
    again = _upload(validate, "incoming/later/ANOTHER_COPY.jpg", IMAGES[1].read_bytes())
    assert (again["outcome"], again["duplicate_of"]) == ("duplicate", originals[1]["image_id"])
    before = _snapshot()
    code, out, _ = _tool(capsys, "--bucket", BUCKET, "--table", TABLE, "--hash-table", HASHES, "--backfill",
                         "--status-shards", SHARDS)
    assert code == 0 and "backfill: 0 items given status_shard, 0 sha256 claims, 0 images added" in out
    assert _snapshot() == before


# ------------------------------------------------------------------ the tool: errors
def test_tool_errors_are_one_line_with_a_non_zero_exit(aws: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _tool(capsys, "--bucket", "no-such-bucket", "--table", TABLE)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("error: bucket no-such-bucket does not exist")
    code, _, err = _tool(capsys, "--bucket", BUCKET, "--table", "no-such-table")
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: table no-such-table does not exist")
    code, _, err = _tool(capsys, "--bucket", BUCKET, "--table", TABLE, "--backfill")
    assert code == 1 and err == "error: --backfill with --bucket needs --hash-table (the stack's hash index table)\n"
    code, _, err = _tool(capsys, "--stack", "s", session=_Session(cloudformation=_stack(None)))
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: stack s does not exist")
    boto3.client("s3").create_bucket(Bucket="not-a-data-bucket")
    code, _, err = _tool(capsys, "--bucket", "not-a-data-bucket", "--table", TABLE)
    assert code == 1 and "is not a stack's data bucket" in err
    assert _tool(capsys, "--bucket", "not-a-data-bucket", "--table", TABLE, "--skip-bucket-check")[0] == 0
    for args in (["--bucket", BUCKET], ["--stack", "s", "--table", TABLE], ["--bucket", BUCKET, "--table", TABLE,
                                                                             "--grace-minutes", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            tool.main(args)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("python -m tools.reconcile: error:")


def test_stack_outputs_name_the_bucket_and_tables(aws: None, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = {"DataBucketName": BUCKET, "ManifestTableName": TABLE, "HashIndexTableName": HASHES}
    code, out, err = _tool(capsys, "--stack", "s", "--backfill", session=_Session(cloudformation=_stack(outputs)))
    assert code == 0 and f"under s3://{BUCKET}/incoming/" in out and "backfill: 0 items" in out, err
    del outputs["HashIndexTableName"]  # a stack deployed before the hash index
    assert _tool(capsys, "--stack", "s", session=_Session(cloudformation=_stack(outputs)))[0] == 0
    code, _, err = _tool(capsys, "--stack", "s", "--backfill", session=_Session(cloudformation=_stack(outputs)))
    assert code == 1 and err.startswith("error: stack s (UPDATE_COMPLETE) has no HashIndexTableName output")


def test_every_flag_has_help() -> None:
    from tests.tools.helpers import assert_all_flags_have_help

    assert_all_flags_have_help(tool.build_parser())


def test_the_tool_and_the_template_agree() -> None:
    for logical_id in ("ValidateImageFunction", "CheckDataFunction"):
        variables = RESOURCES[logical_id]["Properties"]["Environment"]["Variables"]
        assert int(variables["STATUS_SHARDS"]) == tool.DEFAULT_STATUS_SHARDS
    variables = RESOURCES["CheckUploadsFunction"]["Properties"]["Environment"]["Variables"]
    assert timedelta(minutes=int(variables["GRACE_MINUTES"])) == rec.GRACE
    assert "HashIndexTableName" in TEMPLATE["Outputs"]


# ------------------------------------------------------------------ the hourly check and its alarm
CHECK_ENV = {"DATA_BUCKET": BUCKET, "MANIFEST_TABLE": TABLE, "METRIC_NAMESPACE": "SkinLesion/Ingestion",
             "GRACE_MINUTES": "0"}


def _published() -> list[float]:
    stats = boto3.client("cloudwatch").get_metric_statistics(
        Namespace="SkinLesion/Ingestion", MetricName="UnreconciledUploads", StartTime=datetime.now(UTC) - timedelta(
            hours=1), EndTime=datetime.now(UTC) + timedelta(hours=1), Period=60, Statistics=["Maximum", "SampleCount"])
    return [p["Maximum"] for p in sorted(stats["Datapoints"], key=lambda p: p["Timestamp"])]


def test_check_uploads_publishes_the_count_zero_included(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    app = load_handler("check_uploads", CHECK_ENV, monkeypatch)
    sample = json.loads((REPO / "events" / "check_uploads" / "scheduled_event.json").read_text())
    assert app.lambda_handler(sample, Context())["unreconciled"] == 0
    assert _published() == [0.0]
    _upload(None, "incoming/lost/A.jpg", b"x")
    _upload(None, "incoming/lost/B.jpg", b"x")
    _upload(None, "incoming/lost/labels.csv", b"image_id,dx\n")
    result = app.lambda_handler(sample, Context())
    assert result["unreconciled"] == 2 and result["byReason"]["no_item"] == 2 and result["labelFiles"] == 1
    stats = boto3.client("cloudwatch").get_metric_statistics(
        Namespace="SkinLesion/Ingestion", MetricName="UnreconciledUploads", StartTime=datetime.now(UTC) - timedelta(
            hours=1), EndTime=datetime.now(UTC) + timedelta(hours=1), Period=3600, Statistics=["Maximum", "Minimum"])
    (point,) = stats["Datapoints"]
    assert (point["Minimum"], point["Maximum"]) == (0.0, 2.0)
    from lesion_common.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError):
        app.lambda_handler(["not", "an", "object"], Context())  # type: ignore[arg-type]


def test_alarm_watches_what_the_function_publishes_and_is_on_the_dashboard() -> None:
    fn = RESOURCES["CheckUploadsFunction"]["Properties"]
    alarm = RESOURCES["UnreconciledUploadsAlarm"]["Properties"]
    code = (REPO / fn["CodeUri"] / "app.py").read_text()
    assert f'METRIC: Final = "{alarm["MetricName"]}"' in code
    assert alarm["Namespace"] == fn["Environment"]["Variables"]["METRIC_NAMESPACE"] and "Dimensions" not in alarm
    assert (alarm["Period"], alarm["EvaluationPeriods"], alarm["DatapointsToAlarm"]) == (3600, 3, 3)
    assert (alarm["Statistic"], alarm["Threshold"], alarm["ComparisonOperator"]) == (
        "Minimum", 1, "GreaterThanOrEqualToThreshold")
    assert alarm["AlarmActions"] == [{"Ref": "NotificationTopic"}]
    assert re.fullmatch(r"cron\(\d+ \* \* \* \? \*\)", fn["Events"]["Hourly"]["Properties"]["Schedule"])
    assert fn["Events"]["Hourly"]["Properties"]["DeadLetterConfig"]
    assert "${UnreconciledUploadsAlarm.Arn}" in RESOURCES["MonitoringDashboard"]["Properties"]["DashboardBody"][
        "Fn::Sub"]
    # Read-only: the role lists and reads, never writes the bucket or the table.
    actions = {a for p in fn["Policies"] for s in p["Statement"] for a in s["Action"]}
    assert actions == {"s3:ListBucket", "s3:GetObject", "dynamodb:BatchGetItem", "cloudwatch:PutMetricData",
                       "kms:Decrypt"}


# ------------------------------------------------------------------ local mode: the real rule, handler and roles
def test_local_mode_finds_a_lost_event_and_redrive_recovers_it(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Uploads validated through the template's rule; one manifest item lost; reconcile (also under the hourly
    function's own role, IAM enforced) finds exactly it; --redrive's copy goes through the rule to VALIDATED again."""
    from localmode import LocalCloud, iam
    from localmode.cloud import ACCOUNT, REGION

    with LocalCloud(work_dir=tmp_path / "local") as cloud:
        s3, ddb = boto3.client("s3", region_name=REGION), boto3.client("dynamodb", region_name=REGION)
        bucket, table = cloud.output("DataBucketName"), cloud.output("ManifestTableName")
        keys = [f"incoming/ham/nv/{p.name}" for p in IMAGES[:3]]
        for key, path in zip(keys, IMAGES, strict=False):
            s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        # Another picture under a taken file name: recorded under its alternate id, read to find that id.
        s3.put_object(Bucket=bucket, Key="incoming/other/nv/" + IMAGES[0].name, Body=IMAGES[4].read_bytes())
        s3.put_object(Bucket=bucket, Key="incoming/phone/bad name.jpg", Body=b"x")
        cloud.bus.drain()
        lost = IMAGES[1].stem
        ddb.delete_item(TableName=table, Key={"image_id": {"S": lost}})  # its event "never arrived"

        with iam.as_function("CheckUploadsFunction"):  # every read the hourly check makes, under its role
            report = rec.reconcile(s3, ddb, bucket, table, grace=timedelta(0))
        assert _reasons(report) == {keys[1]: "no_item"} and report.images == 5
        assert report.objects_read == 1 and report.reason_files_read == 1

        args = ["--bucket", bucket, "--table", table, "--grace-minutes", "0"]
        code, out, _ = _tool(capsys, *args)
        assert code == 1 and out.splitlines()[0].startswith(f"no_item       {keys[1]}")
        code, out, _ = _tool(capsys, *args, "--redrive")
        assert code == 0 and f"re-driven     {keys[1]}" in out
        cloud.bus.drain()
        item = ddb.get_item(TableName=table, Key={"image_id": {"S": lost}})["Item"]
        assert (item["status"]["S"], item["source_key"]["S"]) == ("VALIDATED", keys[1])
        assert _tool(capsys, *args)[0] == 0

        cloud.bus.fire_schedule("CheckUploadsFunctionHourly", account=ACCOUNT, region=REGION)
        rule = next(r for r in cloud.bus.rules if r.name == "CheckUploadsFunctionHourly")
        assert rule.deliveries[-1]["ok"], rule.deliveries[-1]
        metrics = boto3.client("cloudwatch", region_name=REGION).list_metrics(Namespace="SkinLesion/Ingestion")
        assert [m["MetricName"] for m in metrics["Metrics"]] == ["UnreconciledUploads"]
