"""Local mode: the stack's template, state machines and handlers on one machine, AWS emulated in-process.

``LocalStack``-free by design: moto serves the AWS APIs (its Step Functions interpreter runs the real ASL), the
handlers run in this process as Lambda would call them, SageMaker training jobs run the training image's entry
point in a subprocess under the container contract, and EventBridge rules are taken from ``template.yaml``.
"""

from localmode.cloud import LocalCloud

__all__ = ["LocalCloud"]
