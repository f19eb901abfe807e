"""The helpers that give a shared contract one home: event parsing, the registry query, the pixel steps."""

from __future__ import annotations

from datetime import UTC, datetime

import boto3
import numpy as np
import pytest
from botocore.stub import Stubber
from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from lesion_common.errors import InvalidRequestError
from lesion_common.parsing import parse_event
from lesion_common.registry import approved_packages, model_data_url, newest_approved_package
from lesion_imaging import pixels, validation


class _Event(BaseModel):
    name: str = Field(min_length=1)


def test_parse_event_returns_the_model_or_the_error_the_state_machines_catch() -> None:
    assert parse_event(_Event, {"name": "x"}, "invalid thing").name == "x"
    with pytest.raises(InvalidRequestError, match=r"^invalid thing: 1 validation error") as info:
        parse_event(_Event, {"name": ""}, "invalid thing")
    assert isinstance(info.value.__cause__, ValidationError)


def _summary(version: int) -> dict[str, object]:
    return {"ModelPackageGroupName": "grp", "ModelPackageVersion": version, "ModelPackageStatus": "Completed",
            "ModelPackageArn": f"arn:aws:sagemaker:us-east-1:123456789012:model-package/grp/{version}",
            "CreationTime": datetime(2026, 1, version, tzinfo=UTC), "ModelApprovalStatus": "Approved"}


def test_approved_packages_reads_every_page_newest_first() -> None:
    sm = boto3.client("sagemaker", region_name="us-east-1")
    query = {"ModelPackageGroupName": "grp", "ModelApprovalStatus": "Approved", "SortBy": "CreationTime",
             "SortOrder": "Descending"}
    with Stubber(sm) as stub:
        stub.add_response("list_model_packages", {"ModelPackageSummaryList": [_summary(3)], "NextToken": "t"}, query)
        stub.add_response("list_model_packages", {"ModelPackageSummaryList": [_summary(2)]},
                          {**query, "NextToken": "t"})
        assert [s["ModelPackageVersion"] for s in approved_packages(sm, "grp")] == [3, 2]


def test_newest_approved_package_asks_for_one_and_answers_none_for_an_empty_group() -> None:
    sm = boto3.client("sagemaker", region_name="us-east-1")
    query = {"ModelPackageGroupName": "grp", "ModelApprovalStatus": "Approved", "SortBy": "CreationTime",
             "SortOrder": "Descending", "MaxResults": 1}
    with Stubber(sm) as stub:
        stub.add_response("list_model_packages", {"ModelPackageSummaryList": [_summary(4)], "NextToken": "t"}, query)
        newest = newest_approved_package(sm, "grp")
        assert newest is not None and newest["ModelPackageVersion"] == 4
        stub.add_response("list_model_packages", {"ModelPackageSummaryList": []}, query)
        assert newest_approved_package(sm, "grp") is None
    described = {"InferenceSpecification": {"Containers": [{"ModelDataUrl": "s3://b/model.tar.gz", "Image": "i"}]}}
    assert model_data_url(described) == "s3://b/model.tar.gz"


def test_float_grey_is_scaled_not_clipped() -> None:
    """Pillow's own F->RGB clips at 255, which makes a [0, 1] float image black."""
    im = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32), mode="F")
    conversions: list[str] = []
    rgb = pixels.to_rgb(im, conversions)
    assert conversions == ["F->RGB"]
    assert np.asarray(rgb)[..., 0].tolist() == [[0, 128], [255, 64]]


def test_upload_validation_and_serving_share_the_pixel_steps() -> None:
    """One definition: a MemoryError while converting is a refusal on both sides, not a crash."""
    from inference_image import imaging

    assert MemoryError in validation._DECODE_ERRORS and MemoryError in imaging._DECODE_ERRORS
    assert validation.upright_rgb is pixels.upright_rgb is imaging.upright_rgb


def test_the_icc_transform_is_built_once_per_profile() -> None:
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pixels.icc_transform.cache_clear()
    for _ in range(3):
        im = Image.new("RGB", (8, 8), (200, 100, 50))
        im.info["icc_profile"] = icc
        conversions: list[str] = []
        pixels.apply_icc(im, conversions)
        assert conversions == ["icc->sRGB"]
    assert pixels.icc_transform.cache_info().misses == 1
