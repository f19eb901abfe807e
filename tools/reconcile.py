"""Find uploads under ``incoming/`` that never ended in VALIDATED, DUPLICATE or QUARANTINED, and re-drive them.

Lists the image uploads of the data bucket older than the grace period that no final manifest item records
(:mod:`lesion_common.reconcile`: no item, an item not final such as ``LABEL_ONLY``, or a file name held by another
upload with no item under this one's alternate id), one line each, then a summary line. Exit status 1 when any is
left unreconciled (and not re-driven), 0 otherwise. Label files (``.csv``) are not tracked per file and not checked.

``--redrive`` sends each one's S3 "Object Created" event again by copying the object onto itself (same bytes,
metadata kept plus ``redriven-at``): the validation function then handles it as any upload, with its own
permissions. Run the command again after the grace period to see them reconciled.

``--backfill`` brings items written before the hash index existed up to date, once, after deploying it: each
VALIDATED, DUPLICATE or QUARANTINED item without ``status_shard`` gets it (so check_data's ``by-status-shard`` queries
see it), VALIDATED and DUPLICATE items claim ``sha256#<clean sha256>``, and VALIDATED images are added to their band
buckets. VALIDATED items go first, so that the original, not its copy, owns a picture's bytes. Running it again
changes nothing.

Examples
--------
``python -m tools.reconcile --stack skin-lesion``
``python -m tools.reconcile --stack skin-lesion --redrive``
``python -m tools.reconcile --stack skin-lesion --backfill``
``python -m tools.reconcile --bucket NAME --table NAME [--hash-table NAME] --grace-minutes 0`` (local mode)
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from lesion_common.aws_errors import error_code
from lesion_common.manifest import (
    DUPLICATE,
    KEY_ATTRIBUTE,
    QUARANTINED,
    STATUS_SHARD_ATTRIBUTE,
    VALIDATED,
    build_update,
    status_shard,
)
from lesion_common.reconcile import GRACE, Report, Unreconciled, reconcile, redrive
from lesion_imaging.bands import BANDS
from lesion_imaging.hash_index import BUCKET_CAP, claim_picture, update_band_index
from lesion_imaging.validation import NEAR_DUPLICATE_BITS
from tools.cli import ToolError, check_data_bucket, describe_stack, region, run_main, stack_outputs

# template.yaml's STATUS_SHARDS of ValidateImageFunction and CheckDataFunction (a test checks the three agree).
DEFAULT_STATUS_SHARDS: Final = 16
BACKFILL_WORKERS: Final = 8


@dataclass(frozen=True)
class IndexSettings:
    """The hash index's parameters as validate_image uses them (:class:`lesion_imaging.hash_index.IndexSettings`)."""

    hash_table: str
    bands: int = BANDS
    near_duplicate_bits: int = NEAR_DUPLICATE_BITS
    bucket_cap: int = BUCKET_CAP


@dataclass
class BackfillReport:
    """What a backfill did."""

    sharded: int = 0  # items given status_shard
    claimed: int = 0  # sha256# claims made or confirmed
    indexed: int = 0  # VALIDATED images added to their band buckets
    full_buckets: int = 0  # band buckets that were full (the image left out of that band)
    changed: int = 0  # items whose status changed (or that were sharded) since the scan: left as they are
    conflicts: list[str] = field(default_factory=list)
    unindexed: list[str] = field(default_factory=list)  # VALIDATED/DUPLICATE items without sha256 or phash
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


def _plain(item: dict[str, Any]) -> dict[str, str]:
    return {k: str(next(iter(v.values()))) for k, v in item.items()}


def items_to_backfill(ddb: Any, table: str, status: str) -> Iterator[list[dict[str, str]]]:
    """The items of ``status`` without ``status_shard``, a Scan page (1 MB read) at a time: a one-off full scan."""
    kwargs: dict[str, Any] = {
        "TableName": table,
        "FilterExpression": "#st = :st AND attribute_not_exists(#shard)",
        "ProjectionExpression": "#id, #st, #sha, #ph, #src",
        "ExpressionAttributeNames": {"#id": KEY_ATTRIBUTE, "#st": "status", "#shard": STATUS_SHARD_ATTRIBUTE,
                                     "#sha": "sha256", "#ph": "phash", "#src": "source_key"},
        "ExpressionAttributeValues": {":st": {"S": status}},
    }
    while True:
        page = ddb.scan(**kwargs)
        yield [_plain(i) for i in page.get("Items", [])]
        if "LastEvaluatedKey" not in page:
            return
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _set_shard(ddb: Any, table: str, item: dict[str, str], shards: int) -> bool:
    """SET ``status_shard`` where the item still has the status scanned and no shard; False when it changed."""
    update = build_update({STATUS_SHARD_ATTRIBUTE: status_shard(item["status"], item[KEY_ATTRIBUTE], shards)})
    update["ExpressionAttributeNames"].update({"#st": "status", "#shard": STATUS_SHARD_ATTRIBUTE})
    update["ExpressionAttributeValues"][":st"] = {"S": item["status"]}
    try:
        ddb.update_item(TableName=table, Key={KEY_ATTRIBUTE: {"S": item[KEY_ATTRIBUTE]}},
                        ConditionExpression="#st = :st AND attribute_not_exists(#shard)", **update)
    except ClientError as err:
        if error_code(err) != "ConditionalCheckFailedException":
            raise
        return False
    return True


def backfill_item(ddb: Any, table: str, settings: IndexSettings, shards: int, item: dict[str, str],
                  report: BackfillReport) -> None:
    """One item: claim its bytes and index it (by its status), then set ``status_shard``, last, so that an
    interrupted run finds the item again and finishes it (every step is idempotent)."""
    image_id, status = item[KEY_ATTRIBUTE], item["status"]
    if status in (VALIDATED, DUPLICATE):
        sha, phash, source_key = item.get("sha256"), item.get("phash"), item.get("source_key", "")
        if not sha or (status == VALIDATED and not phash):
            with report.lock:
                report.unindexed.append(f"{image_id} ({status}: no {'sha256' if not sha else 'phash'})")
        if sha:
            owner = claim_picture(ddb, settings.hash_table, sha, image_id, source_key)
            report.add(claimed=1)
            if owner != image_id and status == VALIDATED:
                with report.lock:
                    report.conflicts.append(f"{image_id} and {owner} are both VALIDATED with the same clean bytes "
                                            f"({sha[:12]}...); {owner} holds them in the index")
        if status == VALIDATED and phash:
            full = update_band_index(ddb, settings, image_id, phash, None)
            report.add(indexed=1, full_buckets=len(full))
    if _set_shard(ddb, table, item, shards):
        report.add(sharded=1)
    else:
        report.add(changed=1)


def backfill(ddb: Any, table: str, settings: IndexSettings, shards: int,
             workers: int = BACKFILL_WORKERS) -> BackfillReport:
    """Every pre-index item (module docstring): VALIDATED first, then DUPLICATE and QUARANTINED."""
    report = BackfillReport()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for status in (VALIDATED, DUPLICATE, QUARANTINED):
            # All of a status before the next: a DUPLICATE's claim must find its original's.
            for page in items_to_backfill(ddb, table, status):
                list(pool.map(lambda item: backfill_item(ddb, table, settings, shards, item, report), page))
    return report


# ------------------------------------------------------------------ the command
def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m tools.reconcile", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--stack", help="name of the deployed stack: its DataBucketName, ManifestTableName and "
                                       "HashIndexTableName outputs")
    where.add_argument("--bucket", help="the data bucket by name (with --table); refused unless CloudFormation "
                                        "created it as a stack's DataBucket (see --skip-bucket-check)")
    parser.add_argument("--table", help="the manifest table (with --bucket)")
    parser.add_argument("--hash-table", help="the hash index table (with --bucket and --backfill)")
    parser.add_argument("--grace-minutes", type=int, default=int(GRACE.total_seconds() // 60),
                        help="uploads modified more recently are still in flight and not checked (default: "
                             "%(default)s, as the hourly check)")
    parser.add_argument("--redrive", action="store_true",
                        help="send each unreconciled upload's Object Created event again (copy onto itself)")
    parser.add_argument("--backfill", action="store_true",
                        help="first bring items written before the hash index up to date (status_shard, sha256 "
                             "claim, band buckets); idempotent")
    parser.add_argument("--status-shards", type=int, default=DEFAULT_STATUS_SHARDS,
                        help="the stack's STATUS_SHARDS (template.yaml: %(default)s), for --backfill")
    parser.add_argument("--skip-bucket-check", action="store_true",
                        help="use --bucket even if it is not tagged as a stack's data bucket (local mode)")
    parser.add_argument("--region", help="AWS region (default: AWS_REGION or the profile's region)")
    return parser


def main(argv: list[str] | None = None, *, session: Any = None) -> int:
    """Command-line entry point; ``session`` (a boto3 Session) is for tests."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bucket and not args.table:
        parser.error("--bucket needs --table (the manifest table)")
    if args.stack and (args.table or args.hash_table):
        parser.error("--table and --hash-table go with --bucket; --stack finds them")
    if args.grace_minutes < 0:
        parser.error("--grace-minutes must be 0 or more")
    if args.status_shards < 1:
        parser.error("--status-shards must be 1 or more")
    return run_main(lambda: _main(args, session))


def _resources(args: argparse.Namespace, sess: Any, s3: Any) -> tuple[str, str, str | None]:
    """The data bucket, the manifest table and the hash index table (None when not needed and not known)."""
    if not args.stack:
        check_data_bucket(s3, args.bucket, require_tag=not args.skip_bucket_check)
        if args.backfill and not args.hash_table:
            raise ToolError("--backfill with --bucket needs --hash-table (the stack's hash index table)")
        return args.bucket, args.table, args.hash_table
    cfn = sess.client("cloudformation", region_name=region(args.region))
    outputs = stack_outputs(cfn, args.stack)
    missing = [o for o in ("DataBucketName", "ManifestTableName") if o not in outputs]
    if args.backfill and "HashIndexTableName" not in outputs:
        missing.append("HashIndexTableName")
    if missing:
        status = describe_stack(cfn, args.stack).get("StackStatus", "")
        raise ToolError(f"stack {args.stack} ({status}) has no {', '.join(missing)} output: it is not this project's "
                        "stack, or it runs a version from before the hash index; deploy this version, or pass "
                        "--bucket, --table and --hash-table")
    check_data_bucket(s3, outputs["DataBucketName"], require_tag=False)  # credentials and access, before reading
    return outputs["DataBucketName"], outputs["ManifestTableName"], outputs.get("HashIndexTableName")


def _print_unreconciled(items: list[Unreconciled]) -> None:
    for u in items:
        print(f"{u.reason:<13} {u.key}  ({u.detail})")


def _summary(report: Report, bucket: str, grace: int) -> str:
    reasons = ", ".join(f"{n} {r}" for r, n in report.by_reason().items() if n)
    return (f"{report.images} image uploads checked under s3://{bucket}/incoming/, {report.reconciled} reconciled, "
            f"{len(report.unreconciled)} unreconciled{f' ({reasons})' if reasons else ''}; {report.recent} newer "
            f"than {grace} min not checked yet, {report.label_files} label files (.csv) not tracked per file")


def _check_tables(ddb: Any, tables: list[str]) -> None:
    """Refuse a table that does not exist (an empty ``incoming/`` would otherwise never touch it)."""
    for table in tables:
        try:
            ddb.describe_table(TableName=table)
        except ClientError as err:
            if error_code(err) == "ResourceNotFoundException":
                raise ToolError(f"table {table} does not exist in region {ddb.meta.region_name}: check the name "
                                "(--table, --hash-table; --stack finds them) and AWS_REGION") from err
            raise


def _main(args: argparse.Namespace, session: Any) -> int:
    sess = session or boto3.Session(region_name=region(args.region))
    s3 = sess.client("s3", region_name=region(args.region))
    ddb = sess.client("dynamodb", region_name=region(args.region),
                      config=Config(max_pool_connections=BACKFILL_WORKERS + 2))
    bucket, table, hash_table = _resources(args, sess, s3)
    _check_tables(ddb, [table] + ([hash_table] if args.backfill and hash_table else []))
    if args.backfill:
        assert hash_table is not None
        done = backfill(ddb, table, IndexSettings(hash_table), args.status_shards)
        for line in done.conflicts:
            print(f"warning: {line}")
        for line in done.unindexed:
            print(f"warning: not in the hash index: {line}")
        print(f"backfill: {done.sharded} items given status_shard, {done.claimed} sha256 claims, {done.indexed} "
              f"images added to their band buckets ({done.full_buckets} full buckets), {done.changed} changed "
              f"meanwhile, {len(done.conflicts)} conflicts, {len(done.unindexed)} without hashes")
    report = reconcile(s3, ddb, bucket, table, grace=timedelta(minutes=args.grace_minutes))
    _print_unreconciled(report.unreconciled)
    print(_summary(report, bucket, args.grace_minutes))
    if not report.unreconciled:
        return 0
    if not args.redrive:
        print("re-drive them with --redrive (or see docs/contracts.md, 'Reconciling uploads')")
        return 1
    outcomes = {"redriven": 0, "changed": 0, "too_large": 0}
    for u in report.unreconciled:
        outcome = redrive(s3, bucket, u)
        outcomes[outcome] += 1
        if outcome == "redriven":
            print(f"re-driven     {u.key}")
        else:
            why = {"changed": "replaced or deleted since it was listed: its own event handles it",
                   "too_large": "over CopyObject's 5 GB; validation refuses it as file_too_large anyway"}[outcome]
            print(f"not re-driven {u.key}  ({why})")
    print(f"re-drove {outcomes['redriven']} of {len(report.unreconciled)} ({outcomes['changed']} changed since "
          f"listed, {outcomes['too_large']} too large to copy): validation runs on them now; check again in "
          f"{max(args.grace_minutes, 1)} min (a re-driven upload counts as in flight until then)")
    return 1 if outcomes["too_large"] else 0


if __name__ == "__main__":
    sys.exit(main())
