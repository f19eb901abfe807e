"""The mutation test of the template's policies over a small synthetic trace (localmode/iam_mutations.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from localmode import iam_mutations

ACCOUNT, REGION = "123456789012", "us-east-1"
TEMPLATE = {
    "Resources": {
        "Bucket": {"Type": "AWS::S3::Bucket"},
        "FnRole": {"Type": "AWS::IAM::Role", "Properties": {
            "AssumeRolePolicyDocument": {"Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                        "Principal": {"Service": "lambda.amazonaws.com"}}]},
            "Policies": [{"PolicyName": "p", "PolicyDocument": {"Statement": [
                # 0: exercised, one action of two unused
                {"Effect": "Allow", "Action": ["s3:GetObject", "s3:DeleteObject"],
                 "Resource": {"Fn::Sub": "${Bucket.Arn}/in/*"}},
                # 1: never needed by the trace
                {"Effect": "Allow", "Action": "sqs:SendMessage", "Resource": "*"},
                # 2: the 404-not-403 rule
                {"Sid": "MissingKeys", "Effect": "Allow", "Action": "s3:ListBucket",
                 "Resource": {"Fn::GetAtt": ["Bucket", "Arn"]}},
            ]}}]}},
        "SageMakerExecutionRole": {"Type": "AWS::IAM::Role", "Properties": {
            "AssumeRolePolicyDocument": {"Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                        "Principal": {"Service": "sagemaker.amazonaws.com"}}]},
            "Policies": [{"PolicyName": "sm", "PolicyDocument": {"Statement": [
                {"Effect": "Allow", "Action": ["ecr:BatchGetImage"], "Resource": "*"},
                {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": "*"},
            ]}}]}},
    },
}


def _check(principal: str, action: str, resource: str, allowed: bool = True, kind: str = "required",
           **context: Any) -> dict[str, Any]:
    return {"type": "check", "principal": principal, "action": action, "resource": resource, "kind": kind,
            "context": {"aws:SecureTransport": True, **context}, "allowed": allowed, "or_role": None}


def test_removals_are_caught_justified_or_unjustified(tmp_path: Path) -> None:
    template = tmp_path / "template.yaml"
    template.write_text(yaml.safe_dump(TEMPLATE))
    bucket = "arn:aws:s3:::stack-bucket"
    rows = [
        {"type": "deployment", "stack_name": "stack", "account": ACCOUNT, "region": REGION, "parameters": {},
         "pseudo": {"AWS::Region": REGION, "AWS::AccountId": ACCOUNT, "AWS::StackName": "stack",
                    "AWS::Partition": "aws"},
         "refs": {"Bucket": "stack-bucket"}, "attrs": {"Bucket": {"Arn": bucket}}},
        _check("FnRole", "s3:GetObject", f"{bucket}/in/a.jpg"),
        _check("FnRole", "s3:GetObject", f"{bucket}/in/a.jpg"),  # the same call twice counts once
        _check("FnRole", "s3:ListBucket", bucket, kind="missing-key", **{"s3:prefix": "in/missing"}),
        _check("FnRole", "s3:PutObject", f"{bucket}/out/x", allowed=False),
        _check("SageMakerExecutionRole", "s3:GetObject", f"{bucket}/in/a.jpg"),
    ]
    trace = tmp_path / "trace"
    trace.mkdir()
    (trace / "run.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "report.md"

    assert iam_mutations.main(["--trace", str(trace), "--template", str(template), "--out", str(out)]) == 0
    text = out.read_text()
    statements, actions = text.split("## Actions of multi-action statements")
    lines = {line.split(" | ")[0].lstrip("| "): line for line in statements.splitlines() if line.startswith("| ")}
    assert "| caught |" in lines["FnRole/p/0"]
    assert "| UNJUSTIFIED | no traced call needs it |" in lines["FnRole/p/1"]
    assert "| caught |" in lines["FnRole/p/2:MissingKeys"]
    assert "| not caught | SageMaker pulls the training and inference images from ECR" in \
        lines["SageMakerExecutionRole/sm/0"]
    assert "| caught |" in lines["SageMakerExecutionRole/sm/1"]
    action_rows = [line for line in actions.splitlines() if line.startswith("| FnRole/p/0 | ")]
    assert any("| s3:GetObject | caught |" in line for line in action_rows)
    assert any("| s3:DeleteObject | UNJUSTIFIED |" in line for line in action_rows)
    assert f"| FnRole | s3:PutObject | {bucket}/out/x |" in text  # a denial the run hit is listed
    assert "python -m localmode.iam_mutations --trace" in text
    # --strict turns UNJUSTIFIED removals into a failure
    assert iam_mutations.main(["--trace", str(trace), "--template", str(template), "--strict"]) == 1
