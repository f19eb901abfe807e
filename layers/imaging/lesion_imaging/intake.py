"""One uploaded image, from its object in ``incoming/`` to its manifest item (validate_image's image flow).

The image is decoded and checked (:mod:`lesion_imaging.validation`); a good one is written, clean, to
``validated/<sha256 of the clean JPEG>.jpg`` and recorded as VALIDATED, or as DUPLICATE when the same or nearly
the same picture is already there under another id (:mod:`lesion_imaging.hash_index`). A bad one is copied with
its reason to ``quarantine/`` and recorded as QUARANTINED.

The image id is the file name. When that name already stands for a different picture (another key and other
bytes: the same file name in two folders), the upload gets its own item, ``<name>-<12 hex of its sha256>``,
claimed with a conditional write so that two such uploads at once cannot both take the name. The clean copy's key
is content-derived, so two pictures can never overwrite each other in ``validated/``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

from lesion_common.labels import classes_for, is_valid_image_id
from lesion_common.manifest import (
    DUPLICATE,
    QUARANTINED,
    VALIDATED,
    get_item,
    holds_other_upload,
    record_quarantined,
    record_validated,
    resolve_image_id,
    utc_now,
)
from lesion_common.upload_objects import fetch, quarantine
from lesion_common.uploads import Fetched, Outcome, Upload, alternate_id_for, clean_key_for, image_id_for, label_for
from lesion_imaging.bands import BANDS
from lesion_imaging.hash_index import BUCKET_CAP, find_duplicate, release_picture, update_band_index
from lesion_imaging.validation import (
    NEAR_DUPLICATE_BITS,
    CleanImage,
    ImageValidationError,
    ValidationLimits,
    validate_image_bytes,
)

logger = Logger(child=True)
metrics = Metrics()  # Powertools' metrics are one set per process: the handler's decorator flushes these


@dataclass(frozen=True)
class Settings:
    """What the processing functions need from the configuration."""

    bucket: str
    table: str
    label_set: str
    limits: ValidationLimits
    hash_table: str = ""
    status_shards: int = 1
    near_duplicate_bits: int = NEAR_DUPLICATE_BITS
    bands: int = BANDS
    bucket_cap: int = BUCKET_CAP

    def __post_init__(self) -> None:
        classes_for(self.label_set)  # an unknown label set fails here (the cold start), not on every upload
        if not self.hash_table or self.status_shards < 1:
            raise ValueError("a hash index table and at least one status shard are needed")

    @property
    def classes(self) -> frozenset[str]:
        """The label set's class codes."""
        return frozenset(classes_for(self.label_set))


def _index(ddb: Any, settings: Settings, image_id: str, new_phash: str | None, old_phash: str | None) -> None:
    """:func:`lesion_imaging.hash_index.update_band_index`, logging and counting the buckets that were full."""
    for bucket in update_band_index(ddb, settings, image_id, new_phash, old_phash):
        logger.warning("hash bucket full: the image is left out of this band",
                       extra={"bucket": bucket, "image_id": image_id, "cap": settings.bucket_cap})
        metrics.add_metric(name="HashBucketFull", unit=MetricUnit.Count, value=1)


def _quarantine_image(
    s3_client: Any,
    ddb: Any,
    settings: Settings,
    fetched: Fetched,
    name: str,
    image_id: str | None,
    reason_code: str,
    message: str,
    source_sha256: str | None,
) -> Outcome:
    """Quarantine an image upload and mark its manifest item.

    ``name`` is the file name; ``image_id`` the resolved id (:func:`lesion_common.manifest.resolve_image_id`), or
    None when no item is to be written (no usable id, or the name stands for another upload and there are no bytes
    to tell them apart).
    """
    checked_at = utc_now()
    qkey = quarantine(s3_client, settings.bucket, fetched, reason_code, message, checked_at)
    if qkey is None:
        return {"outcome": "superseded", "key": fetched.key, "image_id": image_id or name}
    result = "not_recorded"
    if image_id is not None:
        result = record_quarantined(
            ddb, settings, fetched, image_id, reason_code, message, qkey, checked_at, source_sha256,
            claim=image_id == name,
        )
        if result == "taken" and source_sha256 is not None:  # another picture took the name since it was read
            image_id = alternate_id_for(name, source_sha256)
            result = record_quarantined(
                ddb, settings, fetched, image_id, reason_code, message, qkey, checked_at, source_sha256
            )
    recorded = result == "recorded"
    logger.warning(
        "upload quarantined",
        extra={"key": fetched.key, "image_id": image_id or name, "reason_code": reason_code, "reason": message,
               "manifest_updated": recorded},
    )
    return {
        "outcome": "quarantined",
        "key": fetched.key,
        "image_id": image_id or name,
        "reason_code": reason_code,
        "reason": message,
        "quarantine_key": qkey,
        "manifest_updated": recorded,
    }


def _already_processed(existing: dict[str, Any], fetched: Fetched, source_sha256: str) -> bool:
    """Whether the item records this very upload (a redelivered event): same key, same bytes, a final status."""
    return (
        existing.get("source_sha256") == source_sha256
        and existing.get("source_key") == fetched.key
        and existing.get("status") in (VALIDATED, DUPLICATE, QUARANTINED)
    )


def _store(
    s3_client: Any, ddb: Any, settings: Settings, fetched: Fetched, name: str, image_id: str,
    existing: dict[str, Any] | None, clean: CleanImage, label: str | None,
) -> tuple[str, tuple[str, int] | None]:
    """Write the clean copy, then the item and the index entries; return the image id used and the duplicate."""
    # The file first: a VALIDATED item must always point at an existing object.
    s3_client.put_object(Bucket=settings.bucket, Key=clean_key_for(clean.sha256), Body=clean.jpeg,
                         ContentType="image/jpeg")
    while True:
        duplicate = find_duplicate(ddb, settings, image_id, clean.sha256, clean.phash, fetched.key)
        if record_validated(ddb, settings, fetched, image_id, clean, label, duplicate, utc_now(),
                            claim=image_id == name):
            break
        # Another picture with this file name was recorded since the read: this one takes its own id.
        image_id = alternate_id_for(name, clean.source_sha256)
        existing = get_item(ddb, settings.table, image_id)
    # After the item, so that a bucket never names an image before its item says VALIDATED; a run that stops
    # before this line is finished by the redelivery (the "already processed" branch of process_image).
    indexed = existing.get("phash") if existing is not None and existing.get("status") == VALIDATED else None
    _index(ddb, settings, image_id, None if duplicate else clean.phash, None if indexed is None else str(indexed))
    held = existing.get("sha256") if existing is not None and existing.get("status") in (VALIDATED, DUPLICATE) else None
    if held and held != clean.sha256:
        release_picture(ddb, settings.hash_table, str(held), image_id)
    return image_id, duplicate


def process_image(s3_client: Any, ddb: Any, settings: Settings, upload: Upload) -> Outcome:
    """Validate one uploaded image and record the result (see the module docstring)."""
    name = image_id_for(upload.key)
    fetched = fetch(s3_client, settings.bucket, upload, settings.limits.max_bytes)
    if fetched is None:
        return {"outcome": "gone", "key": upload.key, "image_id": name}
    name = image_id_for(fetched.key)  # the key may have needed URL-decoding
    if not is_valid_image_id(name):
        return _quarantine_image(
            s3_client, ddb, settings, fetched, name, None, "invalid_image_id",
            f"file name {name!r} is not a usable image id ([A-Za-z0-9][A-Za-z0-9_.-]{{0,127}})", None,
        )
    if fetched.data is None:
        taken = holds_other_upload(get_item(ddb, settings.table, name), fetched.key, None)
        return _quarantine_image(
            s3_client, ddb, settings, fetched, name, None if taken else name, "file_too_large",
            f"{fetched.size} bytes, limit {settings.limits.max_bytes}", None,
        )
    source_sha256 = hashlib.sha256(fetched.data).hexdigest()
    image_id, existing = resolve_image_id(ddb, settings.table, name, fetched.key, source_sha256)
    if existing is not None and _already_processed(existing, fetched, source_sha256):
        logger.info("same upload already processed", extra={"key": fetched.key, "status": existing["status"]})
        if existing["status"] == VALIDATED and existing.get("phash"):
            # The index is written after the item: a run that stopped in between left it out (idempotent puts).
            _index(ddb, settings, image_id, str(existing["phash"]), None)
        return {"outcome": "unchanged", "key": fetched.key, "image_id": image_id, "status": existing["status"]}

    label = label_for(fetched.key)
    if label is not None and label not in settings.classes:
        return _quarantine_image(
            s3_client, ddb, settings, fetched, name, image_id, "label_not_in_label_set",
            f"folder label {label!r} is not a class of {settings.label_set}", source_sha256,
        )
    try:
        clean = validate_image_bytes(fetched.data, limits=settings.limits)
    except ImageValidationError as err:
        return _quarantine_image(
            s3_client, ddb, settings, fetched, name, image_id, err.reason_code, err.message, source_sha256
        )

    image_id, duplicate = _store(s3_client, ddb, settings, fetched, name, image_id, existing, clean, label)
    outcome: Outcome = {
        "outcome": "duplicate" if duplicate else "validated",
        "key": fetched.key,
        "image_id": image_id,
        "validated_key": clean_key_for(clean.sha256),
        "width": clean.width,
        "height": clean.height,
        "sha256": clean.sha256,
        "phash": clean.phash,
        "conversions": list(clean.conversions),
        "lossless": clean.lossless,
    }
    if image_id != name:
        outcome["file_name_taken_by"] = name
    if label is not None:
        outcome["label"] = label
    if duplicate:
        outcome["duplicate_of"], outcome["duplicate_distance"] = duplicate
    logger.info("image validated", extra={k: v for k, v in outcome.items() if k != "phash"})
    return outcome
