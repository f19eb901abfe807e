"""The Model Registry queries the stack makes: which approved model is the current one, and where its files are.

Training (the baseline the candidate must beat) and monitoring (the drift reference of the serving model) both ask
for the group's approved packages, newest first; this is the one place that asks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def approved_packages(sm: Any, group: str, *, page_size: int | None = None) -> Iterator[dict[str, Any]]:
    """Summaries of the group's Approved model packages, newest first, page after page as they are read.

    Parameters
    ----------
    sm : boto3 SageMaker client
    group : str
        Model package group name.
    page_size : int, optional
        ``MaxResults`` of each ListModelPackages call (SageMaker's default when None); 1 when only the newest is
        wanted, so that one short call answers.

    Raises
    ------
    botocore.exceptions.ClientError
        As ListModelPackages raises it; the caller decides what an error means.
    """
    config = {"PageSize": page_size} if page_size is not None else {}
    pages = sm.get_paginator("list_model_packages").paginate(
        ModelPackageGroupName=group,
        ModelApprovalStatus="Approved",
        SortBy="CreationTime",
        SortOrder="Descending",
        PaginationConfig=config,
    )
    for page in pages:
        yield from page.get("ModelPackageSummaryList", [])


def newest_approved_package(sm: Any, group: str) -> dict[str, Any] | None:
    """The summary of the group's newest Approved package, or None when it has none."""
    return next(approved_packages(sm, group, page_size=1), None)


def model_data_url(described: dict[str, Any]) -> str:
    """``ModelDataUrl`` (the ``model.tar.gz``) of a DescribeModelPackage answer: the first container's."""
    url: str = described["InferenceSpecification"]["Containers"][0]["ModelDataUrl"]
    return url
