"""Stand the template up in-process: moto for the AWS APIs, the real handlers, ASL, rules and training jobs."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import botocore.session

from localmode import eventbridge, iam, lambdas, sagemaker
from localmode.template import Resolver, load_template, samconfig_parameters

log = logging.getLogger("localmode")

REPO_ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "123456789012"
REGION = "us-east-1"
_FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
}
# Scenery a deployment has that local mode does not emulate: role assumption, layers, logging setup.
_SKIPPED_TYPES = {
    "AWS::KMS::Alias",
    "AWS::S3::BucketPolicy",
    "AWS::SNS::Subscription",
    "AWS::Serverless::LayerVersion",
    "AWS::SNS::TopicPolicy",
    "AWS::Lambda::Permission",
    "AWS::SQS::QueuePolicy",
    "AWS::Budgets::Budget",
    "AWS::CloudWatch::Dashboard",
}


def name_unnamed_executions() -> Callable[[], None]:
    """StartExecution without ``name``: Step Functions names the execution with a UUID; moto 5.2.5 names it "None"
    (and the definition's ``$$.Execution.Name`` is then null). Returns the undo."""
    from moto.core.responses import ActionResult
    from moto.stepfunctions.responses import StepFunctionResponse

    original = StepFunctionResponse.start_execution

    def start_execution(handler: Any) -> Any:
        execution = handler.stepfunction_backend.start_execution(
            handler._get_param("stateMachineArn"), handler._get_param("name") or str(uuid.uuid4()),
            handler._get_param("input", if_none="{}"))
        return ActionResult({"executionArn": execution.execution_arn, "startDate": execution.start_date})

    StepFunctionResponse.start_execution = start_execution  # type: ignore[method-assign,assignment]

    def undo() -> None:
        StepFunctionResponse.start_execution = original  # type: ignore[method-assign]

    return undo


class LocalCloud:
    """The stack, deployed into an in-process emulation of AWS.

    Use as a context manager. ``parameters`` override the samconfig ``local`` environment, which overrides the
    template's defaults.

    Parameters
    ----------
    work_dir : Path
        Where training job directories and logs go (``.local/`` by default).
    parameters : dict, optional
        Template parameter values for this cloud.
    stack_name : str
        Used for physical names, as a deployment's stack name would be.
    iam_mode : str, optional
        ``enforce`` (default, or ``$LOCALMODE_IAM``): every call a handler, state machine, rule or training job
        makes is checked against its role's policies (localmode/iam.py); ``report`` only logs denials; ``off``.
    iam_trace_dir : Path, optional
        Where the trace of checked calls goes (default ``$LOCALMODE_IAM_TRACE_DIR`` or ``<work_dir>/iam-trace``).
    """

    def __init__(self, work_dir: Path | None = None, parameters: dict[str, str] | None = None,
                 stack_name: str = "skinlesion-local", iam_mode: str | None = None,
                 iam_trace_dir: Path | None = None):
        self.work_dir = (work_dir or REPO_ROOT / ".local").resolve()
        self.stack_name = stack_name
        self.iam_mode, self.iam_trace_dir = iam_mode, iam_trace_dir
        self.iam: iam.Enforcer | None = None  # set by start()
        self.template = load_template(REPO_ROOT / "template.yaml")
        values = samconfig_parameters(REPO_ROOT / "samconfig.toml", "local")
        values.update(parameters or {})
        self.parameter_values = values
        # CloudFormation evaluates Rules before it creates anything: a bad combination fails here, not mid-deploy.
        Resolver(self.template, values, self._pseudo()).check_rules()
        self.runners: list[sagemaker.TrainingJobRunner] = []
        # function name -> (MaximumRetryAttempts, on-failure destination ARN) of its asynchronous invocations
        self.async_configs: dict[str, tuple[int, str | None]] = {}
        self._undo: list[Any] = []
        self._mock: Any = None

    def _pseudo(self) -> dict[str, str]:
        return {"AWS::Region": REGION, "AWS::AccountId": ACCOUNT, "AWS::StackName": self.stack_name,
                "AWS::Partition": "aws", "AWS::URLSuffix": "amazonaws.com"}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalCloud:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Start the emulation and create every resource of the template."""
        from moto import mock_aws

        self._saved_env = dict(os.environ)
        os.environ.update(_FAKE_CREDENTIALS)
        self._mock = mock_aws(config={
            "stepfunctions": {"execute_state_machine": True},
            "lambda": {"use_docker": False},
        })
        self._mock.start()
        for stale in ("sagemaker", "capture", "hosting", "endpoints", "report"):
            shutil.rmtree(self.work_dir / stale, ignore_errors=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.runtime = lambdas.LambdaRuntime(
            base_env={
                **_FAKE_CREDENTIALS,
                "POWERTOOLS_TRACE_DISABLED": "true",
                "POWERTOOLS_METRICS_FUNCTION_NAME": "local",
                "AWS_XRAY_SDK_ENABLED": "false",
                "AWS_XRAY_CONTEXT_MISSING": "IGNORE_ERROR",
            },
            log_dir=self.work_dir / "logs",
        )
        self.bus = eventbridge.LocalEventBus(self._deliver)
        self._install_hooks()
        self.resolver = Resolver(self.template, self.parameter_values, self._pseudo())
        self._deploy()
        self.iam = iam.enable(self, self.iam_mode, self.iam_trace_dir)

    def stop(self) -> None:
        """Wait for running jobs, stop the bus and the emulation, and restore the environment."""
        for runner in self.runners:
            runner.thread.join(timeout=600)
        for thread in self.hosting.threads:
            thread.join(timeout=300)
        self.bus.close()
        for undo in reversed(self._undo):
            undo()
        self.runtime.close()
        if self._mock is not None:
            self._mock.stop()
        os.environ.clear()
        os.environ.update(self._saved_env)

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self) -> None:
        from moto.awslambda_simple.models import LambdaSimpleBackend
        from moto.events.models import EventsBackend
        from moto.s3 import notifications

        runtime = self.runtime
        bus = self.bus

        original_invoke = LambdaSimpleBackend.invoke

        def invoke(backend: Any, function_name: str, qualifier: Any, body: Any, headers: Any,
                   response_headers: Any) -> bytes:
            event = json.loads(body) if body else {}
            if headers.get("X-Amz-Invocation-Type") == "Event":
                threading.Thread(target=runtime.invoke, args=(function_name, event), daemon=True).start()
                return b""
            ok, payload = runtime.invoke(function_name, event)
            if not ok:
                response_headers["x-amz-function-error"] = "Unhandled"
            return json.dumps(payload).encode()

        LambdaSimpleBackend.invoke = invoke  # type: ignore[method-assign,assignment]
        self._undo.append(lambda: setattr(LambdaSimpleBackend, "invoke", original_invoke))

        # Every client is built under the lock an invocation holds while it swaps os.environ: botocore iterates the
        # environment (proxies, config) and a key removed mid-iteration raises KeyError in whichever thread reads.
        original_create_client = botocore.session.Session.create_client

        def create_client(session: Any, *args: Any, **kwargs: Any) -> Any:
            with lambdas.ENVIRON_LOCK:
                return original_create_client(session, *args, **kwargs)

        botocore.session.Session.create_client = create_client
        self._undo.append(lambda: setattr(botocore.session.Session, "create_client", original_create_client))

        original_s3_event = notifications._send_event_bridge_message

        def s3_to_bus(account_id: str, bucket: Any, event_name: str, key: Any) -> None:
            detail = {
                "version": "0",
                "bucket": {"name": bucket.name},
                "object": {"key": key.name, "size": key.size, "etag": key.etag.replace('"', ""),
                           "version-id": key.version_id, "sequencer": f"{time.time_ns():016X}"},
                "request-id": "LOCAL",
                "requester": account_id,
                "reason": "PutObject",
            }
            bus.put(eventbridge.envelope("aws.s3", notifications._detail_type(event_name), detail,
                                         account=account_id, region=REGION,
                                         resources=[f"arn:aws:s3:::{bucket.name}"]))

        notifications._send_event_bridge_message = s3_to_bus
        self._undo.append(lambda: setattr(notifications, "_send_event_bridge_message", original_s3_event))

        original_put_events = EventsBackend.put_events

        def put_events(backend: Any, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
            result = original_put_events(backend, events)
            for entry, outcome in zip(events, result, strict=True):
                if "EventId" not in outcome:
                    continue
                detail = json.loads(entry.get("Detail") or "{}")
                event = eventbridge.envelope(entry["Source"], entry["DetailType"], detail, account=ACCOUNT,
                                             region=REGION, resources=entry.get("Resources"))
                event["id"] = outcome["EventId"]
                bus.put(event)
            return result

        EventsBackend.put_events = put_events  # type: ignore[method-assign,assignment]
        self._undo.append(lambda: setattr(EventsBackend, "put_events", original_put_events))

        # moto 5.2.5's SendTaskFailure drops ``cause``: without it a failed job's FailureReason would not reach
        # the execution's error, as it does on AWS.
        from moto.core.responses import EmptyResult
        from moto.stepfunctions.responses import StepFunctionResponse

        original_failure = StepFunctionResponse.send_task_failure

        def send_task_failure(handler: Any) -> Any:
            handler.stepfunction_backend.send_task_failure(
                handler._get_param("taskToken"), error=handler._get_param("error"), cause=handler._get_param("cause"))
            return EmptyResult()

        StepFunctionResponse.send_task_failure = send_task_failure  # type: ignore[method-assign,assignment]
        self._undo.append(lambda: setattr(StepFunctionResponse, "send_task_failure", original_failure))

        def emit_training_event(detail: dict[str, Any]) -> None:
            bus.put(eventbridge.envelope("aws.sagemaker", "SageMaker Training Job State Change", detail,
                                         account=ACCOUNT, region=REGION,
                                         resources=[detail.get("TrainingJobArn", "")]))

        self._undo.append(sagemaker.install(self.work_dir / "sagemaker", REPO_ROOT, emit_training_event,
                                            self.runners))
        # moto's ASL interpreter has no SageMaker integration: createTrainingJob.sync as Step Functions runs it.
        from localmode import sfn_sagemaker

        self._undo.append(sfn_sagemaker.install())

        from localmode.endpoints import LocalEndpoints
        from localmode.hosting import LocalHosting

        self.capture_dir = self.work_dir / "capture"
        self.endpoints = LocalEndpoints(self.work_dir, workers=1, env={"CAPTURE_DIR": str(self.capture_dir)})
        self._undo.append(self.endpoints.install())
        self._undo.append(self.endpoints.stop_all)

        def emit_sagemaker_event(detail_type: str, detail: dict[str, Any], resources: list[str]) -> None:
            bus.put(eventbridge.envelope("aws.sagemaker", detail_type, detail, account=ACCOUNT, region=REGION,
                                         resources=resources))

        self.hosting = LocalHosting(self.endpoints, self.work_dir / "hosting", emit_sagemaker_event)
        self._undo.append(self.hosting.install())

        # Alarm state changes (the evaluator's, or ``set-alarm-state``'s) reach the bus and the action topics.
        from localmode import alarms

        self._undo.append(alarms.install(bus.put, ACCOUNT, REGION))
        self.alarms = alarms.AlarmEvaluator(ACCOUNT, REGION)
        self._undo.append(self.alarms.stop)
        self._undo.append(name_unnamed_executions())

    def _deliver(self, rule: eventbridge.Rule, payload: str) -> None:
        if rule.target_kind == "lambda":
            # EventBridge invokes Lambda asynchronously: Lambda retries a failed event, then hands it to the
            # function's on-failure destination.
            retries, destination = self.async_configs.get(rule.target, (2, None))
            event = json.loads(payload)
            attempts = retries + 1
            for _ in range(attempts):
                ok, result = self.runtime.invoke(rule.target, event)
                if ok:
                    return
            if destination:
                self._send_to_destination(rule.target, destination, event, result, attempts)
            raise RuntimeError(f"{rule.target} failed: {result['errorType']}: {result['errorMessage']}")
        else:
            # EventBridge names the executions it starts; a readable prefix helps when following them here.
            name = f"{rule.name.removeprefix('RetrainingStateMachine')[:30]}-{time.strftime('%Y%m%dT%H%M%S')}-" \
                   f"{uuid.uuid4().hex[:8]}"
            with iam.as_rule(rule.name):  # EventBridge starts it with the role SAM gives the rule
                boto3.client("stepfunctions", region_name=REGION).start_execution(
                    stateMachineArn=rule.target, input=payload, name=name
                )

    def _send_to_destination(self, function: str, destination: str, event: Any, error: Any, attempts: int) -> None:
        """Lambda's on-failure record (an async invocation whose retries are exhausted) to an SQS destination."""
        spec = self.runtime.find(function)
        record = {
            "version": "1.0",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "requestContext": {"requestId": str(uuid.uuid4()), "functionArn": f"{spec.arn}:$LATEST",
                               "condition": "RetriesExhausted", "approximateInvokeCount": attempts},
            "requestPayload": event,
            "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
            "responsePayload": error,
        }
        sqs = boto3.client("sqs", region_name=REGION)
        queue_url = sqs.get_queue_url(QueueName=destination.rsplit(":", 1)[1])["QueueUrl"]
        with iam.as_function(spec.logical_id):  # Lambda sends it with the function's execution role
            sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(record))

    # ------------------------------------------------------------------ deployment
    def _physical(self, logical_id: str, kind: str) -> tuple[Any, dict[str, Any]]:
        """Names a deployment would give, derived from the stack name."""
        base = f"{self.stack_name}-{logical_id}"
        arn = f"arn:aws:{{}}:{REGION}:{ACCOUNT}:{{}}"
        if kind == "AWS::S3::Bucket":
            name = base.lower()
            return name, {"Arn": f"arn:aws:s3:::{name}", "DomainName": f"{name}.s3.amazonaws.com"}
        if kind == "AWS::DynamoDB::Table":
            return base, {"Arn": arn.format("dynamodb", f"table/{base}")}
        if kind == "AWS::SNS::Topic":
            topic_arn = arn.format("sns", base)
            return topic_arn, {"TopicArn": topic_arn, "TopicName": base}
        if kind == "AWS::Serverless::Function":
            return base, {"Arn": arn.format("lambda", f"function:{base}")}
        if kind == "AWS::Serverless::StateMachine":
            sm_arn = arn.format("states", f"stateMachine:{base}")
            return sm_arn, {"Arn": sm_arn, "Name": base}
        if kind == "AWS::IAM::Role":
            return base, {"Arn": f"arn:aws:iam::{ACCOUNT}:role/{base}", "RoleId": base}
        if kind == "AWS::Logs::LogGroup":
            return base, {"Arn": arn.format("logs", f"log-group:{base}:*")}
        if kind == "AWS::SQS::Queue":
            return f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{base}", {"Arn": arn.format("sqs", base),
                                                                             "QueueName": base}
        if kind == "AWS::CloudWatch::Alarm":
            return base, {"Arn": arn.format("cloudwatch", f"alarm:{base}")}
        if kind == "AWS::Serverless::LayerVersion":
            return arn.format("lambda", f"layer:{base}:1"), {}
        return base, {"Arn": arn.format("local", base)}

    def _deploy(self) -> None:
        resources: dict[str, Any] = self.template["Resources"]
        r = self.resolver
        kms = boto3.client("kms", region_name=REGION)
        for logical_id, res in resources.items():
            if res["Type"] == "AWS::KMS::Key":
                key = kms.create_key(Description=f"{logical_id} (local)")["KeyMetadata"]
                r.refs[logical_id] = key["KeyId"]
                r.attrs[logical_id] = {"Arn": key["Arn"], "KeyId": key["KeyId"]}
            elif res["Type"] == "AWS::SageMaker::ModelPackageGroup":
                name = r.resolve(res["Properties"]["ModelPackageGroupName"])
                group_arn = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:model-package-group/{name}"
                r.refs[logical_id] = group_arn
                r.attrs[logical_id] = {"ModelPackageGroupName": name, "ModelPackageGroupArn": group_arn}
            elif res["Type"] == "AWS::CloudWatch::Alarm" and "AlarmName" in res.get("Properties", {}):
                name = r.resolve(res["Properties"]["AlarmName"])
                r.refs[logical_id] = name
                r.attrs[logical_id] = {"Arn": f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:{name}"}
            elif res["Type"] == "AWS::Logs::LogGroup" and "LogGroupName" in res.get("Properties", {}):
                name = r.resolve(res["Properties"]["LogGroupName"])
                r.refs[logical_id] = name
                r.attrs[logical_id] = {"Arn": f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{name}:*"}
            elif res["Type"] == "AWS::Serverless::StateMachine" and "Name" in res.get("Properties", {}):
                # The template's name, as CloudFormation gives it: policies name executions by it.
                name = r.resolve(res["Properties"]["Name"])
                sm_arn = f"arn:aws:states:{REGION}:{ACCOUNT}:stateMachine:{name}"
                r.refs[logical_id] = sm_arn
                r.attrs[logical_id] = {"Arn": sm_arn, "Name": name}
            else:
                ref, attrs = self._physical(logical_id, res["Type"])
                r.refs[logical_id] = ref
                r.attrs[logical_id] = attrs
        if "AWS::Serverless-2016-10-31" in str(self.template.get("Transform", "")):
            # SAM's implicit resources that templates may reference.
            for logical_id, res in resources.items():
                if res["Type"] == "AWS::Serverless::Function":
                    r.refs[f"{logical_id}Role"], r.attrs[f"{logical_id}Role"] = self._physical(
                        f"{logical_id}Role", "AWS::IAM::Role")
        creators = {
            "AWS::S3::Bucket": self._create_bucket,
            "AWS::DynamoDB::Table": self._create_table,
            "AWS::SNS::Topic": self._create_topic,
            "AWS::IAM::Role": self._create_role,
            "AWS::SageMaker::ModelPackageGroup": self._create_model_package_group,
            "AWS::Serverless::Function": self._create_function,
            "AWS::Serverless::StateMachine": self._create_state_machine,
            "AWS::CloudWatch::Alarm": self._create_alarm,
            "AWS::Logs::LogGroup": self._create_log_group,
            "AWS::SQS::Queue": self._create_queue,
            "AWS::KMS::Key": lambda *_: None,
        }
        order = sorted(resources, key=lambda lid: list(creators).index(resources[lid]["Type"])
                       if resources[lid]["Type"] in creators else -1)
        for logical_id in order:
            res = resources[logical_id]
            if "Condition" in res and not r.conditions[res["Condition"]]:
                continue
            kind = res["Type"]
            if kind in _SKIPPED_TYPES:
                continue
            if kind not in creators:
                raise NotImplementedError(f"local mode cannot create {kind} ({logical_id})")
            creators[kind](logical_id, res)
        self._create_notification_inbox()

    def _create_bucket(self, logical_id: str, res: dict[str, Any]) -> None:
        props = self.resolver.resolve(res.get("Properties", {}))
        s3 = boto3.client("s3", region_name=REGION)
        name = self.resolver.refs[logical_id]
        s3.create_bucket(Bucket=name)
        # CloudFormation tags what it creates with the aws:cloudformation:* keys (which PutBucketTagging refuses to
        # anyone else); the tools recognise a stack's data bucket by them.
        from moto.s3.models import s3_backends

        tags = {t["Key"]: t["Value"] for t in props.get("Tags", [])}
        tags.update({"aws:cloudformation:stack-name": self.stack_name, "aws:cloudformation:logical-id": logical_id,
                     "aws:cloudformation:stack-id": f"arn:aws:cloudformation:{REGION}:{ACCOUNT}:stack/"
                                                    f"{self.stack_name}/00000000-0000-0000-0000-000000000000"})
        s3_backends[ACCOUNT]["global"].put_bucket_tagging(name, tags)
        if "BucketEncryption" in props:
            s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {
                    "SSEAlgorithm": rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"],
                    "KMSMasterKeyID": rule["ServerSideEncryptionByDefault"].get("KMSMasterKeyID", ""),
                }} for rule in props["BucketEncryption"]["ServerSideEncryptionConfiguration"]]})
        if props.get("VersioningConfiguration", {}).get("Status") == "Enabled":
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        if props.get("NotificationConfiguration", {}).get("EventBridgeConfiguration", {}).get("EventBridgeEnabled"):
            s3.put_bucket_notification_configuration(
                Bucket=name, NotificationConfiguration={"EventBridgeConfiguration": {}})

    def _create_table(self, logical_id: str, res: dict[str, Any]) -> None:
        props = self.resolver.resolve(res["Properties"])
        kwargs: dict[str, Any] = {
            "TableName": self.resolver.refs[logical_id],
            "AttributeDefinitions": props["AttributeDefinitions"],
            "KeySchema": props["KeySchema"],
            "BillingMode": props.get("BillingMode", "PAY_PER_REQUEST"),
        }
        if props.get("GlobalSecondaryIndexes"):
            kwargs["GlobalSecondaryIndexes"] = props["GlobalSecondaryIndexes"]
        sse = props.get("SSESpecification")
        if sse:
            kwargs["SSESpecification"] = {"Enabled": sse.get("SSEEnabled", False), "SSEType": sse.get("SSEType", "KMS"),
                                          "KMSMasterKeyId": sse.get("KMSMasterKeyId", "")}
        boto3.client("dynamodb", region_name=REGION).create_table(**kwargs)

    def _create_queue(self, logical_id: str, res: dict[str, Any]) -> None:
        props = self.resolver.resolve(res.get("Properties", {}))
        attributes = {k: str(props[k]) for k in ("KmsMasterKeyId", "MessageRetentionPeriod", "VisibilityTimeout")
                      if k in props}
        boto3.client("sqs", region_name=REGION).create_queue(
            QueueName=self.resolver.attrs[logical_id]["QueueName"], Attributes=attributes)

    def _create_topic(self, logical_id: str, res: dict[str, Any]) -> None:
        props = self.resolver.resolve(res.get("Properties", {}))
        attributes = {"KmsMasterKeyId": props["KmsMasterKeyId"]} if "KmsMasterKeyId" in props else {}
        boto3.client("sns", region_name=REGION).create_topic(Name=self.resolver.attrs[logical_id]["TopicName"],
                                                             Attributes=attributes)

    def _create_notification_inbox(self) -> None:
        """An SQS queue subscribed to every topic, so local mode can show what would have been e-mailed."""
        sqs = boto3.client("sqs", region_name=REGION)
        self.inbox_url = sqs.create_queue(QueueName=f"{self.stack_name}-inbox")["QueueUrl"]
        inbox_arn = sqs.get_queue_attributes(QueueUrl=self.inbox_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"]
        sns = boto3.client("sns", region_name=REGION)
        for logical_id, res in self.template["Resources"].items():
            if res["Type"] == "AWS::SNS::Topic":
                sns.subscribe(TopicArn=self.resolver.refs[logical_id], Protocol="sqs", Endpoint=inbox_arn,
                              Attributes={"RawMessageDelivery": "false"})
        self.notifications: list[dict[str, str]] = []

    def _create_role(self, logical_id: str, res: dict[str, Any]) -> None:
        props = self.resolver.resolve(res["Properties"])
        boto3.client("iam", region_name=REGION).create_role(
            RoleName=self.resolver.refs[logical_id],
            AssumeRolePolicyDocument=json.dumps(props["AssumeRolePolicyDocument"]),
        )

    def _create_model_package_group(self, logical_id: str, res: dict[str, Any]) -> None:
        props = self.resolver.resolve(res["Properties"])
        boto3.client("sagemaker", region_name=REGION).create_model_package_group(
            ModelPackageGroupName=props["ModelPackageGroupName"],
            ModelPackageGroupDescription=props.get("ModelPackageGroupDescription", ""),
        )

    def _create_alarm(self, logical_id: str, res: dict[str, Any]) -> None:
        props = self.resolver.resolve(res["Properties"])
        kwargs: dict[str, Any] = {
            "AlarmName": self.resolver.refs[logical_id], "MetricName": props["MetricName"],
            "Namespace": props["Namespace"], "Period": int(props["Period"]),
            "EvaluationPeriods": int(props["EvaluationPeriods"]), "Threshold": float(props["Threshold"]),
            "ComparisonOperator": props["ComparisonOperator"], "Dimensions": props.get("Dimensions", []),
            "AlarmDescription": props.get("AlarmDescription", ""),
            "TreatMissingData": props.get("TreatMissingData", "missing"),
            "AlarmActions": props.get("AlarmActions", []), "OKActions": props.get("OKActions", []),
            "InsufficientDataActions": props.get("InsufficientDataActions", []),
        }
        if "DatapointsToAlarm" in props:
            kwargs["DatapointsToAlarm"] = int(props["DatapointsToAlarm"])
        if "ExtendedStatistic" in props:
            kwargs["ExtendedStatistic"] = props["ExtendedStatistic"]
        else:
            kwargs["Statistic"] = props["Statistic"]
        boto3.client("cloudwatch", region_name=REGION).put_metric_alarm(**kwargs)
        # CloudWatch creates an alarm in INSUFFICIENT_DATA (moto: OK), and sends no state-change event for it.
        from moto.cloudwatch.models import cloudwatch_backends

        cloudwatch_backends[ACCOUNT][REGION].alarms[kwargs["AlarmName"]].state_value = "INSUFFICIENT_DATA"

    def _create_log_group(self, logical_id: str, res: dict[str, Any]) -> None:
        boto3.client("logs", region_name=REGION).create_log_group(logGroupName=self.resolver.refs[logical_id])

    def _function_properties(self, res: dict[str, Any]) -> dict[str, Any]:
        """The function's properties with SAM's Globals merged in (environment variables merge key by key)."""
        glob = dict(self.template.get("Globals", {}).get("Function", {}))
        props = dict(res["Properties"])
        merged = {**glob, **props}
        env = dict(glob.get("Environment", {}).get("Variables", {}))
        env.update(props.get("Environment", {}).get("Variables", {}))
        merged["Environment"] = {"Variables": env}
        return self.resolver.resolve(merged)

    def _create_function(self, logical_id: str, res: dict[str, Any]) -> None:
        props = self._function_properties(res)
        name = self.resolver.refs[logical_id]
        arn = self.resolver.attrs[logical_id]["Arn"]
        env = {k: str(v) for k, v in props["Environment"]["Variables"].items()}
        lambdas.check_environment_size(name, env)
        code_dir = (REPO_ROOT / props["CodeUri"]).resolve()
        # SAM creates each function's role from its Policies; IAM is not enforced locally, so it is trust only.
        boto3.client("iam", region_name=REGION).create_role(
            RoleName=self.resolver.refs[f"{logical_id}Role"],
            AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]}),
        )
        boto3.client("lambda", region_name=REGION).create_function(
            FunctionName=name, Runtime=props["Runtime"], Handler=props["Handler"],
            Role=self.resolver.attrs[f"{logical_id}Role"]["Arn"], Code={"ZipFile": b"local"},
            Environment={"Variables": env}, Timeout=int(props.get("Timeout", 3)),
        )
        self._add_layer_paths(res)
        invoke_config = props.get("EventInvokeConfig", {})
        self.async_configs[name] = (int(invoke_config.get("MaximumRetryAttempts", 2)),
                                    invoke_config.get("DestinationConfig", {}).get("OnFailure", {}).get("Destination"))
        self.runtime.register(lambdas.FunctionSpec(
            logical_id=logical_id, name=name, arn=arn, code_dir=code_dir, handler=props["Handler"],
            environment=env, timeout=int(props.get("Timeout", 3)), memory_mb=int(props.get("MemorySize", 128)),
        ))
        for event_id, event in props.get("Events", {}).items():
            self._add_rule(f"{logical_id}{event_id}", "lambda", name, event)

    def _add_layer_paths(self, res: dict[str, Any]) -> None:
        """Layers are directories here: put each layer's source on sys.path, as /opt/python is on Lambda."""
        import sys

        for layer in self.template["Resources"].values():
            if layer["Type"] == "AWS::Serverless::LayerVersion":
                path = str((REPO_ROOT / layer["Properties"]["ContentUri"]).resolve())
                if path not in sys.path:
                    sys.path.append(path)

    def _add_rule(self, name: str, kind: str, target: str, event: dict[str, Any]) -> None:
        props = event.get("Properties", {})
        event_type = event["Type"]
        if event_type in ("EventBridgeRule", "CloudWatchEvent"):
            rule = eventbridge.Rule(name=name, target_kind=kind, target=target, pattern=props["Pattern"],
                                    enabled=props.get("State", "ENABLED") == "ENABLED" and props.get("Enabled", True),
                                    input=props.get("Input"), input_path=props.get("InputPath"),
                                    input_transformer=props.get("InputTransformer"))
        elif event_type in ("Schedule", "ScheduleV2"):
            enabled = props.get("Enabled", True) and props.get("State", "ENABLED") == "ENABLED"
            rule = eventbridge.Rule(name=name, target_kind=kind, target=target,
                                    schedule=props.get("Schedule") or props.get("ScheduleExpression"),
                                    enabled=bool(enabled), input=props.get("Input"))
        else:
            raise NotImplementedError(f"local mode cannot wire event source {event_type} ({name})")
        self.bus.rules.append(rule)

    def _create_state_machine(self, logical_id: str, res: dict[str, Any]) -> None:
        props = self.resolver.resolve(res["Properties"])
        definition = (REPO_ROOT / props["DefinitionUri"]).read_text()
        substitutions = props.get("DefinitionSubstitutions", {})

        def substitute(match: re.Match[str]) -> str:
            if match.group(1) not in substitutions:
                raise KeyError(f"{props['DefinitionUri']} uses ${{{match.group(1)}}}, not in DefinitionSubstitutions")
            return str(substitutions[match.group(1)])

        definition = re.sub(r"\$\{([A-Za-z0-9_]+)\}", substitute, definition)
        json.loads(definition)
        name = self.resolver.attrs[logical_id]["Name"]
        boto3.client("stepfunctions", region_name=REGION).create_state_machine(
            name=name, definition=definition, type=props.get("Type", "STANDARD"),
            roleArn=f"arn:aws:iam::{ACCOUNT}:role/{name}-role",
        )
        for event_id, event in props.get("Events", {}).items():
            self._add_rule(f"{logical_id}{event_id}", "states", self.resolver.refs[logical_id], event)

    # ------------------------------------------------------------------ conveniences
    def ref(self, logical_id: str) -> Any:
        """What ``!Ref logical_id`` gives in this cloud."""
        return self.resolver.refs[logical_id]

    def output(self, name: str) -> Any:
        """A template output's value."""
        return self.resolver.resolve(self.template["Outputs"][name]["Value"])

    def read_notifications(self) -> list[dict[str, str]]:
        """Messages published to the stack's topics so far (subject and message)."""
        sqs = boto3.client("sqs", region_name=REGION)
        while True:
            batch = sqs.receive_message(QueueUrl=self.inbox_url, MaxNumberOfMessages=10).get("Messages", [])
            if not batch:
                return self.notifications
            for message in batch:
                body = json.loads(message["Body"])
                self.notifications.append({"subject": body.get("Subject") or "", "message": body.get("Message", "")})
                sqs.delete_message(QueueUrl=self.inbox_url, ReceiptHandle=message["ReceiptHandle"])

    def wait_for_execution(self, execution_arn: str, timeout: float = 1800.0, on_event: Any = None,
                           on_poll: Any = None) -> dict[str, Any]:
        """Poll an execution to its end, passing each new history event to ``on_event``; ``on_poll()`` runs
        between polls."""
        sfn = boto3.client("stepfunctions", region_name=REGION)
        seen = 0
        deadline = time.monotonic() + timeout
        while True:
            history = sfn.get_execution_history(executionArn=execution_arn, maxResults=1000)["events"]
            for event in history[seen:]:
                if on_event:
                    on_event(event)
            seen = len(history)
            desc = sfn.describe_execution(executionArn=execution_arn)
            if desc["status"] != "RUNNING":
                history = sfn.get_execution_history(executionArn=execution_arn, maxResults=1000)["events"]
                for event in history[seen:]:
                    if on_event:
                        on_event(event)
                return desc
            if time.monotonic() > deadline:
                raise TimeoutError(f"{execution_arn} still running after {timeout:.0f} s")
            if on_poll:
                on_poll()
            time.sleep(0.5)
