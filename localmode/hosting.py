"""SageMaker hosting in local mode: model package state-change events, and endpoints served by the real
inference container's server on localhost.

moto records endpoints but serves nothing and has no UpdateEndpoint; here CreateEndpoint starts the server for
the configuration's model, UpdateEndpoint starts the new version beside the old one and switches only when it
answers its health check (otherwise the old version keeps serving and the endpoint reports the rollback, as a
blue/green update that SageMaker rolls back does), and InvokeEndpoint reaches the server over HTTP.
"""

from __future__ import annotations

import io
import logging
import tarfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import boto3

log = logging.getLogger("localmode.hosting")


class EndpointHost(Protocol):
    """What serves the endpoints: ``localmode.endpoints.LocalEndpoints`` implements it."""

    def start(self, name: str, model_dir: Path, version: str | None = None, env: dict[str, str] | None = None) -> Any:
        """Serve ``model_dir`` as ``name``; raise when the server never becomes healthy."""

    def swap(self, name: str, model_dir: Path, version: str | None = None, env: dict[str, str] | None = None) -> Any:
        """Start the new version beside the old, switch when healthy; raise (old keeps serving) otherwise."""

    def stop(self, name: str) -> Any:
        """Stop serving ``name``."""


def _epoch_ms(value: Any) -> Any:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, dict):
        return {k: _epoch_ms(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_epoch_ms(v) for v in value]
    return value


class LocalHosting:
    """Installs the hooks on moto's SageMaker backend.

    Parameters
    ----------
    host : EndpointHost
        Starts and swaps the model servers.
    work_dir : Path
        Where each endpoint configuration's model archive is extracted.
    emit : callable
        ``emit(detail_type, detail, resources)`` puts an ``aws.sagemaker`` event on the local bus.
    """

    def __init__(self, host: EndpointHost, work_dir: Path,
                 emit: Callable[[str, dict[str, Any], list[str]], None]):
        self.host = host
        self.work_dir = work_dir
        self.emit = emit
        self.threads: list[threading.Thread] = []
        self._undo: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ model artefacts
    def _model_dir(self, backend: Any, config_name: str) -> tuple[Path, dict[str, str]]:
        """Download and extract the configuration's model archive (once per configuration)."""
        config = backend.endpoint_configs[config_name]
        model = backend._models[config.production_variants[0]["ModelName"]]
        container = model.primary_container or model.containers[0]
        target = self.work_dir / config_name / "model"
        if not target.exists():
            bucket, _, key = container["ModelDataUrl"].removeprefix("s3://").partition("/")
            body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
            target.mkdir(parents=True)
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
                tar.extractall(target, filter="data")
        return target, {k: str(v) for k, v in (container.get("Environment") or {}).items()}

    # ------------------------------------------------------------------ hooks
    def install(self) -> Callable[[], None]:
        """Patch moto; return the function that restores it."""
        from moto.core.responses import ActionResult
        from moto.sagemaker.exceptions import ValidationError
        from moto.sagemaker.models import SageMakerModelBackend
        from moto.sagemaker.responses import SageMakerResponse

        hosting = self
        original_create_endpoint = SageMakerModelBackend.create_endpoint
        original_delete_endpoint = SageMakerModelBackend.delete_endpoint
        original_create_package = SageMakerModelBackend.create_model_package
        original_update_package = SageMakerModelBackend.update_model_package

        def emit_package(backend: Any, arn: str) -> None:
            package = backend.describe_model_package(arn).gen_response_object()
            hosting.emit("SageMaker Model Package State Change", _epoch_ms(package), [arn])

        def create_model_package(backend: Any, *args: Any, **kwargs: Any) -> Any:
            arn = original_create_package(backend, *args, **kwargs)
            emit_package(backend, arn)
            return arn

        def update_model_package(backend: Any, *args: Any, **kwargs: Any) -> Any:
            arn = original_update_package(backend, *args, **kwargs)
            emit_package(backend, arn)
            return arn

        def run_async(name: str, work: Callable[[], None]) -> None:
            thread = threading.Thread(target=work, name=name, daemon=True)
            hosting.threads.append(thread)
            thread.start()

        def create_endpoint(backend: Any, endpoint_name: str, endpoint_config_name: str, tags: Any) -> Any:
            endpoint = original_create_endpoint(backend, endpoint_name, endpoint_config_name, tags)
            endpoint.endpoint_status = "Creating"

            def start() -> None:
                try:
                    model_dir, env = hosting._model_dir(backend, endpoint_config_name)
                    hosting.host.start(endpoint_name, model_dir, version=env.get("MODEL_VERSION"), env=env)
                    endpoint.endpoint_status = "InService"
                except Exception as err:  # noqa: BLE001 - reported as SageMaker reports a failed creation
                    log.exception("endpoint %s failed to start", endpoint_name)
                    endpoint.endpoint_status = "Failed"
                    endpoint.failure_reason = f"The primary container failed its health check: {err}"[:1024]
                endpoint.last_modified_time = datetime.now(UTC)

            run_async(f"endpoint-{endpoint_name}", start)
            return endpoint

        def update_endpoint(backend: Any, endpoint_name: str, endpoint_config_name: str) -> Any:
            if endpoint_name not in backend.endpoints:
                raise ValidationError(message=f"Could not find endpoint '{endpoint_name}'.")
            if endpoint_config_name not in backend.endpoint_configs:
                raise ValidationError(message=f"Could not find endpoint configuration '{endpoint_config_name}'.")
            endpoint = backend.endpoints[endpoint_name]
            if endpoint.endpoint_status != "InService":
                raise ValidationError(message=f"Endpoint {endpoint_name} is {endpoint.endpoint_status}, not InService")
            endpoint.endpoint_status = "Updating"

            def swap() -> None:
                try:
                    model_dir, env = hosting._model_dir(backend, endpoint_config_name)
                    hosting.host.swap(endpoint_name, model_dir, version=env.get("MODEL_VERSION"), env=env)
                    endpoint.endpoint_config_name = endpoint_config_name
                    config = backend.endpoint_configs[endpoint_config_name]
                    endpoint.production_variants = endpoint._process_production_variants(
                        config.production_variants)
                    endpoint.failure_reason = None
                except Exception as err:  # noqa: BLE001 - the old version keeps serving, as after a rollback
                    log.exception("update of %s rolled back", endpoint_name)
                    endpoint.failure_reason = f"Rolled back: the new version failed its health check: {err}"[:1024]
                endpoint.endpoint_status = "InService"
                endpoint.last_modified_time = datetime.now(UTC)

            run_async(f"update-{endpoint_name}", swap)
            return endpoint

        def delete_endpoint(backend: Any, endpoint_name: str) -> None:
            original_delete_endpoint(backend, endpoint_name)
            hosting.host.stop(endpoint_name)

        def update_endpoint_response(handler: Any) -> Any:
            endpoint = handler.sagemaker_backend.update_endpoint(
                handler._get_param("EndpointName"), handler._get_param("EndpointConfigName"))
            return ActionResult({"EndpointArn": endpoint.arn})

        patches: list[tuple[Any, str, Any]] = [
            (SageMakerModelBackend, "create_endpoint", create_endpoint),
            (SageMakerModelBackend, "delete_endpoint", delete_endpoint),
            (SageMakerModelBackend, "update_endpoint", update_endpoint),
            (SageMakerModelBackend, "create_model_package", create_model_package),
            (SageMakerModelBackend, "update_model_package", update_model_package),
            (SageMakerResponse, "update_endpoint", update_endpoint_response),
        ]
        saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patches]
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)

        def undo() -> None:
            for owner, name, value in saved:
                if value is None:
                    delattr(owner, name)
                else:
                    setattr(owner, name, value)

        return undo
