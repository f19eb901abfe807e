"""Step Functions' optimised SageMaker integration for moto's ASL interpreter, which has none.

``arn:aws:states:::sagemaker:createTrainingJob.sync`` behaves as AWS documents it
(https://docs.aws.amazon.com/step-functions/latest/dg/connect-sagemaker.html,
https://docs.aws.amazon.com/step-functions/latest/dg/connect-to-resource.html#connect-sync):

* the state's Parameters are the CreateTrainingJob request (a key that is not one of its fields fails the state);
* Step Functions makes sure its managed rule ``StepFunctionsGetEventsForSageMakerTrainingJobsRule`` exists
  (events:DescribeRule, PutRule, PutTargets: the permissions its IAM policy template lists), creates the job and
  waits for it to end;
* a Completed job's DescribeTrainingJob response is the task's result; a Failed or Stopped job fails the task with
  ``States.TaskFailed`` and that response, as JSON, for the cause;
* when the execution is stopped, or the state times out, it calls StopTrainingJob;
* a SageMaker error fails the task with ``SageMaker.<exception>``: the Java SDK's exception name, so the modelled
  ``ResourceLimitExceeded``/``ResourceInUse``/``ResourceNotFound`` become ``SageMaker.ResourceLimitExceededException``
  and so on, and every other code (validation, throttling, access) ``SageMaker.AmazonSageMakerException``.

Other SageMaker actions are passed to the service as a request-response call.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import date, datetime
from typing import Any, cast

from botocore.exceptions import ClientError

log = logging.getLogger("localmode.sfn_sagemaker")

MANAGED_RULE = "StepFunctionsGetEventsForSageMakerTrainingJobsRule"
_MODELLED_EXCEPTIONS = {
    "ResourceLimitExceeded": "SageMaker.ResourceLimitExceededException",
    "ResourceInUse": "SageMaker.ResourceInUseException",
    "ResourceNotFound": "SageMaker.ResourceNotFoundException",
}
_GENERIC_EXCEPTION = "SageMaker.AmazonSageMakerException"
_TERMINAL = ("Completed", "Failed", "Stopped")


def error_name(err: ClientError) -> str:
    """The error name Step Functions gives a SageMaker error from an optimised integration."""
    return _MODELLED_EXCEPTIONS.get(err.response.get("Error", {}).get("Code", ""), _GENERIC_EXCEPTION)


def error_cause(err: ClientError) -> str:
    """The cause, in the Java SDK's exception-message format Step Functions reports."""
    error = err.response.get("Error", {})
    meta = err.response.get("ResponseMetadata", {})
    return (f"{error.get('Message', '')} (Service: AmazonSageMaker; Status Code: {meta.get('HTTPStatusCode', 400)}; "
            f"Error Code: {error.get('Code', '')}; Request ID: {meta.get('RequestId', '')}; Proxy: null)")


def _json_value(value: Any) -> Any:
    """Timestamps as epoch milliseconds, as Step Functions renders SageMaker's in a task result."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items() if k != "ResponseMetadata"}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def _operation_members(action: str) -> set[str]:
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    operation = model.operation_model(action[0].upper() + action[1:])
    return set(operation.input_shape.members) if operation.input_shape else set()


def _check_fields(action: str, parameters: dict[str, Any]) -> None:
    """Refuse fields the SageMaker action does not take, as Step Functions does."""
    unknown = sorted(set(parameters) - _operation_members(action))
    if unknown:
        raise ValueError(f"The field(s) {unknown} are not supported by Step Functions for sagemaker:{action}")


def _evaluate_left_paths(env: Any, parameters: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the ``"X.$"`` fields moto's parser left as text.

    moto's ASL lexer reads ``"RoleArn.$"`` as the keyword of a Credentials block, so inside Parameters the
    field keeps its name and its path unevaluated; Step Functions evaluates it like any other ``.$`` field.
    """
    from moto.stepfunctions.parser.asl.utils.json_path import extract_json

    evaluated: dict[str, Any] = {}
    for key, value in parameters.items():
        if key.endswith(".$") and isinstance(value, str) and value.startswith("$"):
            if value.startswith("$$"):
                value = extract_json(value[1:], env.states.context_object.context_object_data)
            else:
                value = extract_json(value, env.states.get_input())
            key = key[:-2]
        evaluated[key] = value
    return evaluated


def _ensure_managed_rule(events: Any, region: str, account: str) -> None:
    """The rule Step Functions manages for ``.sync`` training jobs (created on first use, as AWS does)."""
    try:
        events.describe_rule(Name=MANAGED_RULE)
        return
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
            raise
    events.put_rule(Name=MANAGED_RULE, State="ENABLED", Description="Managed by Step Functions (local)",
                    EventPattern=json.dumps({"source": ["aws.sagemaker"],
                                             "detail-type": ["SageMaker Training Job State Change"]}))
    # AWS's target is internal to Step Functions; local mode names the service's own ARN space.
    events.put_targets(Rule=MANAGED_RULE, Targets=[{
        "Id": "StepFunctions", "Arn": f"arn:aws:states:{region}:{account}:stateMachine:managed-rule-target"}])


class JobWaiter:
    """The ``.sync`` poll for one training job; ``stop()`` is what Step Functions does on abort or timeout."""

    def __init__(self, service: Any, env: Any, client: Any, name: str):
        self.service, self.env, self.client, self.name = service, env, client, name

    def __call__(self) -> dict[str, Any] | None:
        from moto.stepfunctions.parser.api import HistoryEventType, TaskFailedEventDetails
        from moto.stepfunctions.parser.asl.component.common.error_name.failure_event import (
            FailureEvent,
            FailureEventException,
        )
        from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name import StatesErrorName
        from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name_type import (
            StatesErrorNameType,
        )
        from moto.stepfunctions.parser.asl.eval.event.event_detail import EventDetails

        job = _json_value(self.client.describe_training_job(TrainingJobName=self.name))
        status = job["TrainingJobStatus"]
        if status not in _TERMINAL:
            return None
        if status == "Completed":
            result: dict[str, Any] = job
            return result
        raise FailureEventException(FailureEvent(
            env=self.env,
            error_name=StatesErrorName(typ=StatesErrorNameType.StatesTaskFailed),
            event_type=HistoryEventType.TaskFailed,
            # moto declares every key of EventDetails required; an event has one.
            event_details=EventDetails(taskFailedEventDetails=TaskFailedEventDetails(  # type: ignore[typeddict-item]
                resource=self.service._get_sfn_resource(),
                resourceType=self.service._get_sfn_resource_type(),
                error=StatesErrorNameType.StatesTaskFailed.to_name(),
                cause=json.dumps(job),
            )),
        ))

    def stop(self) -> None:
        try:
            status = self.client.describe_training_job(TrainingJobName=self.name)["TrainingJobStatus"]
            if status == "InProgress":
                self.client.stop_training_job(TrainingJobName=self.name)
                log.info("stopped training job %s: its state was aborted or timed out", self.name)
        except ClientError:
            log.exception("could not stop training job %s", self.name)


def _service_class() -> type:
    """Build the integration class (moto's parser is imported only when local mode installs it)."""
    from moto.stepfunctions.parser.api import HistoryEventType, TaskFailedEventDetails
    from moto.stepfunctions.parser.asl.component.common.error_name.custom_error_name import CustomErrorName
    from moto.stepfunctions.parser.asl.component.common.error_name.failure_event import FailureEvent
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.resource import ResourceCondition
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_callback import (
        StateTaskServiceCallback,
    )
    from moto.stepfunctions.parser.asl.eval.event.event_detail import EventDetails
    from moto.stepfunctions.parser.asl.utils.boto_client import boto_client_for

    class StateTaskServiceSageMaker(StateTaskServiceCallback):
        """Optimised SageMaker integration: request-response for every action, ``.sync`` for training jobs."""

        def __init__(self) -> None:
            # waitForTaskToken is listed only because moto's callback plumbing expects its endpoint; a state
            # that asks for it is refused below, as AWS refuses it for SageMaker.
            super().__init__(supported_integration_patterns=cast(
                set[ResourceCondition], {ResourceCondition.WaitForTaskToken, ResourceCondition.Sync}))

        def _get_supported_parameters(self) -> set[str] | None:
            return _operation_members(self.resource.api_action)

        def _eval_parameters(self, env: Any) -> dict[str, Any]:
            parameters: dict[str, Any] = {}
            if self.parargs is not None:
                self.parargs.eval(env=env)
                parameters = env.stack.pop()
            parameters = _evaluate_left_paths(env, parameters)
            _check_fields(self.resource.api_action, parameters)
            return parameters

        def _client(self, region: str, state_credentials: Any, service: str = "sagemaker") -> Any:
            return boto_client_for(region=region, service=service, state_credentials=state_credentials)

        def _from_error(self, env: Any, ex: Exception) -> Any:
            if isinstance(ex, ClientError):
                name = error_name(ex)
                return FailureEvent(
                    env=env,
                    error_name=CustomErrorName(name),
                    event_type=HistoryEventType.TaskFailed,
                    # moto declares every key of EventDetails required; an event has one.
                    event_details=EventDetails(taskFailedEventDetails=TaskFailedEventDetails(  # type: ignore[typeddict-item]
                        error=name, cause=error_cause(ex),
                        resource=self._get_sfn_resource(), resourceType=self._get_sfn_resource_type(),
                    )),
                )
            return super()._from_error(env=env, ex=ex)

        def _eval_service_task(self, env: Any, resource_runtime_part: Any, normalised_parameters: dict[str, Any],
                               state_credentials: Any) -> None:
            if self.resource.condition == ResourceCondition.WaitForTaskToken:
                raise ValueError("sagemaker does not support the waitForTaskToken integration pattern")
            region = resource_runtime_part.region
            is_sync_training = (self.resource.condition == ResourceCondition.Sync
                                and self.resource.api_action == "createTrainingJob")
            if is_sync_training:
                _ensure_managed_rule(self._client(region, state_credentials, "events"), region,
                                     resource_runtime_part.account)
            client = self._client(region, state_credentials)
            response = getattr(client, self._get_boto_service_action())(**normalised_parameters)
            env.stack.append(_json_value(response))

        def _build_sync_resolver(self, env: Any, resource_runtime_part: Any, normalised_parameters: dict[str, Any],
                                 state_credentials: Any) -> Callable[[], Any] | None:
            if self.resource.api_action != "createTrainingJob":
                raise ValueError(f"sagemaker:{self.resource.api_action} has no .sync pattern in local mode")
            env.stack.pop()  # CreateTrainingJob's own response: the result is the finished job instead
            client = self._client(resource_runtime_part.region, state_credentials)
            return JobWaiter(self, env, client, normalised_parameters["TrainingJobName"])

        def _eval_sync(self, env: Any, sync_resolver: Callable[[], Any] | None, timeout_seconds: int | None,
                       callback_endpoint: Any, heartbeat_endpoint: Any) -> Any:
            outcome = super()._eval_sync(env=env, sync_resolver=sync_resolver, timeout_seconds=timeout_seconds,
                                         callback_endpoint=callback_endpoint, heartbeat_endpoint=heartbeat_endpoint)
            # Without the finished job (a failed one raised above), the state stopped waiting: the execution was
            # stopped, the state timed out (either timer), or the execution failed elsewhere. Step Functions then
            # stops the job.
            if not isinstance(outcome, dict) and isinstance(sync_resolver, JobWaiter):
                sync_resolver.stop()
            return outcome

    return StateTaskServiceSageMaker


def install() -> Callable[[], None]:
    """Register the integration with moto's ASL interpreter; returns the function that undoes it."""
    from moto.stepfunctions.parser.asl.component.state.exec.state_task import state_task_factory
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import state_task_service_factory

    service_class = _service_class()
    original = state_task_service_factory.state_task_service_for

    def state_task_service_for(service_name: str) -> Any:
        if service_name == "sagemaker":
            return service_class()
        return original(service_name)

    state_task_service_factory.state_task_service_for = state_task_service_for
    state_task_factory.state_task_service_for = state_task_service_for  # imported by name there

    def undo() -> None:
        state_task_service_factory.state_task_service_for = original
        state_task_factory.state_task_service_for = original

    return undo
