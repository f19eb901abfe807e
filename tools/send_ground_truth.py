"""Send confirmed diagnoses to the live-quality monitor: check a ground-truth CSV, then upload it to ``ground-truth/``.

The CSV (docs/contracts.md, "Ground truth") has a header row, an id column (``inference_id``, ``image_id`` or
``event_id``: the ``InferenceId`` the image was classified with, e.g. by ``python -m tools.classify
--inference-id-from-filename``), a label column (``diagnosis``, ``label`` or ``dx``: a class code of the stack's
label set, any case) and optionally ``inference_time`` (ISO-8601). A HAM10000 metadata CSV (``image_id``, ``dx``)
is one. The file is parsed here with the evaluate_quality function's own parser before anything is sent: a file it
would not read, or one with no usable row, ends the command with one ``error:`` line; otherwise the usable and
rejected rows are reported and the file goes to ``s3://<data bucket>/ground-truth/<key name>``, where its upload
starts the evaluation. Sending the same key name again replaces that file's rows.

Example
-------
``python -m tools.send_ground_truth --stack skin-lesion confirmed-2024-06.csv``
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import ClientError

from lesion_common.labels import ALL_CODES, DEFAULT_LABEL_SET, LABEL_SETS, classes_for

# The parser is evaluate_quality's own (the monitoring layer), so what passes here passes there.
from lesion_monitoring.quality import GroundTruth, GroundTruthFormatError, parse_ground_truth
from tools.cli import ToolError, check_data_bucket, data_bucket_of_stack, describe_stack, region, run_main

PREFIX = "ground-truth/"
# evaluate_quality refuses larger files (its MAX_GROUND_TRUTH_BYTES; a test checks the two agree).
MAX_BYTES = 50 * 1024 * 1024
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]*(/[A-Za-z0-9][A-Za-z0-9_.=-]*)*\.csv")


def read_labels(path: Path) -> bytes:
    """The CSV's bytes, checked to be a ground-truth file evaluate_quality can read (header, id and label columns).

    Raises
    ------
    ToolError
        The file is missing, too large, not UTF-8, or has no id or label column.
    """
    if not path.is_file():
        raise ToolError(f"label file {path} does not exist" if not path.exists() else f"{path} is not a file")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise ToolError(f"{path} is {size} bytes; the quality evaluation reads at most {MAX_BYTES}: split it")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")  # as evaluate_quality decodes it
    except UnicodeDecodeError as err:
        raise ToolError(f"{path} is not UTF-8 text: {err.reason}") from err
    try:
        parse_ground_truth(text, sorted(ALL_CODES))  # the columns; labels are checked once the label set is known
    except GroundTruthFormatError as err:
        raise ToolError(f"{path} is not a ground-truth CSV: {err}") from err
    return data


def check_rows(text: str, path: Path, label_set: str) -> GroundTruth:
    """Parse with the label set's classes; refuse a file without one usable row.

    Raises
    ------
    ToolError
        No row has both an id and a class of ``label_set``; the message quotes the first rejected rows.
    """
    gt = parse_ground_truth(text, classes_for(label_set))
    if not gt.labels:
        examples = "; ".join(gt.rejected_examples) if gt.rejected_examples else "no data rows"
        raise ToolError(f"{path} has no usable row ({gt.rows} rows; each needs an id and a class of label set "
                        f"{label_set}: {', '.join(classes_for(label_set))}): {examples}")
    return gt


def key_for(path: Path, key_name: str | None) -> str:
    """``ground-truth/<key name>``; the file's own name by default.

    Raises
    ------
    ToolError
        A key name that is not a relative ``.csv`` path of letters, digits, ``_``, ``.``, ``=`` and ``-``.
    """
    name = key_name if key_name is not None else path.name
    if not KEY_NAME.fullmatch(name) or ".." in name:
        raise ToolError(f"key name {name!r}: use a name ending in .csv, of letters, digits, '_', '.', '=', '-' (and "
                        "'/' between parts); pass --key-name")
    return PREFIX + name


def _exists(s3: Any, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m tools.send_ground_truth", description=__doc__.split("\n\n")[0])
    parser.add_argument("labels", type=Path, metavar="LABELS.csv",
                        help="CSV with a header and an id column (inference_id, image_id or event_id) and a label "
                             "column (diagnosis, label or dx); optionally inference_time")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--stack", help="name of the deployed stack; its DataBucketName output is the bucket and its "
                                       "LabelSet parameter the label set")
    where.add_argument("--bucket", help="the data bucket by name; refused unless CloudFormation created it as a "
                                        "stack's DataBucket (see --skip-bucket-check)")
    parser.add_argument("--key-name", help="object name under ground-truth/ (default: the file's name); sending the "
                                           "same name again replaces its rows")
    parser.add_argument("--label-set", choices=sorted(LABEL_SETS),
                        help=f"the stack's LabelSet (default: read from --stack, else {DEFAULT_LABEL_SET})")
    parser.add_argument("--skip-bucket-check", action="store_true",
                        help="send to --bucket even if it is not tagged as a stack's data bucket (local mode)")
    parser.add_argument("--dry-run", action="store_true", help="check the file and the bucket, upload nothing")
    parser.add_argument("--region", help="AWS region (default: AWS_REGION or the profile's region)")
    return parser


def main(argv: list[str] | None = None, *, session: Any = None) -> int:
    """Command-line entry point; ``session`` (a boto3 Session) is for tests."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: _main(args, session))


def _main(args: argparse.Namespace, session: Any) -> int:
    data = read_labels(args.labels)
    key = key_for(args.labels, args.key_name)
    sess = session or boto3.Session(region_name=region(args.region))
    s3 = sess.client("s3", region_name=region(args.region))
    label_set = args.label_set or DEFAULT_LABEL_SET
    if args.stack:
        cfn = sess.client("cloudformation", region_name=region(args.region))
        bucket = data_bucket_of_stack(cfn, args.stack)
        params = {p["ParameterKey"]: p.get("ParameterValue", "")
                  for p in describe_stack(cfn, args.stack).get("Parameters", [])}
        deployed = params.get("LabelSet") or DEFAULT_LABEL_SET
        if args.label_set and args.label_set != deployed:
            raise ToolError(f"--label-set {args.label_set}, but stack {args.stack} is deployed with LabelSet "
                            f"{deployed}: leave --label-set out")
        label_set = deployed
        check_data_bucket(s3, bucket, require_tag=False)  # credentials and access, before the upload
    else:
        bucket = args.bucket
        check_data_bucket(s3, bucket, require_tag=not args.skip_bucket_check)
    gt = check_rows(data.decode("utf-8"), args.labels, label_set)
    print(f"{args.labels}: {len(gt.labels)} usable, {gt.rejected} rejected of {gt.rows} rows (label set {label_set})")
    for example in gt.rejected_examples:
        print(f"  rejected {example}")
    target = f"s3://{bucket}/{key}"
    if args.dry_run:
        print(f"dry run: would send to {target}")
        return 0
    replaces = _exists(s3, bucket, key)
    s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType="text/csv")
    print(f"sent to {target}{' (replacing the earlier file of that name)' if replaces else ''}; the quality "
          "evaluation runs on it now")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
