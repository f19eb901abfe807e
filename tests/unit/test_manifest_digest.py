"""The model directory's manifest digest travels from the training output to the serving container: evaluate_model
reads it, register_model records it in the package (metadata and container environment), create_model_config
gives it to the model, and the server refuses any other directory (tests/inference/test_startup.py)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import boto3
import pytest

from tests.unit.handlers import Context, load_handler
from tests.unit.test_deployment_handlers import CREATE_ENV
from tests.unit.test_pipeline_handlers import (
    METRICS,
    REGISTER_ENV,
    _put_job_output,
    _register_event,
    aws,  # noqa: F401 - the moto fixture
)

MANIFEST = json.dumps({"format": 1, "algorithm": "sha256", "files": {"model.ts": "0" * 64}}).encode()
DIGEST = hashlib.sha256(MANIFEST).hexdigest()


@pytest.mark.parametrize(("files", "expected"), [
    ({"metrics.json": json.dumps(METRICS).encode(), "manifest.json": MANIFEST}, DIGEST),
    ({"metrics.json": json.dumps(METRICS).encode()}, None),  # a job from before the manifest
])
@pytest.mark.usefixtures("aws")
def test_evaluate_reports_the_manifest_digest(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes],
                                              expected: str | None) -> None:
    event = _put_job_output(files)
    app = load_handler("evaluate_model", {"ARTIFACTS_BUCKET": "artifacts"}, monkeypatch)
    assert app.lambda_handler(event, Context())["manifestSha256"] == expected


@pytest.mark.usefixtures("aws")
def test_the_approved_package_pins_the_files_the_endpoint_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    event: dict[str, Any] = _register_event()
    event["evaluation"]["manifestSha256"] = DIGEST
    register = load_handler("register_model", {**REGISTER_ENV, "AUTO_APPROVE": "true"}, monkeypatch)
    out = register.lambda_handler(event, Context())
    sm = boto3.client("sagemaker")
    pkg = sm.describe_model_package(ModelPackageName=out["modelPackageArn"])
    assert pkg["CustomerMetadataProperties"]["ModelManifestSha256"] == DIGEST
    assert pkg["InferenceSpecification"]["Containers"][0]["Environment"] == {"MODEL_MANIFEST_SHA256": DIGEST}

    create = load_handler("create_model_config", CREATE_ENV, monkeypatch)
    approved = create.PackageApproved(ModelPackageArn=out["modelPackageArn"], ModelPackageGroupName="grp",
                                      ModelPackageVersion=int(out["modelPackageVersion"]),
                                      ModelApprovalStatus="Approved")
    model = create.create(sm, approved)
    env = sm.describe_model(ModelName=model["modelName"])["PrimaryContainer"]["Environment"]
    assert env["MODEL_MANIFEST_SHA256"] == DIGEST and env["MODEL_VERSION"] == str(out["modelPackageVersion"])


def test_a_malformed_digest_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    register = load_handler("register_model", REGISTER_ENV, monkeypatch)
    event = _register_event()
    event["evaluation"]["manifestSha256"] = "not-a-digest"
    with pytest.raises(Exception) as info:
        register.RegisterEvent.model_validate(event)
    assert "manifestSha256" in str(info.value) or "manifest_sha256" in str(info.value)
