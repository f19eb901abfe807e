"""An upload's object in S3: read as the event named it, and copied with its reason to ``quarantine/``.

The upload itself is never deleted or changed. Unexpected AWS errors propagate, so that Lambda retries.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError

from lesion_common.aws_errors import error_code
from lesion_common.uploads import REASON_SUFFIX, Fetched, Upload, quarantine_key_for

logger = Logger(child=True)

# CopyObject's limit; a larger upload is left where it is and only its reason is written.
MAX_COPY_BYTES: Final = 5 * 1024**3


def fetch(client: Any, bucket: str, upload: Upload, max_bytes: int) -> Fetched | None:
    """Read the upload, pinned to the event's version (or ETag) so that what is checked is what was uploaded.

    Returns
    -------
    Fetched or None
        None when the object is gone or was replaced since the event (the replacement has its own event).
    """
    pin: dict[str, str] = {}
    if upload.version_id:
        pin["VersionId"] = upload.version_id
    elif upload.etag:
        pin["IfMatch"] = upload.etag
    # S3 notifications URL-encode keys ("a b.jpg" -> "a+b.jpg"); EventBridge's do not. Try as given, then decoded.
    candidates = [upload.key] + ([unquote_plus(upload.key)] if unquote_plus(upload.key) != upload.key else [])
    for key in candidates:
        try:
            resp = client.get_object(Bucket=bucket, Key=key, **pin)
        except ClientError as err:
            code = error_code(err)
            if code in ("NoSuchKey", "404", "NoSuchVersion"):
                continue
            if code in ("PreconditionFailed", "412"):
                logger.info("upload replaced since the event; its own event will handle it", extra={"key": key})
                return None
            raise
        body = resp["Body"]
        size = int(resp["ContentLength"])
        try:
            data = None if size > max_bytes else body.read()
        finally:
            body.close()
        return Fetched(key, size, resp.get("ETag"), resp.get("VersionId"), data)
    logger.warning("upload no longer exists; nothing to validate", extra={"key": upload.key})
    return None


def quarantine(
    client: Any,
    bucket: str,
    fetched: Fetched,
    reason_code: str,
    message: str,
    checked_at: str,
    details: Mapping[str, Any] | None = None,
) -> str | None:
    """Copy the upload to ``quarantine/`` and write ``<copy>.reason.json`` beside it.

    Returns
    -------
    str or None
        The quarantine key, or None when the upload was replaced before it could be copied.
    """
    qkey = quarantine_key_for(fetched.key)
    reason: dict[str, Any] = {
        "reason_code": reason_code,
        "message": message,
        "source_key": fetched.key,
        "size": fetched.size,
        "checked_at": checked_at,
        **(details or {}),
    }
    if fetched.size <= MAX_COPY_BYTES:
        source: dict[str, str] = {"Bucket": bucket, "Key": fetched.key}
        pin: dict[str, str] = {}
        if fetched.version_id and fetched.version_id != "null":
            source["VersionId"] = fetched.version_id
        elif fetched.etag:
            pin["CopySourceIfMatch"] = fetched.etag
        try:
            client.copy_object(CopySource=source, Bucket=bucket, Key=qkey, **pin)
        except ClientError as err:
            if error_code(err) in ("PreconditionFailed", "412"):
                logger.info("upload replaced before quarantine; its own event will handle it", extra={"key": qkey})
                return None
            raise
    else:
        reason["not_copied"] = f"over {MAX_COPY_BYTES} bytes: the upload is left in place, only this reason is written"
    client.put_object(
        Bucket=bucket,
        Key=qkey + REASON_SUFFIX,
        Body=json.dumps(reason, indent=2).encode(),
        ContentType="application/json",
    )
    return qkey
