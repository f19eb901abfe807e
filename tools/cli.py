"""What the command-line tools share: one-line errors instead of tracebacks, and finding the stack's resources.

Every tool's ``main`` runs through :func:`run_main`, which turns the errors an operator can cause (no or expired
credentials, no region, a wrong bucket or stack name, a missing folder) into one ``error: ...`` line on stderr
and exit status 1, and Ctrl-C into status 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
    SSOError,
    TokenRetrievalError,
)

LOGIN_HINT = ("log in first: `aws configure` (access keys), or `aws sso login --profile NAME` and "
              "`export AWS_PROFILE=NAME`")
REGION_HINT = "set AWS_REGION (e.g. `export AWS_REGION=eu-west-1`), pass --region, or set one in `aws configure`"
# Error codes AWS returns for credentials it refuses (STS, S3 and the JSON protocols spell them differently).
_BAD_CREDENTIAL_CODES = {"ExpiredToken", "ExpiredTokenException", "InvalidClientTokenId", "InvalidAccessKeyId",
                         "SignatureDoesNotMatch", "UnrecognizedClientException", "InvalidToken"}
# The logical id of the data bucket in template.yaml; CloudFormation tags each bucket it creates with it.
DATA_BUCKET_LOGICAL_ID = "DataBucket"


class ToolError(Exception):
    """An operator's mistake or an environment problem, reported as one line."""


def region(explicit: str | None = None) -> str | None:
    """``--region``, else ``AWS_REGION`` (which the AWS CLI reads but boto3 does not), else boto3's own chain."""
    return explicit or os.environ.get("AWS_REGION") or None


def _profile() -> str:
    return os.environ.get("AWS_PROFILE") or "default"


def aws_message(err: BaseException) -> str | None:
    """A one-line explanation with what to do for an AWS error an operator can fix; ``None`` for others."""
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return f"no AWS credentials found (profile {_profile()}): {LOGIN_HINT}"
    if isinstance(err, (TokenRetrievalError, SSOError)):
        return f"the AWS SSO session of profile {_profile()} has expired or is missing: run `aws sso login`"
    if isinstance(err, ProfileNotFound):
        return f"{err}: check AWS_PROFILE, or list profiles with `aws configure list-profiles`"
    if isinstance(err, NoRegionError):
        return f"no AWS region configured: {REGION_HINT}"
    if isinstance(err, EndpointConnectionError):
        if os.environ.get("AWS_ENDPOINT_URL"):
            return (f"cannot reach {os.environ['AWS_ENDPOINT_URL']} (AWS_ENDPOINT_URL): start local mode "
                    "(`make up`), or `unset AWS_ENDPOINT_URL` to use AWS")
        return f"cannot reach AWS ({err}): check the network and the region"
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        op = getattr(err, "operation_name", "") or "the request"
        if code in _BAD_CREDENTIAL_CODES:
            return f"AWS refused the credentials of profile {_profile()} ({code} on {op}): {LOGIN_HINT}"
        if code in ("AccessDenied", "AccessDeniedException", "403"):
            return (f"access denied on {op} for profile {_profile()}: use a role with the permission, or another "
                    "profile (AWS_PROFILE)")
    return None


def run_main(main: Callable[[], int]) -> int:
    """Run a tool's body; operator-fixable errors become one stderr line and a non-zero exit."""
    try:
        return main()
    except ToolError as err:
        return fail(str(err))
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    except (BotoCoreError, ClientError) as err:
        message = aws_message(err)
        return fail(message or f"AWS error: {err}")


def fail(message: str) -> int:
    """Write ``error: message`` on one line of stderr; return the exit status 1."""
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    return 1


def stack_outputs(cfn: Any, stack: str) -> dict[str, str]:
    """The outputs of ``stack`` as a dict.

    Raises
    ------
    ToolError
        The stack does not exist in this account and region.
    """
    return {o["OutputKey"]: o["OutputValue"] for o in describe_stack(cfn, stack).get("Outputs", [])}


def describe_stack(cfn: Any, stack: str) -> dict[str, Any]:
    """DescribeStacks of one stack; a missing stack is a :class:`ToolError` naming the region."""
    try:
        return cfn.describe_stacks(StackName=stack)["Stacks"][0]
    except ClientError as err:
        # AWS answers a missing stack with ValidationError "Stack with id X does not exist".
        if err.response["Error"]["Code"] == "ValidationError" and "does not exist" in str(err):
            raise ToolError(f"stack {stack} does not exist in region {cfn.meta.region_name}: check the name "
                            "(`aws cloudformation list-stacks`) and AWS_REGION") from err
        raise


def data_bucket_of_stack(cfn: Any, stack: str) -> str:
    """The ``DataBucketName`` output of ``stack``."""
    outputs = stack_outputs(cfn, stack)
    if "DataBucketName" not in outputs:
        raise ToolError(f"stack {stack} has no DataBucketName output: it is not this project's stack, or its "
                        "deployment has not finished")
    return outputs["DataBucketName"]


def check_data_bucket(s3: Any, bucket: str, *, require_tag: bool = True) -> None:
    """Refuse a bucket that does not exist, cannot be reached, or (``require_tag``) is not a stack's data bucket.

    A stack's data bucket carries the tag ``aws:cloudformation:logical-id = DataBucket``, which CloudFormation
    sets on every bucket it creates and nobody else can set (``aws:`` tags are reserved).

    Raises
    ------
    ToolError
        With what to do instead.
    """
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise ToolError(f"bucket {bucket} does not exist: pass the stack's DataBucketName output, or "
                            "--stack NAME") from err
        if code in ("403", "AccessDenied"):
            raise ToolError(f"bucket {bucket} exists but profile {_profile()} may not use it (403): check the name "
                            "(--stack NAME finds it) and your credentials") from err
        raise
    if not require_tag:
        return
    try:
        tags = {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=bucket)["TagSet"]}
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("AccessDenied", "403"):
            raise ToolError(f"cannot read the tags of bucket {bucket} to check it is a stack's data bucket: pass "
                            "--stack NAME instead, or --skip-bucket-check") from err
        if code != "NoSuchTagSet":
            raise
        tags = {}
    logical_id = tags.get("aws:cloudformation:logical-id")
    if logical_id != DATA_BUCKET_LOGICAL_ID:
        what = (f"it is the {logical_id} of stack {tags.get('aws:cloudformation:stack-name')}" if logical_id
                else "it was not created by a CloudFormation stack")
        raise ToolError(f"bucket {bucket} is not a stack's data bucket ({what}): pass --stack NAME, or "
                        "--skip-bucket-check to upload anyway")
