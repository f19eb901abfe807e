"""SageMaker hosting in local mode: model package state-change events, and endpoints served by the real
inference container's server on localhost.

moto records endpoints but serves nothing and has no UpdateEndpoint; here CreateEndpoint starts the server for
the configuration's model, UpdateEndpoint starts the new version beside the old one and switches only when it
answers its health check (otherwise the old version keeps serving and the endpoint reports the rollback, as a
blue/green update that SageMaker rolls back does), and InvokeEndpoint reaches the server over HTTP.

Where the handlers depend on it, the hosting calls answer as SageMaker does, not as moto does (docs/local-mode.md
has the table with the sources): ``Could not find endpoint "<ARN>".`` / ``Could not find endpoint configuration
"<ARN>".`` for what does not exist, ``Cannot create already existing ... "<ARN>".`` for a name in use (moto
overwrites), ``Cannot update in-progress endpoint "<ARN>".`` while an endpoint changes, a ``KmsKeyId`` refused for
an instance type with local NVMe storage, and UpdateEndpoint's blue/green rules (the ranges of botocore's model, a
canary at most 50 % and linear steps 10 to 50 % of the variant's instances, a timeout above the policy's total
wait). ``config_visible_after_s`` emulates the eventually consistent read behind CreateEndpoint/UpdateEndpoint: for
that long after CreateEndpointConfig, they do not find the new configuration.
"""

from __future__ import annotations

import io
import logging
import math
import tarfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import boto3

from localmode import iam

log = logging.getLogger("localmode.hosting")

REPO_ROOT = Path(__file__).resolve().parent.parent

# botocore's sagemaker model (BlueGreenUpdatePolicy / TrafficRoutingConfig): the request member's path as AWS's
# validation message spells it, and its allowed range. botocore checks only the minimum on the client side.
_BLUE_GREEN_RANGES = {
    "MaximumExecutionTimeoutInSeconds": ("deploymentConfig.blueGreenUpdatePolicy.maximumExecutionTimeoutInSeconds",
                                         600, 28800),
    "TerminationWaitInSeconds": ("deploymentConfig.blueGreenUpdatePolicy.terminationWaitInSeconds", 0, 3600),
    "WaitIntervalInSeconds": ("deploymentConfig.blueGreenUpdatePolicy.trafficRoutingConfiguration."
                              "waitIntervalInSeconds", 0, 3600),
}


def _validation_error(message: str) -> Exception:
    from moto.sagemaker.exceptions import ValidationError

    return ValidationError(message=message)


def _check_range(value: Any, path: str, low: int, high: int) -> None:
    """AWS's constraint message for a number outside a member's range."""
    if value is None:
        return
    if int(value) > high:
        raise _validation_error(f"1 validation error detected: Value '{value}' at '{path}' failed to satisfy "
                                f"constraint: Member must have value less than or equal to {high}")
    if int(value) < low:
        raise _validation_error(f"1 validation error detected: Value '{value}' at '{path}' failed to satisfy "
                                f"constraint: Member must have value greater than or equal to {low}")


def has_local_nvme(instance_type: str) -> bool:
    """The stack's table of instance types with NVMe instance storage (lesion_common.instances)."""
    from lesion_common.instances import has_local_nvme as lookup

    return bool(lookup(instance_type))


_HOSTING_TYPES: list[str] = []


def hosting_instance_types() -> list[str]:
    """The instance types CreateEndpointConfig accepts: botocore's ``ProductionVariantInstanceType`` enum (moto's
    own list predates g5, g6, p4d, ...)."""
    if not _HOSTING_TYPES:
        import botocore.session

        shape = botocore.session.get_session().get_service_model("sagemaker").shape_for(
            "ProductionVariantInstanceType")
        _HOSTING_TYPES.extend(shape.enum)
    return _HOSTING_TYPES


def check_endpoint_config(production_variants: list[dict[str, Any]], kms_key_id: str | None) -> None:
    """CreateEndpointConfig's rules for the instance type (botocore's enum, AWS's constraint message) and for
    ``KmsKeyId``: refused when a variant's instance has local NVMe storage.

    botocore's documentation of ``CreateEndpointConfigInput.KmsKeyId``: "If you specify a value for KmsKeyId when
    using any nitro-based instances with local storage, the call to CreateEndpointConfig fails." The code is
    SageMaker's ValidationException; the message's wording is not documented (ours says what the rule is).
    """
    for index, variant in enumerate(production_variants, start=1):
        instance_type = variant.get("InstanceType")
        if instance_type is not None and instance_type not in hosting_instance_types():
            raise _validation_error(
                f"1 validation error detected: Value '{instance_type}' at 'productionVariants.{index}.member."
                "instanceType' failed to satisfy constraint: Member must satisfy enum value set: "
                f"[{', '.join(hosting_instance_types())}]")
    if not kms_key_id:
        return
    for variant in production_variants:
        instance_type = variant.get("InstanceType")
        if instance_type and has_local_nvme(instance_type):
            raise _validation_error(
                f"KmsKeyId is not supported for instance type {instance_type} (production variant "
                f"{variant.get('VariantName')}): its local instance storage is encrypted by a hardware module on "
                "the instance. Remove KmsKeyId from the request.")


def _step_instances(size: dict[str, Any], instances: int) -> int:
    if size.get("Type") == "INSTANCE_COUNT":
        return int(size["Value"])
    return max(1, math.ceil(instances * int(size["Value"]) / 100))


def check_deployment_config(config: dict[str, Any] | None, instances: int) -> None:
    """UpdateEndpoint's blue/green rules for a variant of ``instances`` instances.

    The ranges are botocore's model; the size rules and the timeout rule are the documentation of
    ``TrafficRoutingConfig`` (CanarySize at most 50 %, LinearStepSize 10-50 % of the variant's total instance count)
    and of ``MaximumExecutionTimeoutInSeconds`` (larger than the total waiting time of WaitIntervalInSeconds and
    TerminationWaitInSeconds); the wording of those three messages is not documented.
    """
    policy = (config or {}).get("BlueGreenUpdatePolicy")
    if not policy:
        return
    routing = policy.get("TrafficRoutingConfiguration") or {}
    for member, (path, low, high) in _BLUE_GREEN_RANGES.items():
        _check_range((routing if member == "WaitIntervalInSeconds" else policy).get(member), path, low, high)
    kind = routing.get("Type")
    wait = int(routing.get("WaitIntervalInSeconds") or 0)
    steps = 1
    if kind == "CANARY":
        size = routing.get("CanarySize")
        if not size:
            raise _validation_error("CanarySize is required for the CANARY traffic routing type.")
        if 2 * _step_instances(size, instances) > instances:
            raise _validation_error(
                f"CanarySize ({size['Value']} {size['Type']}) must be less than or equal to 50% of the variant's "
                f"total instance count ({instances}).")
    elif kind == "LINEAR":
        size = routing.get("LinearStepSize")
        if not size:
            raise _validation_error("LinearStepSize is required for the LINEAR traffic routing type.")
        step = _step_instances(size, instances)
        if 2 * step > instances or 10 * step < instances:
            raise _validation_error(
                f"LinearStepSize ({size['Value']} {size['Type']}) must be 10-50% of the variant's total instance "
                f"count ({instances}).")
        steps = math.ceil(instances / step)
    total = steps * wait + int(policy.get("TerminationWaitInSeconds") or 0)
    timeout = policy.get("MaximumExecutionTimeoutInSeconds")
    if timeout is not None and int(timeout) <= total:
        raise _validation_error(
            f"MaximumExecutionTimeoutInSeconds ({timeout}) must be larger than the total waiting time specified in "
            f"TerminationWaitInSeconds and WaitIntervalInSeconds ({total}).")


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


def _endpoint_arn(backend: Any, name: str) -> str:
    from moto.sagemaker.models import FakeEndpoint

    return str(FakeEndpoint.arn_formatter(name, backend.account_id, backend.region_name))


def _config_arn(backend: Any, name: str) -> str:
    from moto.sagemaker.models import FakeEndpointConfig

    return str(FakeEndpointConfig.arn_formatter(name, backend.account_id, backend.region_name))


def _missing_endpoint(backend: Any, name: str) -> Exception:
    return _validation_error(f'Could not find endpoint "{_endpoint_arn(backend, name)}".')


def _missing_config(backend: Any, name: str) -> Exception:
    return _validation_error(f'Could not find endpoint configuration "{_config_arn(backend, name)}".')


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
    config_visible_after_s : float
        For this long after CreateEndpointConfig, CreateEndpoint and UpdateEndpoint answer as SageMaker's
        eventually consistent read can: ``Could not find endpoint configuration``. 0 (the default) turns it off.
    """

    def __init__(self, host: EndpointHost, work_dir: Path,
                 emit: Callable[[str, dict[str, Any], list[str]], None], config_visible_after_s: float = 0.0):
        self.host = host
        self.work_dir = work_dir
        self.emit = emit
        self.config_visible_after_s = config_visible_after_s
        self._config_created: dict[str, float] = {}
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
            with iam.as_role_arn(model.execution_role_arn):  # the endpoint reads it with the model's role
                body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
            target.mkdir(parents=True)
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
                tar.extractall(target, filter="data")
        return target, {k: str(v) for k, v in (container.get("Environment") or {}).items()}

    # ------------------------------------------------------------------ hooks
    def install(self) -> Callable[[], None]:
        """Patch moto; return the function that restores it."""
        patches = [*self._config_patches(), *self._endpoint_patches(), *self._package_patches()]
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

    def _visible_config(self, backend: Any, name: str) -> Any:
        """The configuration as CreateEndpoint/UpdateEndpoint's eventually consistent read sees it."""
        created = self._config_created.get(name)
        recent = created is not None and time.monotonic() - created < self.config_visible_after_s
        if name not in backend.endpoint_configs or recent:
            raise _missing_config(backend, name)
        return backend.endpoint_configs[name]

    def _run_async(self, name: str, work: Callable[[], None]) -> None:
        thread = threading.Thread(target=work, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _config_patches(self) -> list[tuple[Any, str, Any]]:
        """CreateModel, CreateEndpointConfig and DescribeEndpointConfig as SageMaker answers them."""
        from moto.sagemaker.models import FakeEndpointConfig, SageMakerModelBackend
        from moto.sagemaker.utils import arn_formatter

        hosting = self
        original_create_model = SageMakerModelBackend.create_model
        original_create_config = SageMakerModelBackend.create_endpoint_config
        original_describe_config = SageMakerModelBackend.describe_endpoint_config

        def create_model(backend: Any, model_name: str, *args: Any, **kwargs: Any) -> Any:
            if model_name in backend._models:
                arn = arn_formatter("model", model_name, backend.account_id, backend.region_name)
                raise _validation_error(f'Cannot create already existing model "{arn}".')
            return original_create_model(backend, model_name, *args, **kwargs)

        def create_endpoint_config(backend: Any, endpoint_config_name: str, production_variants: list[Any],
                                   *args: Any, **kwargs: Any) -> Any:
            if endpoint_config_name in backend.endpoint_configs:
                raise _validation_error("Cannot create already existing endpoint configuration "
                                        f'"{_config_arn(backend, endpoint_config_name)}".')
            for variant in production_variants:
                if variant.get("ModelName") not in backend._models:
                    arn = arn_formatter("model", variant.get("ModelName"), backend.account_id, backend.region_name)
                    raise _validation_error(f'Could not find model "{arn}".')
            check_endpoint_config(production_variants, kwargs.get("kms_key_id"))
            config = original_create_config(backend, endpoint_config_name, production_variants, *args, **kwargs)
            hosting._config_created[endpoint_config_name] = time.monotonic()
            return config

        def describe_endpoint_config(backend: Any, endpoint_config_name: str) -> Any:
            if endpoint_config_name not in backend.endpoint_configs:
                raise _missing_config(backend, endpoint_config_name)
            return original_describe_config(backend, endpoint_config_name)

        return [
            (SageMakerModelBackend, "create_model", create_model),
            (SageMakerModelBackend, "create_endpoint_config", create_endpoint_config),
            # replaced by check_endpoint_config's botocore enum
            (FakeEndpointConfig, "validate_instance_type", lambda config, instance_type: None),
            (SageMakerModelBackend, "describe_endpoint_config", describe_endpoint_config),
        ]

    def _endpoint_patches(self) -> list[tuple[Any, str, Any]]:
        """Create/Describe/Update/DeleteEndpoint: the endpoint's container runs (EndpointHost), in the background."""
        from moto.core.responses import ActionResult
        from moto.sagemaker.models import SageMakerModelBackend
        from moto.sagemaker.responses import SageMakerResponse

        hosting = self
        original_create_endpoint = SageMakerModelBackend.create_endpoint
        original_describe_endpoint = SageMakerModelBackend.describe_endpoint
        original_delete_endpoint = SageMakerModelBackend.delete_endpoint

        def describe_endpoint(backend: Any, endpoint_name: str) -> Any:
            if endpoint_name not in backend.endpoints:
                raise _missing_endpoint(backend, endpoint_name)
            return original_describe_endpoint(backend, endpoint_name)

        def create_endpoint(backend: Any, endpoint_name: str, endpoint_config_name: str, tags: Any) -> Any:
            if endpoint_name in backend.endpoints:
                raise _validation_error(
                    f'Cannot create already existing endpoint "{_endpoint_arn(backend, endpoint_name)}".')
            hosting._visible_config(backend, endpoint_config_name)
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
                    reason = f"The primary container failed its health check: {err}"[:1024]
                    endpoint.failure_reason = reason  # type: ignore[assignment]  # moto annotates it None
                endpoint.last_modified_time = datetime.now(UTC)

            hosting._run_async(f"endpoint-{endpoint_name}", start)
            return endpoint

        def update_endpoint(backend: Any, endpoint_name: str, endpoint_config_name: str,
                            deployment_config: dict[str, Any] | None = None) -> Any:
            if endpoint_name not in backend.endpoints:
                raise _missing_endpoint(backend, endpoint_name)
            new_config = hosting._visible_config(backend, endpoint_config_name)
            endpoint = backend.endpoints[endpoint_name]
            if endpoint.endpoint_status in ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting"):
                raise _validation_error(
                    f'Cannot update in-progress endpoint "{_endpoint_arn(backend, endpoint_name)}".')
            variants = new_config.production_variants or [{}]
            check_deployment_config(deployment_config, int(variants[0].get("InitialInstanceCount") or 1))
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

            hosting._run_async(f"update-{endpoint_name}", swap)
            return endpoint

        def delete_endpoint(backend: Any, endpoint_name: str) -> None:
            if endpoint_name not in backend.endpoints:
                raise _missing_endpoint(backend, endpoint_name)
            original_delete_endpoint(backend, endpoint_name)
            hosting.host.stop(endpoint_name)

        def update_endpoint_response(handler: Any) -> Any:
            endpoint = handler.sagemaker_backend.update_endpoint(
                handler._get_param("EndpointName"), handler._get_param("EndpointConfigName"),
                handler._get_param("DeploymentConfig"))
            return ActionResult({"EndpointArn": endpoint.arn})

        return [
            (SageMakerModelBackend, "describe_endpoint", describe_endpoint),
            (SageMakerModelBackend, "create_endpoint", create_endpoint),
            (SageMakerModelBackend, "delete_endpoint", delete_endpoint),
            (SageMakerModelBackend, "update_endpoint", update_endpoint),
            (SageMakerResponse, "update_endpoint", update_endpoint_response),
        ]

    def _package_patches(self) -> list[tuple[Any, str, Any]]:
        """Create/UpdateModelPackage put the package's state change on the bus, as SageMaker does."""
        from moto.sagemaker.models import SageMakerModelBackend

        hosting = self
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
            # UpdateModelPackage changes only what the request names (moto clears an omitted approval status and
            # replaces the metadata): a later edit of an approved package stays approved, and its event says so.
            name = kwargs.get("model_package_arn", "")
            package = backend.model_packages.get(backend.model_package_name_mapping.get(name, name))
            if package is not None:
                if kwargs.get("model_approval_status") is None:
                    kwargs["model_approval_status"] = package.model_approval_status
                kwargs["customer_metadata_properties"] = {**(package.customer_metadata_properties or {}),
                                                          **(kwargs.get("customer_metadata_properties") or {})}
            arn = original_update_package(backend, *args, **kwargs)
            emit_package(backend, arn)
            return arn

        return [
            (SageMakerModelBackend, "create_model_package", create_model_package),
            (SageMakerModelBackend, "update_model_package", update_model_package),
        ]
