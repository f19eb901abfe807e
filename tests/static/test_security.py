"""The template's security invariants: every store encrypted with the stack's key, TLS-only and private buckets,
log groups with a key and a retention, and no wildcard IAM action or resource outside the allow-list below.

The checks run on the template *after* the SAM transform (the same samtranslator cfn-lint runs), so the roles SAM
generates from ``Policies`` (inline statements, policy templates such as ``LambdaInvokePolicy``) and the managed
policies it attaches (``AWSLambdaBasicExecutionRole``, ``AWSXrayWriteOnlyAccess`` for ``Tracing: Active``) are
judged like hand-written ones. The allow-lists are mirrored, with the same reasons, in SECURITY.md.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from localmode.iam_policy import sam_transform
from localmode.template import load_template

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = load_template(REPO / "template.yaml")

_VENDED_LOGS = "Step Functions vended log delivery: these CloudWatch Logs APIs have no resource type"
_EC2_DESCRIBE = "Describe calls have no resource type; SageMaker needs them to place VPC jobs"

# Actions that may be granted on Resource "*": the service authorization reference gives them no resource type
# (or, where said, none that a call can be scoped by). Anything else on "*" fails.
WILDCARD_RESOURCE_ACTIONS: dict[str, str] = {
    "ecr:GetAuthorizationToken": "returns a registry login token; the API has no resource type",
    "cloudwatch:PutMetricData": "no resource type; limited to the job's namespaces by a cloudwatch:namespace condition",
    "ec2:DescribeNetworkInterfaces": _EC2_DESCRIBE,
    "ec2:DescribeVpcs": _EC2_DESCRIBE,
    "ec2:DescribeDhcpOptions": _EC2_DESCRIBE,
    "ec2:DescribeSubnets": _EC2_DESCRIBE,
    "ec2:DescribeSecurityGroups": _EC2_DESCRIBE,
    "application-autoscaling:RegisterScalableTarget": (
        "a scalable target's ARN ends in an id Application Auto Scaling assigns at registration, so no policy written "
        "before the first deployment can name it"
    ),
    "application-autoscaling:PutScalingPolicy": (
        "as for RegisterScalableTarget: the target's id is assigned at registration"
    ),
    "application-autoscaling:DeregisterScalableTarget": (
        "as for RegisterScalableTarget: the target's id is assigned at registration"
    ),
    "sagemaker:ListModelPackages": (
        "a list call (filtered by the stack's package group in code) has no package ARN to scope by before it runs; "
        "it returns summaries only"
    ),
    "logs:CreateLogDelivery": _VENDED_LOGS,
    "logs:GetLogDelivery": _VENDED_LOGS,
    "logs:UpdateLogDelivery": _VENDED_LOGS,
    "logs:DeleteLogDelivery": _VENDED_LOGS,
    "logs:ListLogDeliveries": _VENDED_LOGS,
    "logs:PutResourcePolicy": _VENDED_LOGS,
    "logs:DescribeResourcePolicies": _VENDED_LOGS,
    "logs:DescribeLogGroups": _VENDED_LOGS,
}

# AWS managed policies a role may carry: SAM attaches these to the roles it generates; nothing else is allowed.
ALLOWED_MANAGED_POLICIES: dict[str, str] = {
    "AWSLambdaBasicExecutionRole": (
        "SAM attaches it to every function role: logs:CreateLogGroup/CreateLogStream/PutLogEvents on *; the "
        "functions write only to their own KMS-encrypted log group (LoggingConfig)"
    ),
    "AWSXrayWriteOnlyAccess": "SAM adds it for Tracing: Active (functions, state machine); X-Ray has no resource type",
}

# Allow statements of resource policies that may use a service-wide action ("kms:*"), by (resource, Sid).
# In a key policy, Resource "*" means the key itself, so key policies are exempt from the resource rule.
WILDCARD_ACTION_STATEMENTS: dict[tuple[str, str], str] = {
    ("DataKey", "AccountAdministers"): (
        "the default key policy: kms:* for the account root delegates key use to IAM policies of this account; "
        "without it the key cannot be administered"
    ),
}

# The one bucket whose default encryption may be SSE-S3 rather than SSE-KMS, and that logs nowhere.
SSE_S3_BUCKETS: dict[str, str] = {
    "AccessLogsBucket": "S3 server access logs can be delivered only to a bucket with SSE-S3 default encryption",
}


# ------------------------------------------------------------------ SAM transform
def expand_sam(template: dict[str, Any]) -> dict[str, Any]:
    """The CloudFormation template the SAM transform makes of ``template`` (local mode's own transform)."""
    return sam_transform(template, "us-east-1")


# ------------------------------------------------------------------ the checker
def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _statements(document: Any) -> Iterator[dict[str, Any]]:
    """Every statement of a policy document, both branches of an ``Fn::If`` included."""
    if not isinstance(document, dict):
        return
    for item in _as_list(document.get("Statement", [])):
        if isinstance(item, dict) and set(item) == {"Fn::If"}:
            for branch in item["Fn::If"][1:]:
                if isinstance(branch, dict):
                    yield from _statements({"Statement": branch})
        elif isinstance(item, dict):
            yield item


def _is_service_wide(action: Any) -> bool:
    return action == "*" or (isinstance(action, str) and action.endswith(":*"))


def _identity_policy_findings(where: str, document: Any) -> list[str]:
    findings = []
    for st in _statements(document):
        if st.get("Effect") != "Allow":
            continue
        if "NotAction" in st or "NotResource" in st:
            findings.append(f"{where}: Allow with NotAction/NotResource")
            continue
        actions = _as_list(st.get("Action", []))
        resources = _as_list(st.get("Resource", []))
        for action in actions:
            if _is_service_wide(action):
                findings.append(f"{where}: wildcard action {action!r}")
        if "*" in resources:
            for action in actions:
                if action not in WILDCARD_RESOURCE_ACTIONS:
                    findings.append(f"{where}: {action} on Resource '*' is not in the allow-list")
        if "iam:PassRole" in actions:
            condition = st.get("Condition", {}).get("StringEquals", {})
            if "*" in resources or "iam:PassedToService" not in condition:
                findings.append(f"{where}: iam:PassRole without a role ARN and an iam:PassedToService condition")
    return findings


def _resource_policy_findings(where: str, logical_id: str, document: Any, key_policy: bool) -> list[str]:
    findings = []
    for st in _statements(document):
        if st.get("Effect") != "Allow":
            continue
        principal = st.get("Principal")
        if principal == "*" or (isinstance(principal, dict) and "*" in _as_list(principal.get("AWS", []))):
            findings.append(f"{where}: Allow to Principal '*'")
        for action in _as_list(st.get("Action", [])):
            if _is_service_wide(action) and (logical_id, st.get("Sid", "")) not in WILDCARD_ACTION_STATEMENTS:
                findings.append(f"{where}: wildcard action {action!r} (Sid {st.get('Sid')!r}) is not in the allow-list")
        if not key_policy and "*" in _as_list(st.get("Resource", [])):
            findings.append(f"{where}: Allow on Resource '*'")
    return findings


def _refs(value: Any) -> set[str]:
    """Logical ids that ``value`` points at through Ref or GetAtt."""
    if isinstance(value, dict):
        if set(value) == {"Ref"}:
            return {value["Ref"]}
        if set(value) == {"Fn::GetAtt"}:
            target = value["Fn::GetAtt"]
            return {target[0] if isinstance(target, list) else str(target).split(".")[0]}
        return set().union(*(_refs(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_refs(v) for v in value)) if value else set()
    return set()


def _tls_only(document: Any) -> bool:
    for st in _statements(document):
        if (st.get("Effect") == "Deny" and st.get("Principal") in ("*", {"AWS": "*"})
                and "s3:*" in _as_list(st.get("Action", []))
                and str(st.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport")).lower() == "false"):
            resources = _as_list(st.get("Resource", []))
            if len(resources) >= 2:  # the bucket and its objects
                return True
    return False


def _bucket_findings(logical_id: str, props: dict[str, Any], resources: dict[str, Any]) -> list[str]:
    findings = []
    rules = props.get("BucketEncryption", {}).get("ServerSideEncryptionConfiguration", [])
    defaults = [r.get("ServerSideEncryptionByDefault", {}) for r in rules]
    if logical_id in SSE_S3_BUCKETS:
        if not any(d.get("SSEAlgorithm") in ("AES256", "aws:kms") for d in defaults):
            findings.append(f"{logical_id}: bucket without default encryption")
    elif not any(d.get("SSEAlgorithm") == "aws:kms" and d.get("KMSMasterKeyID") for d in defaults):
        findings.append(f"{logical_id}: bucket without SSE-KMS default encryption")
    block = props.get("PublicAccessBlockConfiguration", {})
    flags = ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")
    if not all(block.get(flag) is True for flag in flags):
        findings.append(f"{logical_id}: bucket without a full public access block")
    policies = [r["Properties"].get("PolicyDocument") for r in resources.values()
                if r.get("Type") == "AWS::S3::BucketPolicy" and logical_id in _refs(r["Properties"].get("Bucket"))]
    if not any(_tls_only(doc) for doc in policies):
        findings.append(f"{logical_id}: bucket without a TLS-only (aws:SecureTransport) deny policy")
    if logical_id not in SSE_S3_BUCKETS and "DestinationBucketName" not in props.get("LoggingConfiguration", {}):
        findings.append(f"{logical_id}: bucket without server access logging")
    return findings


# Resource types that must name the stack's KMS key: the property that names it, and what the finding calls them.
_KEY_PROPERTY = {
    "AWS::SNS::Topic": ("KmsMasterKeyId", "topic"),
    "AWS::SQS::Queue": ("KmsMasterKeyId", "queue"),
    "AWS::SageMaker::EndpointConfig": ("KmsKeyId", "endpoint config"),
    "AWS::Logs::LogGroup": ("KmsKeyId", "log group"),
}


def security_findings(template: dict[str, Any]) -> list[str]:
    """Everything in ``template`` (a SAM template as load_template reads it) that breaks the security rules."""
    cfn = expand_sam(template)
    resources: dict[str, Any] = cfn["Resources"]
    findings: list[str] = []
    for logical_id, res in resources.items():
        kind = res.get("Type")
        props = res.get("Properties") or {}
        if kind in _KEY_PROPERTY:
            prop, what = _KEY_PROPERTY[kind]
            if not props.get(prop):
                findings.append(f"{logical_id}: {what} without {prop}")
        findings += _resource_findings(logical_id, kind, props, resources)
    return findings


def _resource_findings(logical_id: str, kind: str | None, props: dict[str, Any],
                       resources: dict[str, Any]) -> list[str]:
    """The rules of one resource type (the KMS key property of :data:`_KEY_PROPERTY` aside)."""
    if kind == "AWS::S3::Bucket":
        return _bucket_findings(logical_id, props, resources)
    if kind == "AWS::DynamoDB::Table":
        sse = props.get("SSESpecification", {})
        if not (sse.get("SSEEnabled") is True and sse.get("SSEType") == "KMS" and sse.get("KMSMasterKeyId")):
            return [f"{logical_id}: table without SSESpecification KMS with the stack key"]
    elif kind == "AWS::Logs::LogGroup":
        if not props.get("RetentionInDays"):
            return [f"{logical_id}: log group without RetentionInDays"]
    elif kind == "AWS::Lambda::Function":
        return _function_findings(logical_id, props, resources)
    elif kind == "AWS::IAM::Role":
        return _role_findings(logical_id, props)
    elif kind in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
        return _identity_policy_findings(logical_id, props.get("PolicyDocument"))
    elif kind == "AWS::KMS::Key":
        return _resource_policy_findings(logical_id, logical_id, props.get("KeyPolicy"), key_policy=True)
    elif kind in ("AWS::S3::BucketPolicy", "AWS::SNS::TopicPolicy", "AWS::SQS::QueuePolicy"):
        return _resource_policy_findings(logical_id, logical_id, props.get("PolicyDocument"), key_policy=False)
    return []


def _function_findings(logical_id: str, props: dict[str, Any], resources: dict[str, Any]) -> list[str]:
    findings = []
    targets = _refs(props.get("LoggingConfig", {}).get("LogGroup"))
    if not any(resources.get(t, {}).get("Type") == "AWS::Logs::LogGroup" for t in targets):
        findings.append(f"{logical_id}: function without LoggingConfig to a log group of the stack")
    if not props.get("KmsKeyArn"):
        findings.append(f"{logical_id}: function environment not encrypted with the stack key (KmsKeyArn)")
    return findings


def _role_findings(logical_id: str, props: dict[str, Any]) -> list[str]:
    findings = []
    for policy in props.get("Policies", []):
        findings += _identity_policy_findings(f"{logical_id}/{policy.get('PolicyName')}", policy.get("PolicyDocument"))
    for arn in props.get("ManagedPolicyArns", []):
        name = arn.rsplit("/", 1)[-1] if isinstance(arn, str) else None
        if not (isinstance(arn, str) and arn.startswith("arn:aws:iam::aws:policy/")
                and name in ALLOWED_MANAGED_POLICIES):
            findings.append(f"{logical_id}: managed policy {arn} is not in the allow-list")
    return findings


# ------------------------------------------------------------------ the template passes
def test_template_has_no_security_findings() -> None:
    assert security_findings(TEMPLATE) == []


def test_every_function_has_its_own_encrypted_log_group() -> None:
    cfn = expand_sam(TEMPLATE)["Resources"]
    functions = {k: v for k, v in cfn.items() if v["Type"] == "AWS::Lambda::Function"}
    groups = [next(iter(_refs(f["Properties"]["LoggingConfig"]["LogGroup"]))) for f in functions.values()]
    assert len(set(groups)) == len(functions) >= 7


def test_allow_lists_are_used_and_documented() -> None:
    """No stale entry: each allow-listed wildcard is in the template, and SECURITY.md names each one."""
    cfn = expand_sam(TEMPLATE)["Resources"]
    on_star: set[str] = set()
    managed: set[str] = set()
    for res in cfn.values():
        if res["Type"] != "AWS::IAM::Role":
            continue
        managed |= {a.rsplit("/", 1)[-1] for a in res["Properties"].get("ManagedPolicyArns", [])}
        for policy in res["Properties"].get("Policies", []):
            for st in _statements(policy["PolicyDocument"]):
                if "*" in _as_list(st.get("Resource", [])):
                    on_star |= set(_as_list(st["Action"]))
    assert set(WILDCARD_RESOURCE_ACTIONS) == on_star
    assert set(ALLOWED_MANAGED_POLICIES) == managed
    security_md = (REPO / "SECURITY.md").read_text()
    for name in [*WILDCARD_RESOURCE_ACTIONS, *ALLOWED_MANAGED_POLICIES, *SSE_S3_BUCKETS, "kms:*"]:
        assert f"`{name}`" in security_md, f"SECURITY.md does not document {name}"


# ------------------------------------------------------------------ the checker can fail
def _res(t: dict[str, Any], logical_id: str) -> dict[str, Any]:
    props: dict[str, Any] = t["Resources"][logical_id]["Properties"]
    return props


def _add_function_statement(statement: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def mutate(t: dict[str, Any]) -> None:
        _res(t, "GateModelFunction").setdefault("Policies", []).append({"Statement": [statement]})

    return mutate


BROKEN: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "bucket-without-sse": (lambda t: _res(t, "DataBucket").pop("BucketEncryption"),
                           "DataBucket: bucket without SSE-KMS"),
    "bucket-with-sse-s3": (lambda t: _res(t, "ArtifactsBucket")["BucketEncryption"].update(
        ServerSideEncryptionConfiguration=[{"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]),
        "ArtifactsBucket: bucket without SSE-KMS"),
    "partial-public-access-block": (
        lambda t: _res(t, "DataBucket")["PublicAccessBlockConfiguration"].update(RestrictPublicBuckets=False),
        "DataBucket: bucket without a full public access block"),
    "bucket-without-tls-policy": (lambda t: t["Resources"].pop("ArtifactsBucketPolicy"),
                                  "ArtifactsBucket: bucket without a TLS-only"),
    "bucket-without-access-logs": (lambda t: _res(t, "DataBucket").pop("LoggingConfiguration"),
                                   "DataBucket: bucket without server access logging"),
    "table-without-kms": (lambda t: _res(t, "ManifestTable").pop("SSESpecification"),
                          "ManifestTable: table without SSESpecification"),
    "topic-without-kms": (lambda t: _res(t, "NotificationTopic").pop("KmsMasterKeyId"),
                          "NotificationTopic: topic without KmsMasterKeyId"),
    "log-group-without-kms": (lambda t: _res(t, "RetrainingLogGroup").pop("KmsKeyId"),
                              "RetrainingLogGroup: log group without KmsKeyId"),
    "log-group-without-retention": (lambda t: _res(t, "CheckDataLogGroup").pop("RetentionInDays"),
                                    "CheckDataLogGroup: log group without RetentionInDays"),
    "function-without-log-group": (lambda t: _res(t, "GateModelFunction").pop("LoggingConfig"),
                                   "GateModelFunction: function without LoggingConfig"),
    "env-without-kms": (lambda t: t["Globals"]["Function"].pop("KmsKeyArn"),
                        "function environment not encrypted"),
    "action-star-in-sam-policy": (_add_function_statement({"Effect": "Allow", "Action": "*", "Resource": "*"}),
                                  "GateModelFunctionRole/GateModelFunctionRolePolicy0: wildcard action '*'"),
    "service-wide-action": (_add_function_statement(
        {"Effect": "Allow", "Action": "s3:*", "Resource": {"Fn::Sub": "${DataBucket.Arn}/*"}}),
        "wildcard action 's3:*'"),
    "resource-star-on-role": (lambda t: _res(t, "SageMakerExecutionRole")["Policies"][0]["PolicyDocument"][
        "Statement"].append({"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "*"}),
        "SageMakerExecutionRole/training-and-serving: s3:GetObject on Resource '*'"),
    "managed-admin-policy": (lambda t: _res(t, "GateModelFunction").setdefault("Policies", []).append(
        "arn:aws:iam::aws:policy/AdministratorAccess"), "managed policy arn:aws:iam::aws:policy/AdministratorAccess"),
    "pass-role-anywhere": (_add_function_statement({"Effect": "Allow", "Action": "iam:PassRole", "Resource": "*"}),
                           "iam:PassRole without a role ARN"),
    "public-key-policy": (lambda t: _res(t, "DataKey")["KeyPolicy"]["Statement"].append(
        {"Sid": "Oops", "Effect": "Allow", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*"}),
        "DataKey: Allow to Principal '*'"),
    "wildcard-in-topic-policy": (lambda t: _res(t, "NotificationTopicPolicy")["PolicyDocument"]["Statement"].append(
        {"Sid": "Oops", "Effect": "Allow", "Principal": {"Service": "events.amazonaws.com"}, "Action": "sns:*",
         "Resource": {"Ref": "NotificationTopic"}}), "NotificationTopicPolicy: wildcard action 'sns:*'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_checker_reports_a_broken_copy(case: str) -> None:
    mutate, expected = BROKEN[case]
    broken = copy.deepcopy(TEMPLATE)
    mutate(broken)
    findings = security_findings(broken)
    assert any(expected in f for f in findings), findings
