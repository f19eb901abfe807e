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
