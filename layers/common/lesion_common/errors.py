"""Exceptions the state machines catch by name.

Step Functions sees a Lambda exception's class name as the error, so these names are part of the ASL contract.
"""


class PipelineError(Exception):
    """Base of the errors a state machine routes on."""


class InvalidRequestError(PipelineError):
    """The execution input or a handler's payload does not match its schema."""


class DatasetError(PipelineError):
    """The manifest cannot yield a usable train/validation/test split."""


class TrainingJobFailedError(PipelineError):
    """SageMaker reported the training job as Failed."""


class TrainingJobStoppedError(PipelineError):
    """The training job was stopped before it completed."""


class MetricsMissingError(PipelineError):
    """The training job's output lacks a readable metrics.json."""


class RegistrationError(PipelineError):
    """The model package could not be registered."""


class EndpointUpdateError(PipelineError):
    """SageMaker could not create or update the endpoint."""


class EndpointRolledBackError(PipelineError):
    """The endpoint is in service but on the previous configuration: SageMaker rolled the update back."""


class SmokeTestFailedError(PipelineError):
    """The endpoint answered the known image wrongly, or too slowly."""


# ------------------------------------------------------------------ deployment: retryable AWS conditions
# The handlers turn what AWS answers into these names so the deployment state machine can Retry them by name;
# boto3's own retries have already been spent when one of them reaches Step Functions.


class SageMakerThrottledError(PipelineError):
    """SageMaker answered ``ThrottlingException`` (or another throttling code) after boto3's own retries."""


class EndpointConfigNotVisibleError(PipelineError):
    """CreateEndpoint/UpdateEndpoint did not find an endpoint configuration that was just created.

    SageMaker reads the configuration with an eventually consistent read and answers ``ValidationException``
    ``Could not find endpoint configuration ...`` for a short while; AWS recommends retrying (CreateEndpoint API
    reference).
    """


class EndpointBusyError(PipelineError):
    """The endpoint is Creating/Updating (another deployment or a system update): it cannot be updated now."""


class AutoScalingThrottledError(PipelineError):
    """Application Auto Scaling answered a throttling code after boto3's own retries."""


class AutoScalingConflictError(PipelineError):
    """Application Auto Scaling answered ``ConcurrentUpdateException``: the target has a pending update."""


class DeploymentPolicyError(PipelineError):
    """The configured deployment policy cannot be expressed within SageMaker's limits (not retryable)."""
