"""localmode.endpoints: real serving processes behind boto3's sagemaker-runtime invoke_endpoint under moto."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from localmode.endpoints import EndpointError, LocalEndpoints

from .helpers import sample_image

JPEG = sample_image()


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[LocalEndpoints]:
    with mock_aws(), LocalEndpoints(tmp_path_factory.mktemp("local"), env={"SERVING_CACHE_DIR": str(cache_dir)}
                                    ) as eps:
        eps.install()
        yield eps


@pytest.fixture(scope="module")
def runtime(endpoints: LocalEndpoints, model_dir: Path) -> object:
    """A sagemaker-runtime client, with endpoint ``lesion-a`` (version 1) in service."""
    endpoints.start("lesion-a", model_dir, version="1")
    return boto3.client("sagemaker-runtime", region_name="us-east-1")


def test_invoke_endpoint_reaches_the_local_server(runtime: object) -> None:
    out = runtime.invoke_endpoint(  # type: ignore[attr-defined]
        EndpointName="lesion-a", Body=JPEG, ContentType="image/jpeg", Accept="application/json"
    )
    assert out["ContentType"] == "application/json"
    answer = json.loads(out["Body"].read())
    assert answer["model_version"] == "1"
    assert answer["predictions"][0]["predicted_class"] in {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}


def test_container_errors_surface_as_model_error(runtime: object) -> None:
    with pytest.raises(ClientError) as err:
        runtime.invoke_endpoint(EndpointName="lesion-a", Body=b"a,b", ContentType="text/csv")  # type: ignore
    assert err.value.response["Error"]["Code"] == "ModelError"
    assert err.value.response["OriginalStatusCode"] == 415
    assert json.loads(err.value.response["OriginalMessage"])["error"] == "unsupported_media_type"


def test_unknown_endpoint_is_a_validation_error(runtime: object) -> None:
    with pytest.raises(ClientError) as err:
        runtime.invoke_endpoint(EndpointName="nope", Body=JPEG, ContentType="image/jpeg")  # type: ignore
    assert err.value.response["Error"]["Code"] == "ValidationError"


def test_swap_then_stop(endpoints: LocalEndpoints, runtime: object, model_dir: Path) -> None:
    """Blue/green: no failed request while the version changes, the old process drains; then a graceful stop."""
    old = endpoints.get("lesion-a")
    seen: list[str] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def traffic() -> None:
        client = boto3.client("sagemaker-runtime", region_name="us-east-1")
        while not stop.is_set():
            try:
                out = client.invoke_endpoint(EndpointName="lesion-a", Body=JPEG, ContentType="image/jpeg")
                seen.append(json.loads(out["Body"].read())["model_version"])
            except Exception as e:  # any failure during the swap is the bug this test looks for
                errors.append(e)

    t = threading.Thread(target=traffic)
    t.start()
    try:
        new = endpoints.swap("lesion-a", model_dir, version="2")
        after = len(seen)
        while len(seen) < after + 3 and t.is_alive():
            time.sleep(0.01)
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors[:3]
    assert seen[0] == "1" and seen[-1] == "2"
    assert seen == sorted(seen), "an answer from the old version came after the new one"
    assert old.process.poll() == 0, "the old version was not stopped gracefully"
    assert endpoints.get("lesion-a") is new and new.port != old.port

    assert endpoints.stop("lesion-a") == 0
    assert "lesion-a" not in endpoints.names()
    assert endpoints.stop("lesion-a") is None
    with pytest.raises(ClientError) as err:
        runtime.invoke_endpoint(EndpointName="lesion-a", Body=JPEG, ContentType="image/jpeg")  # type: ignore
    assert err.value.response["Error"]["Code"] == "ValidationError"


def test_a_broken_model_never_enters_service(endpoints: LocalEndpoints, model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    (broken / "classes.json").unlink()
    with pytest.raises(EndpointError, match="classes.json is missing"):
        endpoints.start("lesion-d", broken)
    assert "lesion-d" not in endpoints.names()
