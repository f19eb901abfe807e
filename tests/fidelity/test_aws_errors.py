"""Handlers decide on the error codes AWS sends (botocore Stubber with AWS's own answers), never on moto's text."""

from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from tests.unit.handlers import load_handler

CHECK_ENV = {
    "MANIFEST_TABLE": "manifest", "DATA_BUCKET": "data", "ARTIFACTS_BUCKET": "artifacts", "MODEL_PACKAGE_GROUP": "grp",
    "LABEL_SET": "ham7", "MIN_NEW_IMAGES": "50", "MIN_IMAGES_PER_CLASS": "10", "STATUS_SHARDS": "1",
    "HASH_INDEX_TABLE": "hashes",
}


def test_check_data_does_not_read_a_failed_registry_query_as_no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: any error whose text contained "does not exist" (moto's wording for a missing group) meant "no model
    yet", so a misconfigured group silently retrained on every request. The stack creates the group; an error is
    an error."""
    app = load_handler("check_data", CHECK_ENV, monkeypatch)
    sm = boto3.client("sagemaker", region_name="us-east-1")
    with Stubber(sm) as stub:
        stub.add_client_error("list_model_packages", service_error_code="ValidationException",
                              service_message="Model Package Group grp does not exist.", http_status_code=400)
        with pytest.raises(ClientError):
            app.last_model_time(sm, "grp")
    with Stubber(sm) as stub:
        stub.add_response("list_model_packages", {"ModelPackageSummaryList": []})
        assert app.last_model_time(sm, "grp") is None
