"""A label file uploaded to ``incoming/`` (HAM10000 metadata, ISIC 2019 ground truth, ...): its rows set labels and
lesions on the manifest items (:func:`lesion_common.manifest.record_label`).

A bad row is skipped and reported, and the file is copied to ``quarantine/`` with the rejected rows; a file that
cannot be read at all is quarantined whole. Pillow is not needed here: label files go through this module alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

from aws_lambda_powertools import Logger

from lesion_common.labels import DuplicateColumnError, LabelRow, MetadataFormatError, parse_metadata_csv
from lesion_common.manifest import record_label, record_lesion, utc_now
from lesion_common.upload_objects import fetch, quarantine
from lesion_common.uploads import Outcome, Upload

logger = Logger(child=True)

# A metadata CSV holds up to ~25k rows (ISIC 2019); one UpdateItem each, so they go out in parallel (the
# DynamoDB client needs this many connections in its pool).
CSV_WORKERS: Final = 8
MAX_REPORTED_ROWS: Final = 1000


def _parse(data: bytes, label_set: str) -> list[LabelRow] | tuple[str, str]:
    """The file's rows, or ``(reason_code, message)`` when the file as a whole cannot be used."""
    try:
        return parse_metadata_csv(data.decode("utf-8-sig"), label_set=label_set)
    except UnicodeDecodeError as err:
        return "invalid_csv", f"not UTF-8 text: {err}"
    except DuplicateColumnError as err:  # before its base class: a label file, but an ambiguous one
        return "duplicate_columns", str(err)
    except MetadataFormatError as err:
        return "unknown_csv_format", str(err)


def import_labels(
    s3_client: Any, ddb: Any, upload: Upload, *, bucket: str, table: str, counts_table: str, label_set: str,
    max_bytes: int,
) -> Outcome:
    """Apply a label file's rows to the manifest; quarantine it (a copy) when rows or the whole file are bad."""
    fetched = fetch(s3_client, bucket, upload, max_bytes)
    if fetched is None:
        return {"outcome": "gone", "key": upload.key}

    def reject(reason_code: str, message: str, details: Mapping[str, Any] | None = None) -> str | None:
        qkey = quarantine(s3_client, bucket, fetched, reason_code, message, utc_now(), details)
        logger.warning("metadata CSV quarantined", extra={"key": fetched.key, "reason_code": reason_code})
        return qkey

    if fetched.data is None:
        reject("file_too_large", f"{fetched.size} bytes, limit {max_bytes}")
        return {"outcome": "quarantined", "key": fetched.key, "reason_code": "file_too_large"}
    rows = _parse(fetched.data, label_set)
    if isinstance(rows, tuple):
        reject(*rows)
        return {"outcome": "quarantined", "key": fetched.key, "reason_code": rows[0]}

    good = [r for r in rows if r.ok and r.label is not None]
    lesions = [r for r in rows if r.ok and r.label is None and r.lesion_id]  # a file of lesion ids only
    bad = [r for r in rows if not r.ok]

    def apply(r: LabelRow) -> None:
        if r.label is not None:
            record_label(ddb, table, counts_table, label_set, fetched.key, r.image_id, r.label, r.lesion_id)
        else:
            record_lesion(ddb, table, counts_table, fetched.key, r.image_id, str(r.lesion_id))

    with ThreadPoolExecutor(max_workers=CSV_WORKERS) as pool:
        # list() so that the first failed write raises here, and Lambda retries the whole (idempotent) file.
        list(pool.map(apply, good + lesions))
    skipped: dict[str, int] = {}
    for r in bad:
        skipped[str(r.skip_reason)] = skipped.get(str(r.skip_reason), 0) + 1
    outcome: Outcome = {"outcome": "labels", "key": fetched.key, "rows": len(rows), "applied": len(good),
                        "skipped": skipped}
    if lesions:
        outcome["lesions_applied"] = len(lesions)
    if bad:
        outcome["quarantine_key"] = reject(
            "rows_rejected",
            f"{len(bad)} of {len(rows)} rows skipped ({', '.join(f'{k}: {v}' for k, v in sorted(skipped.items()))}); "
            f"the other {len(good)} were applied",
            {
                "applied_rows": len(good),
                "rejected_row_count": len(bad),
                "rejected_rows": [
                    {"line": r.line, "image_id": r.image_id, "reason": r.skip_reason,
                     **({"detail": r.detail} if r.detail else {})} for r in bad[:MAX_REPORTED_ROWS]
                ],
            },
        )
    logger.info("metadata CSV applied", extra=outcome)
    return outcome
