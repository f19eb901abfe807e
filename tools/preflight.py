"""Check, before anything costs money, that a deployment of this stack can work in this account and region.

Checks: credentials and region (STS); the SageMaker service quotas the parameters need (training instances, spot
or on-demand, and endpoint instances, through the Service Quotas API); that both image URIs exist in ECR; and,
with ``--stack`` once deployed, that the e-mail subscription of the notification topic is confirmed. Each failure
is one line that says what to do; the exit status is 1 if any check failed.

Example
-------
``python -m tools.preflight --training-image-uri URI --inference-image-uri URI``;
after ``make deploy``: ``python -m tools.preflight --stack skin-lesion``
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from localmode.template import load_template, samconfig_parameters
from tools.cli import ToolError, aws_message, describe_stack, region, run_main

REPO = Path(__file__).resolve().parents[1]
ECR_URI = re.compile(r"(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/"
                     r"(?P<repo>[a-z0-9._/-]+)(?::(?P<tag>[\w.-]+)|@(?P<digest>sha256:[0-9a-f]{64}))$")

ClientFactory = Callable[[str], Any]


@dataclass
class Check:
    """One check's outcome: ``ok``, ``FAIL`` (with what to do) or ``skip`` (not applicable yet)."""

    status: str
    name: str
    detail: str

    def line(self) -> str:
        """``ok    quota  ...``."""
        return f"{self.status:<5} {self.name:<11} {self.detail}"


@dataclass
class Settings:
    """What the checks need to know about the deployment."""

    region: str | None
    training_instance_type: str
    training_instance_count: int
    spot: bool
    endpoint_instance_type: str
    endpoint_instances: int
    training_image_uri: str | None = None
    inference_image_uri: str | None = None
    stack: str | None = None


def template_defaults(template: Path = REPO / "template.yaml") -> dict[str, str]:
    """Parameter defaults of the template, as strings."""
    params = load_template(template).get("Parameters", {})
    return {k: str(v["Default"]) for k, v in params.items() if isinstance(v, dict) and "Default" in v}


def check_identity(sts: Any, region: str | None) -> Check:
    """Credentials work, and a region is set."""
    if not region:
        return Check("FAIL", "region", "no AWS region: set AWS_REGION, pass --region, or set one in `aws configure`")
    try:
        who = sts.get_caller_identity()
    except (ClientError, BotoCoreError) as err:
        return Check("FAIL", "credentials", aws_message(err) or str(err))
    return Check("ok", "credentials", f"account {who['Account']} as {who['Arn']}, region {region}")


def _quota_values(quotas: Any) -> dict[str, tuple[str, float]]:
    """Quota name -> (code, value) of every SageMaker quota: the applied ones over AWS's defaults."""
    found: dict[str, tuple[str, float]] = {}
    # Applied values first; a quota never raised may only be listed among the defaults.
    for operation in ("list_service_quotas", "list_aws_default_service_quotas"):
        for page in quotas.get_paginator(operation).paginate(ServiceCode="sagemaker"):
            for quota in page.get("Quotas", []):
                found.setdefault(quota["QuotaName"], (quota["QuotaCode"], float(quota.get("Value", 0))))
    return found


def check_quotas(quotas: Any, settings: Settings) -> list[Check]:
    """The training (spot or on-demand) and endpoint instance quotas cover what the parameters ask for."""
    try:
        values = _quota_values(quotas)
    except (ClientError, BotoCoreError) as err:
        return [Check("FAIL", "quotas", (aws_message(err) or str(err))
                      + " (preflight needs servicequotas:ListServiceQuotas)")]
    kind = "spot training job usage" if settings.spot else "training job usage"
    wanted = [
        (f"{settings.training_instance_type} for {kind}", settings.training_instance_count, "training"),
        (f"{settings.endpoint_instance_type} for endpoint usage", settings.endpoint_instances,
         "endpoint (auto-scaling maximum, or two fleets during a blue/green update)"),
    ]
    checks = []
    for name, need, what in wanted:
        if name not in values:
            checks.append(Check("FAIL", "quota", f"no SageMaker quota named '{name}' in {settings.region}: the "
                                                 "instance type is misspelt or not offered in this region"))
            continue
        code, value = values[name]
        if value >= need:
            checks.append(Check("ok", "quota", f"'{name}' is {value:g} ({what} needs {need})"))
        else:
            checks.append(Check("FAIL", "quota", f"'{name}' is {value:g} but {what} needs {need}: request it with "
                                                 f"`aws service-quotas request-service-quota-increase --service-code "
                                                 f"sagemaker --quota-code {code} --desired-value {need}`"))
    return checks


def check_image(ecr_for: Callable[[str], Any], label: str, uri: str | None, region: str | None) -> Check:
    """``uri`` names an image that exists in ECR, in the deployment's region."""
    if not uri:
        return Check("skip", label, "no URI given: `make images` prints them; pass --training-image-uri / "
                                    "--inference-image-uri, or --stack once deployed")
    match = ECR_URI.match(uri)
    if not match:
        return Check("FAIL", label, f"{uri} is not an ECR image URI "
                                    "(ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPO:TAG): push it with `make images`")
    if region and match["region"] != region:
        return Check("FAIL", label, f"{uri} is in {match['region']}, the stack deploys to {region}: SageMaker pulls "
                                    "from the same region; push it there with `make images`")
    image_id = {"imageDigest": match["digest"]} if match["digest"] else {"imageTag": match["tag"] or "latest"}
    try:
        ecr_for(match["region"]).describe_images(registryId=match["account"], repositoryName=match["repo"],
                                                 imageIds=[image_id])
    except ClientError as err:
        code = err.response["Error"]["Code"]
        if code == "RepositoryNotFoundException":
            return Check("FAIL", label, f"ECR repository {match['repo']} does not exist in {match['region']}: "
                                        "run `make images`")
        if code == "ImageNotFoundException":
            return Check("FAIL", label, f"{uri} is not in ECR: run `make images` and use the URI it prints")
        return Check("FAIL", label, aws_message(err) or str(err))
    except BotoCoreError as err:
        return Check("FAIL", label, aws_message(err) or str(err))
    return Check("ok", label, f"{uri} exists")


def check_subscription(sns: Any, topic_arn: str | None) -> Check:
    """The topic's e-mail subscriptions are confirmed."""
    if not topic_arn:
        return Check("skip", "e-mail", "not deployed yet: run again with --stack NAME after `make deploy`")
    subs = [s for page in sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic_arn)
            for s in page.get("Subscriptions", []) if s.get("Protocol") in ("email", "email-json")]
    if not subs:
        return Check("skip", "e-mail", "no e-mail subscribed (NotificationEmail is empty): nobody will hear of "
                                       "registered models or failures; redeploy with NotificationEmail=ADDRESS")
    pending = [s["Endpoint"] for s in subs if s.get("SubscriptionArn") == "PendingConfirmation"]
    if pending:
        return Check("FAIL", "e-mail", f"subscription of {', '.join(pending)} is pending: click 'Confirm "
                                       "subscription' in the e-mail from AWS Notifications (check spam); until then "
                                       "no notification arrives")
    return Check("ok", "e-mail", f"{', '.join(s['Endpoint'] for s in subs)} confirmed")


def run_checks(client: ClientFactory, settings: Settings, ecr_for: Callable[[str], Any] | None = None) -> list[Check]:
    """Every check, in order; stops after the first if the credentials do not work."""
    if not settings.region:
        return [check_identity(None, None)]
    checks = [check_identity(client("sts"), settings.region)]
    if checks[0].status == "FAIL":
        return checks
    topic_arn = None
    if settings.stack:
        try:
            stack = describe_stack(client("cloudformation"), settings.stack)
        except ToolError as err:
            checks.append(Check("FAIL", "stack", str(err)))
            stack = {}
        params = {p["ParameterKey"]: p.get("ParameterValue", "") for p in stack.get("Parameters", [])}
        outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
        topic_arn = outputs.get("NotificationTopicArn")
        settings.training_image_uri = settings.training_image_uri or params.get("TrainingImageUri")
        settings.inference_image_uri = settings.inference_image_uri or params.get("InferenceImageUri")
    checks += check_quotas(client("service-quotas"), settings)
    ecr_for = ecr_for or (lambda region: client("ecr"))
    checks.append(check_image(ecr_for, "training", settings.training_image_uri, settings.region))
    checks.append(check_image(ecr_for, "inference", settings.inference_image_uri, settings.region))
    checks.append(check_subscription(client("sns") if topic_arn else None, topic_arn))
    return checks


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r}: true or false")
    return text.lower() == "true"


def build_parser(defaults: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line; defaults are the template's parameter defaults."""
    d = template_defaults() if defaults is None else defaults
    parser = argparse.ArgumentParser(prog="python -m tools.preflight", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", help="deployed stack: read its image URIs and check its e-mail subscription")
    parser.add_argument("--region", help="AWS region (default: AWS_REGION or the profile's region)")
    parser.add_argument("--config-env", default="default",
                        help="samconfig.toml environment whose parameter_overrides apply (default: default)")
    parser.add_argument("--training-instance-type",
                        help=f"TrainingInstanceType (default: samconfig, else {d.get('TrainingInstanceType')})")
    parser.add_argument("--training-instance-count", type=int,
                        help=f"TrainingInstanceCount (default: {d.get('TrainingInstanceCount')})")
    parser.add_argument("--spot", type=_bool, metavar="true|false",
                        help=f"UseSpotTraining: check the spot quota, not on-demand (default: "
                             f"{d.get('UseSpotTraining')})")
    parser.add_argument("--endpoint-instance-type",
                        help=f"EndpointInstanceType (default: {d.get('EndpointInstanceType')})")
    parser.add_argument("--training-image-uri", help="TrainingImageUri to look up in ECR (`make images` prints it)")
    parser.add_argument("--inference-image-uri", help="InferenceImageUri to look up in ECR")
    return parser


def settings_from(args: argparse.Namespace, region: str | None, defaults: dict[str, str],
                  overrides: dict[str, str]) -> Settings:
    """Flags over samconfig's parameter_overrides over the template's defaults."""
    def value(key: str) -> str:
        return overrides.get(key, defaults.get(key, ""))

    initial = int(value("EndpointInitialInstanceCount") or 1)
    return Settings(
        region=region,
        training_instance_type=args.training_instance_type or value("TrainingInstanceType"),
        training_instance_count=args.training_instance_count or int(value("TrainingInstanceCount") or 1),
        spot=args.spot if args.spot is not None else value("UseSpotTraining").lower() == "true",
        endpoint_instance_type=args.endpoint_instance_type or value("EndpointInstanceType"),
        endpoint_instances=max(int(value("EndpointMaxInstances") or 1), 2 * initial),
        training_image_uri=args.training_image_uri or overrides.get("TrainingImageUri"),
        inference_image_uri=args.inference_image_uri or overrides.get("InferenceImageUri"),
        stack=args.stack,
    )


def main(argv: list[str] | None = None, *, session: Any = None) -> int:
    """Command-line entry point; ``session`` (a boto3 Session) is for tests."""
    defaults = template_defaults()
    args = build_parser(defaults).parse_args(argv)

    def body() -> int:
        sess = session or boto3.Session(region_name=region(args.region))
        overrides = samconfig_parameters(REPO / "samconfig.toml", args.config_env)
        settings = settings_from(args, sess.region_name, defaults, overrides)

        def client(name: str) -> Any:
            return sess.client(name, region_name=settings.region)

        checks = run_checks(client, settings, lambda region: sess.client("ecr", region_name=region))
        for check in checks:
            print(check.line())
        failed = [c for c in checks if c.status == "FAIL"]
        if failed:
            sys.stderr.write(f"error: {len(failed)} check(s) failed; fix them before deploying or training\n")
            return 1
        return 0

    return run_main(body)


if __name__ == "__main__":
    raise SystemExit(main())
