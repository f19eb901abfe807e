"""IAM's policy evaluation as local mode implements it (localmode/iam_policy.py)."""

from __future__ import annotations

from typing import Any

import pytest

from localmode.iam_policy import (
    ALLOW,
    EXPLICIT_DENY,
    IMPLICIT_DENY,
    Statement,
    arn_matches,
    evaluate,
    unmet_condition_keys,
)

BUCKET = "arn:aws:s3:::data"


def st(sid: str = "s", effect: str = "Allow", **kw: Any) -> Statement:
    return Statement(sid=sid, effect=effect, **{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})


def test_action_wildcards_are_case_insensitive() -> None:
    s = [st(actions=["S3:get*"], resources=["*"])]
    assert evaluate(s, "s3:GetObject", f"{BUCKET}/k", {}).outcome == ALLOW
    assert evaluate(s, "s3:PutObject", f"{BUCKET}/k", {}).outcome == IMPLICIT_DENY
    assert evaluate([st(actions=["s3:GetObjec?"], resources=["*"])], "s3:GetObject", "x", {}).allowed


def test_resource_wildcards_match_per_arn_part_and_are_case_sensitive() -> None:
    assert arn_matches(f"{BUCKET}/incoming/*", f"{BUCKET}/incoming/a/b.jpg")
    assert not arn_matches(f"{BUCKET}/incoming/*", f"{BUCKET}/validated/a.jpg")
    assert not arn_matches(f"{BUCKET}/Incoming/*", f"{BUCKET}/incoming/a.jpg")
    assert arn_matches("arn:aws:logs:*:123:log-group:/aws/sagemaker/*", "arn:aws:logs:us-east-1:123:log-group:"
                                                                          "/aws/sagemaker/Jobs:log-stream:x")
    # The region part of a pattern cannot swallow the account.
    assert not arn_matches("arn:aws:lambda:us-east-1:*", "arn:aws:lambda:eu-west-1:123:function:f")
    assert arn_matches("*", "*")
    # A specific ARN does not match the "*" of an action without resource-level permissions.
    assert not arn_matches("arn:aws:states:us-east-1:123:stateMachine:x", "*")


def test_explicit_deny_beats_allow_and_implicit_deny_is_the_default() -> None:
    allow = st("a", actions=["s3:*"], resources=["*"])
    deny = st("d", "Deny", actions=["s3:DeleteObject"], resources=[f"{BUCKET}/*"])
    decision = evaluate([allow, deny], "s3:DeleteObject", f"{BUCKET}/k", {})
    assert decision.outcome == EXPLICIT_DENY and decision.statement == deny
    assert evaluate([allow, deny], "s3:GetObject", f"{BUCKET}/k", {}).statement == allow
    assert evaluate([], "s3:GetObject", f"{BUCKET}/k", {}).outcome == IMPLICIT_DENY


def test_not_action_and_not_resource() -> None:
    s = [st(not_actions=["iam:*"], resources=["*"]), st("d", "Deny", actions=["s3:*"], not_resources=[f"{BUCKET}/*"])]
    assert evaluate(s, "s3:GetObject", f"{BUCKET}/k", {}).allowed
    assert evaluate(s, "iam:PassRole", "arn:aws:iam::1:role/r", {}).outcome == IMPLICIT_DENY
    assert evaluate(s, "s3:GetObject", "arn:aws:s3:::other/k", {}).outcome == EXPLICIT_DENY


@pytest.mark.parametrize(("condition", "context", "expected"), [
    ({"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
     {"iam:PassedToService": "sagemaker.amazonaws.com"}, True),
    ({"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}},
     {"iam:PassedToService": "lambda.amazonaws.com"}, False),
    # keys are case-insensitive, values are not
    ({"StringEquals": {"IAM:passedToService": "sagemaker.amazonaws.com"}},
     {"iam:PassedToService": "SageMaker.amazonaws.com"}, False),
    ({"StringEquals": {"IAM:passedToService": "sagemaker.amazonaws.com"}},
     {"iam:PassedToService": "sagemaker.amazonaws.com"}, True),
    ({"StringLike": {"s3:prefix": ["incoming/*", "quarantine/*"]}}, {"s3:prefix": "quarantine/x"}, True),
    ({"StringLike": {"s3:prefix": ["incoming/*"]}}, {"s3:prefix": "validated/x"}, False),
    # a missing key fails a positive operator...
    ({"StringLike": {"s3:prefix": ["incoming/*"]}}, {}, False),
    # ...passes with IfExists, and passes a negated operator
    ({"StringLikeIfExists": {"s3:prefix": ["incoming/*"]}}, {}, True),
    ({"StringNotEquals": {"aws:SourceAccount": "1"}}, {}, True),
    ({"StringNotEquals": {"aws:SourceAccount": "1"}}, {"aws:SourceAccount": "1"}, False),
    ({"Bool": {"kms:GrantIsForAWSResource": True}}, {"kms:GrantIsForAWSResource": True}, True),
    ({"Bool": {"kms:GrantIsForAWSResource": "true"}}, {"kms:GrantIsForAWSResource": False}, False),
    ({"Bool": {"aws:SecureTransport": "false"}}, {"aws:SecureTransport": True}, False),
    ({"ArnLike": {"aws:SourceArn": "arn:aws:budgets::1:*"}}, {"aws:SourceArn": "arn:aws:budgets::1:budget/x"}, True),
    ({"ArnEquals": {"aws:SourceArn": "arn:aws:sns:us-east-1:1:t"}}, {"aws:SourceArn": "arn:aws:sns:us-east-1:1:u"},
     False),
    ({"ForAllValues:StringEquals": {"aws:TagKeys": ["a", "b"]}}, {"aws:TagKeys": ["a"]}, True),
    ({"ForAllValues:StringEquals": {"aws:TagKeys": ["a", "b"]}}, {"aws:TagKeys": ["a", "c"]}, False),
    ({"ForAnyValue:StringEquals": {"aws:TagKeys": ["c"]}}, {"aws:TagKeys": ["a", "c"]}, True),
    ({"Null": {"aws:TagKeys": "true"}}, {}, True),
    # every operator and key must hold
    ({"StringEquals": {"a:x": "1", "a:y": "2"}}, {"a:x": "1", "a:y": "3"}, False),
])
def test_conditions(condition: dict[str, Any], context: dict[str, Any], expected: bool) -> None:
    s = [st(actions=["*"], resources=["*"], condition=condition)]
    assert evaluate(s, "x:Y", "*", context).allowed is expected


def test_unsupported_condition_operator_fails_loudly() -> None:
    s = [st(actions=["*"], resources=["*"], condition={"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}})]
    with pytest.raises(NotImplementedError, match="IpAddress"):
        evaluate(s, "x:Y", "*", {"aws:SourceIp": "10.1.1.1"})


def test_unmet_condition_keys_name_what_the_local_context_lacks() -> None:
    s = [st(actions=["cloudwatch:PutMetricData"], resources=["*"],
            condition={"StringEquals": {"cloudwatch:namespace": "SkinLesion"}})]
    assert unmet_condition_keys(s, "cloudwatch:PutMetricData", "*", {}) == ["cloudwatch:namespace"]
    assert unmet_condition_keys(s, "cloudwatch:PutMetricData", "*", {"cloudwatch:namespace": "x"}) == []
