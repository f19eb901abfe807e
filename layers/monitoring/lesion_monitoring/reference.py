"""The drift reference of the model that produced a window's predictions, found in the Model Registry.

The training job writes ``reference_stats.json`` into the model directory, so it reaches S3 only inside
``model.tar.gz`` (docs/contracts.md, "Training job outputs"). The member is read from a streamed tar: nothing
before it is kept, so memory stays at a few MB whatever the size of the model files ahead of it. Each reference
is cached in ``/tmp`` under a digest of its S3 URI and ETag, so a warm Lambda reads each model's reference once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lesion_common.registry import approved_packages, model_data_url
from lesion_monitoring.records import split_s3_uri

MEMBER = "reference_stats.json"
DEFAULT_CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "lesion-monitoring"


class ReferenceNotFoundError(RuntimeError):
    """No approved model package, or its artefacts hold no readable ``reference_stats.json``."""


@dataclass(frozen=True)
class Reference:
    """A parsed reference and where it came from."""

    document: dict[str, Any]
    uri: str
    model_version: str | None
    model_package_arn: str | None


def read_reference_uri(s3: Any, uri: str) -> dict[str, Any]:
    """Read ``reference_stats.json`` from ``uri``: the JSON itself, or a ``.tar.gz`` model archive holding it.

    Raises
    ------
    ReferenceNotFoundError
        The object is missing or holds no parseable reference.
    """
    bucket, key = split_s3_uri(uri)
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    except s3.exceptions.NoSuchKey:
        raise ReferenceNotFoundError(f"{uri} does not exist") from None
    try:
        if key.endswith((".tar.gz", ".tgz", ".tar")):
            with tarfile.open(fileobj=body, mode="r|*") as tar:
                for member in tar:
                    if member.isfile() and os.path.basename(member.name) == MEMBER:
                        f = tar.extractfile(member)
                        if f is not None:
                            doc = json.load(f)
                            break
                else:
                    raise ReferenceNotFoundError(f"{uri} has no {MEMBER}")
        else:
            doc = json.loads(body.read())
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise ReferenceNotFoundError(f"{uri}: unreadable reference ({type(err).__name__}: {err})") from None
    if not isinstance(doc, dict) or "embedding" not in doc:
        raise ReferenceNotFoundError(f"{uri}: not a reference_stats.json document")
    return doc


def approved_package(sm: Any, group: str, version: str | None) -> tuple[str, str, str]:
    """``(ModelDataUrl, version, package ARN)`` of the approved package with ``version``, else the newest one.

    Raises
    ------
    ReferenceNotFoundError
        The group has no approved package.
    """
    newest: dict[str, Any] | None = None
    chosen: dict[str, Any] | None = None
    try:
        for summary in approved_packages(sm, group):
            newest = newest or summary
            if version is not None and str(summary.get("ModelPackageVersion")) == version:
                chosen = summary
                break
    except sm.exceptions.ClientError as err:
        raise ReferenceNotFoundError(f"model package group {group}: {err}") from None
    package = chosen or newest
    if package is None:
        raise ReferenceNotFoundError(f"model package group {group} has no approved model package")
    arn = package["ModelPackageArn"]
    described = sm.describe_model_package(ModelPackageName=arn)
    url = model_data_url(described)
    return url, str(described.get("ModelPackageVersion", package.get("ModelPackageVersion", ""))), arn


def load_reference(
    s3: Any,
    sm: Any,
    *,
    group: str,
    model_version: str | None = None,
    override_uri: str = "",
    cache_dir: Path | None = None,
) -> Reference:
    """The reference to compare a window with.

    Parameters
    ----------
    s3, sm : boto3 clients
        S3 and SageMaker.
    group : str
        Model package group.
    model_version : str, optional
        The version the window's records name (``MODEL_VERSION`` of the serving container: the package version).
    override_uri : str
        ``s3://`` URI of a ``reference_stats.json`` or ``model.tar.gz`` to use instead of the registry.
    cache_dir : Path, optional
        Where parsed references are kept between invocations (:data:`DEFAULT_CACHE`).
    """
    arn = None
    version = model_version
    if override_uri:
        uri = override_uri
    else:
        uri, version, arn = approved_package(sm, group, model_version)
    bucket, key = split_s3_uri(uri)
    try:
        etag = s3.head_object(Bucket=bucket, Key=key).get("ETag", "")
    except s3.exceptions.ClientError as err:
        raise ReferenceNotFoundError(f"{uri}: {err}") from None
    # The ETag is in the key so that an override URI whose object is replaced is read again.
    cache_dir = cache_dir or DEFAULT_CACHE
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / f"reference-{hashlib.sha256(f'{uri} {etag}'.encode()).hexdigest()[:24]}.json"
    if cached.is_file():
        try:
            return Reference(json.loads(cached.read_text()), uri, version, arn)
        except (OSError, ValueError):
            pass  # a torn write from an interrupted invocation: read it again
    doc = read_reference_uri(s3, uri)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(cached)
    return Reference(doc, uri, version, arn)
