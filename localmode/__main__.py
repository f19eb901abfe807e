"""``python -m localmode run``: the retraining pipeline end to end on this machine.

Uploads the bundled dermoscopy sample through the data bucket (so every image is validated by the real handler),
asks for a retraining the way an operator would (a ``RetrainingRequested`` event), follows the execution state by
state while the training job runs for real on the CPU, and ends with a summary.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO, cast

import boto3

from lesion_common.manifest import VALIDATED
from localmode.cloud import REGION, REPO_ROOT, LocalCloud
from localmode.iam import summary as iam_summary
from localmode.report import write_report
from tools.cli import ToolError, fail
from tools.upload_dataset import ALL_CODES, check_labels, find_images, upload_dataset

DEFAULT_DATA = REPO_ROOT / "data" / "sample"


def say(text: str) -> None:
    """Progress goes to the real stdout: handlers' stdout is redirected to their log while they run."""
    out = cast(TextIO, sys.__stdout__)  # None only without a console, which `python -m localmode` always has
    out.write(text + "\n")
    out.flush()


class _Follower:
    """Prints state transitions and the training job's epoch lines as they happen."""

    def __init__(self, cloud: LocalCloud, started: float):
        self.cloud = cloud
        self.started = started
        self.entered: dict[str, float] = {}
        self.log_offsets: dict[Path, int] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        t = time.monotonic() - self.started
        if kind.endswith("StateEntered"):
            name = event["stateEnteredEventDetails"]["name"]
            self.entered[name] = time.monotonic()
            say(f"[{t:6.1f}s] -> {name}")
        elif kind.endswith("StateExited"):
            name = event["stateExitedEventDetails"]["name"]
            took = time.monotonic() - self.entered.get(name, time.monotonic())
            say(f"[{t:6.1f}s]    {name} done ({took:.1f}s)")
        elif kind in ("TaskFailed", "LambdaFunctionFailed", "ExecutionFailed"):
            details: dict[str, Any] = next((v for k, v in event.items() if k.endswith("EventDetails")), {})
            say(f"[{t:6.1f}s]    ! {kind}: {details.get('error', '')} {str(details.get('cause', ''))[:300]}")

    def training_lines(self) -> None:
        for runner in self.cloud.runners:
            path = runner.root / "training.log"
            if not path.exists():
                continue
            with path.open() as fh:
                fh.seek(self.log_offsets.get(path, 0))
                for line in fh:
                    if line.startswith(("epoch", "[epoch", "Epoch")) or "images/s" in line:
                        say(f"           training | {line.rstrip()[:150]}")
                self.log_offsets[path] = fh.tell()


def run(data: Path, metadata: Path | None, work_dir: Path, parameters: dict[str, str], serve: bool = False) -> int:
    """Run the whole pipeline once; return 0 when the execution succeeded."""
    t0 = time.monotonic()
    metadata = metadata or next(iter(sorted(data.glob("*.csv"))), None)
    images = data / "images" if (data / "images").is_dir() else data
    say("Local mode: template.yaml deployed in-process (moto), handlers and ASL as on AWS, training on the CPU.")
    with LocalCloud(work_dir=work_dir, parameters=parameters) as cloud:
        statuses = _upload(cloud, images, metadata)
        if not statuses.get(VALIDATED):
            # Nothing to train on: the retraining would only take its not-enough-data branch and "succeed".
            return fail(f"no image under {images} passed validation ({json.dumps(statuses)}); the reasons are in "
                        f"{cloud.runtime.log_path}")

        retraining = _retrain(cloud)
        if retraining is None:
            return 1
        arn, desc = retraining
        output = json.loads(desc.get("output") or "{}")
        registration = output.get("registration", {}).get("result", {})

        deployment = _deploy(cloud, registration)
        invocation = _try_endpoint(cloud, data) if deployment.get("status") == "SUCCEEDED" else None
        drift, quality = _monitor(cloud, data, metadata) if invocation else (None, None)
        report = write_report(work_dir / "report", drift_result=drift, quality_result=quality,
                              executions=[d for d in (desc, deployment) if d],
                              drift_threshold=float(cloud.resolver.parameters["DriftThreshold"]))

        _say_retraining(cloud, desc, output)
        _say_deployment(cloud, deployment, invocation, drift, quality)
        say(f"    monitoring report: {report}")
        for note in cloud.read_notifications():
            # the subject and the message's first line (the whole text is in last-run.json)
            first = (note["message"].strip().splitlines() or [""])[0]
            say(f"    notification     : {note['subject']}: {first[:200]}")
        say(f"    handler logs     : {cloud.runtime.log_path}")
        say(f"    permissions      : {iam_summary(cloud.iam)}")
        (work_dir / "last-run.json").write_text(json.dumps({
            "status": desc["status"], "execution": arn, "output": output,
            "deployment": {k: deployment.get(k) for k in ("status", "error", "cause", "output")},
            "invocation": invocation, "notifications": cloud.notifications,
            "seconds": round(time.monotonic() - t0, 1),
        }, indent=2, default=str))
        ok = desc["status"] == "SUCCEEDED" and (not deployment or deployment["status"] == "SUCCEEDED")
        if ok and not registration:
            # The not-enough-data branch ends the execution in a Succeed state, but no model came of it.
            summary = output.get("data", {}).get("result", {}).get("summary", "")
            fail(f"the retraining trained no model (not enough data): {summary}")
            ok = False
        say(f"Done in {time.monotonic() - t0:.0f}s.")
        if ok and invocation and serve:
            say(f"Serving {cloud.output('EndpointName')} at {invocation['url']} (POST /invocations); Ctrl-C stops.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0 if ok else 1


def _upload(cloud: LocalCloud, images: Path, metadata: Path | None) -> dict[str, int]:
    """Step 1: upload the images (each upload triggers validation); return the manifest's count per status."""
    bucket = cloud.output("DataBucketName")
    s3 = boto3.client("s3", region_name=REGION)
    say(f"1/4 Uploading {images} to s3://{bucket}/incoming/ (each upload triggers validation)...")
    uploaded = upload_dataset(s3, bucket, images, metadata, dataset="sample", progress=sys.stderr.isatty())
    cloud.bus.drain()
    table = boto3.resource("dynamodb", region_name=REGION).Table(cloud.output("ManifestTableName"))
    statuses: dict[str, int] = {}
    for item in table.scan()["Items"]:
        statuses[str(item.get("status"))] = statuses.get(str(item.get("status")), 0) + 1
    say(f"    uploaded {uploaded.uploaded} objects; manifest: {json.dumps(statuses)}")
    return statuses


def _retrain(cloud: LocalCloud) -> tuple[str, dict[str, Any]] | None:
    """Step 2: request a retraining and follow it; its execution ARN and final description (None: none started)."""
    say("2/4 Requesting a retraining (EventBridge RetrainingRequested -> RetrainingStateMachine)...")
    source = f"{cloud.resolver.parameters['ProjectName']}.pipeline"
    boto3.client("events", region_name=REGION).put_events(Entries=[{
        "Source": source, "DetailType": "RetrainingRequested",
        "Detail": json.dumps({"reason": "make run: local demo", "requestedBy": getpass.getuser()}),
    }])
    cloud.bus.drain()
    sfn = boto3.client("stepfunctions", region_name=REGION)
    machine = cloud.output("RetrainingStateMachineArn")
    executions = sfn.list_executions(stateMachineArn=machine)["executions"]
    if not executions:
        say("    no execution started: the Manual rule did not match (see .local/logs)")
        return None
    arn = executions[0]["executionArn"]
    follower = _Follower(cloud, time.monotonic())
    say(f"    execution {arn.rsplit(':', 1)[-1]}")
    desc = cloud.wait_for_execution(arn, timeout=3600, on_event=follower, on_poll=follower.training_lines)
    follower.training_lines()
    return arn, desc


def _deploy(cloud: LocalCloud, registration: dict[str, Any]) -> dict[str, Any]:
    """Step 3: follow the deployment an approved model starts; its final description ({} when none ran)."""
    if registration.get("approvalStatus") != "Approved":
        return {}
    say("3/4 Deploying the approved model (Model Package State Change -> DeploymentStateMachine)...")
    cloud.bus.drain()
    sfn = boto3.client("stepfunctions", region_name=REGION)
    deployments = sfn.list_executions(stateMachineArn=cloud.output("DeploymentStateMachineArn"))["executions"]
    if not deployments:
        return {}
    deployment: dict[str, Any] = cloud.wait_for_execution(deployments[0]["executionArn"], timeout=1200,
                                                          on_event=_Follower(cloud, time.monotonic()))
    return deployment


def _say_retraining(cloud: LocalCloud, desc: dict[str, Any], output: dict[str, Any]) -> None:
    """Step 4, first half: the retraining's outcome, model package and test metrics."""
    registration = output.get("registration", {}).get("result", {})
    say("4/4 Summary")
    say(f"    retraining       : {desc['status']}")
    if desc["status"] != "SUCCEEDED":
        say(f"    error            : {desc.get('error')}: {str(desc.get('cause'))[:500]}")
    evaluation = output.get("evaluation", {}).get("result", {})
    if registration:
        say(f"    model package    : {registration['modelPackageArn']} "
            f"(version {registration['modelPackageVersion']}, {registration['approvalStatus']})")
    if evaluation:
        say("    test metrics     : " + ", ".join(f"{k} {v:.3f}" for k, v in evaluation["metrics"].items()))
        if evaluation.get("baseline"):
            say("    current model    : " + ", ".join(f"{k} {v:.3f}" for k, v in evaluation["baseline"].items()))
        say(f"    model artifacts  : {evaluation['modelDataUrl']}")
    for runner in cloud.runners:
        say(f"    job directory    : {runner.root} (model/, output/, training.log)")


def _say_deployment(cloud: LocalCloud, deployment: dict[str, Any], invocation: dict[str, Any] | None,
                    drift: dict[str, Any] | None, quality: dict[str, Any] | None) -> None:
    """Step 4, second half: the deployment, the endpoint's answer, drift and live quality."""
    if deployment:
        say(f"    deployment       : {deployment['status']}"
            + (f" ({deployment.get('error')}: {str(deployment.get('cause'))[:300]})"
               if deployment["status"] != "SUCCEEDED" else ""))
    if invocation:
        say(f"    endpoint         : {cloud.output('EndpointName')} at {invocation['url']}")
        say(f"    sample answer    : {invocation['summary']}")
    if drift and drift.get("drift_score") is not None:
        say(f"    drift            : DriftScore {drift['drift_score']:.2f} over {drift['n_records']} captured "
            f"predictions ({'drift' if drift['drifted'] else 'no drift'} at alpha {drift['alpha']})")
    elif drift:
        say(f"    drift            : {drift.get('reason') or drift.get('errorMessage') or drift}"[:300])
    if quality:
        say(f"    live quality     : {_quality_line(quality)}")


def _monitor(cloud: LocalCloud, data: Path, metadata: Path | None,
             limit: int = 120) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Send a window of images through the endpoint, run the hourly drift check on what was captured, then upload
    the window's confirmed diagnoses as ground truth (as a clinic would), which starts the live-quality check.

    The container writes its monitoring records locally; on AWS they reach S3 through Data Capture, here they are
    uploaded under ``monitoring/records/``, where detect_drift and evaluate_quality also look.
    """
    images = sorted((data / "images" if (data / "images").is_dir() else data).glob("*.jpg"))
    step = max(1, len(images) // limit)
    runtime = boto3.client("sagemaker-runtime", region_name=REGION)
    sent = images[::step][:limit]
    for path in sent:
        runtime.invoke_endpoint(EndpointName=cloud.output("EndpointName"), ContentType="image/jpeg",
                                Accept="application/json", Body=path.read_bytes(), InferenceId=path.stem)
    s3 = boto3.client("s3", region_name=REGION)
    for capture in sorted(cloud.capture_dir.glob("*.jsonl")):
        s3.upload_file(str(capture), cloud.output("ArtifactsBucketName"), f"monitoring/records/{capture.name}")
    drift_fn = cloud.runtime.find("DetectDriftFunction")
    # A scheduled event's time (the window's exclusive end) has whole seconds: without the wait, the predictions of
    # the last second (most of them: the 80 answers take about a second) would fall after it.
    time.sleep(1.0)
    cloud.bus.fire_schedule("DetectDriftFunctionHourly", account="123456789012", region=REGION)
    last = drift_fn.invocations[-1] if drift_fn.invocations else {}
    result: dict[str, Any] | None = last.get("result") if last.get("ok") else last.get("error")
    return result, _ground_truth(cloud, metadata, {p.stem for p in sent})


def _ground_truth(cloud: LocalCloud, metadata: Path | None, ids: set[str]) -> dict[str, Any] | None:
    """Upload the diagnoses of the images sent as ``ground-truth/*.csv``; return evaluate_quality's answer."""
    import csv
    import io

    if metadata is None or not metadata.is_file():
        return None
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["inference_id", "diagnosis"])
    with metadata.open(newline="") as fh:
        rows = [(r["image_id"], r["dx"]) for r in csv.DictReader(fh) if r.get("image_id") in ids and r.get("dx")]
    if not rows:
        return None
    writer.writerows(rows)
    boto3.client("s3", region_name=REGION).put_object(
        Bucket=cloud.output("DataBucketName"), Key="ground-truth/make-run.csv", Body=out.getvalue().encode())
    cloud.bus.drain()
    quality_fn = cloud.runtime.find("EvaluateQualityFunction")
    last = quality_fn.invocations[-1] if quality_fn.invocations else {}
    result: dict[str, Any] | None = last.get("result") if last.get("ok") else last.get("error")
    return result


def _quality_line(quality: dict[str, Any]) -> str:
    """evaluate_quality's answer in one line (or why it failed)."""
    q = quality.get("quality")
    if not isinstance(q, dict):
        return str(quality.get("errorMessage") or quality)[:300]

    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else "n/a"

    return (f"balanced accuracy {fmt(q.get('balanced_accuracy'))}, melanoma sensitivity "
            f"{fmt(q.get('melanoma_sensitivity'))} over {q.get('n')} labelled predictions "
            f"({q.get('melanoma_cases')} melanomas)")


def _try_endpoint(cloud: LocalCloud, data: Path) -> dict[str, Any] | None:
    """Send one bundled image through sagemaker-runtime, as a client of the real endpoint would."""
    images = sorted((data / "images" if (data / "images").is_dir() else data).glob("*.jpg"))
    if not images:
        return None
    name = cloud.output("EndpointName")
    answer = boto3.client("sagemaker-runtime", region_name=REGION).invoke_endpoint(
        EndpointName=name, ContentType="image/jpeg", Accept="application/json", Body=images[0].read_bytes())
    body = json.loads(answer["Body"].read())
    prediction = body["predictions"][0] if isinstance(body, dict) and body.get("predictions") else body
    top = prediction.get("predicted_class")
    prob = prediction.get("probabilities", {}).get(top)
    summary = f"{images[0].name} -> {top}" + (f" ({prob:.2f})" if isinstance(prob, float) else "")
    return {"url": cloud.endpoints.get(name).url, "image": images[0].name, "summary": summary,
            "answer": prediction}


def check_data(data: Path, metadata: Path | None) -> None:
    """Refuse, before anything starts, a ``--data`` folder that cannot give a retraining anything to train on.

    Raises
    ------
    ToolError
        The folder is missing or holds no images, or the label file is missing or of neither format.
    """
    if not data.is_dir():
        raise ToolError(f"--data {data} is not a folder" if data.exists() else f"--data {data} does not exist")
    images = data / "images" if (data / "images").is_dir() else data
    metadata = metadata or next(iter(sorted(data.glob("*.csv"))), None)
    files = find_images(images)
    if metadata is None and not any(p.parent != images and p.parent.name.lower() in ALL_CODES for p in files):
        raise ToolError(f"no metadata CSV in {data}: put the HAM10000 or ISIC 2019 label CSV there, or pass "
                        "--metadata")
    check_labels(files, images, metadata)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    import logging
    import warnings

    # moto logs every failed state at WARNING and Powertools warns about empty metric sets: the run's own
    # output says what failed, and the handlers' logs are in .local/logs.
    logging.getLogger("moto").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="No application metrics to publish")
    parser = argparse.ArgumentParser(prog="python -m localmode", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the retraining pipeline end to end on bundled data")
    run_p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with images/ and a metadata CSV")
    run_p.add_argument("--metadata", type=Path, help="metadata CSV (default: the first *.csv in --data)")
    run_p.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".local",
                       help="where local mode keeps its state, logs and report (default: .local)")
    run_p.add_argument("--serve", action="store_true", help="keep the local endpoint serving until Ctrl-C")
    run_p.add_argument("--parameter", action="append", default=[], metavar="KEY=VALUE",
                       help="template parameter override (repeatable)")
    up_p = sub.add_parser("up", help="deploy the stack locally and serve it over HTTP for the AWS CLI and boto3 "
                                     "until Ctrl-C")
    up_p.add_argument("--port", type=int, default=4566, help="TCP port on 127.0.0.1 (default 4566; 0: any free one)")
    loaded = up_p.add_mutually_exclusive_group()
    loaded.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder with images/ and a metadata CSV, uploaded at start (default: data/sample)")
    loaded.add_argument("--no-sample", action="store_true", help="start with empty buckets and tables")
    up_p.add_argument("--metadata", type=Path, help="metadata CSV (default: the first *.csv in --data)")
    up_p.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".local" / "up",
                      help="where job directories and logs go (default: .local/up)")
    up_p.add_argument("--parameter", action="append", default=[], metavar="KEY=VALUE",
                      help="template parameter override (repeatable); AutoApprove defaults to false here")
    up_p.add_argument("--no-schedules", action="store_true",
                      help="fire schedule rules only on demand (`python -m localmode fire RULE`)")
    up_p.add_argument("--template", type=Path, help=argparse.SUPPRESS)
    fire_p = sub.add_parser("fire", help="fire a schedule rule (e.g. DetectDriftFunctionHourly) on a running `up`")
    fire_p.add_argument("rule", help="the rule's name, as GET /_localmode/resources lists it under schedules")
    fire_p.add_argument("--port", type=int, default=4566, help="the port `up` listens on (default 4566)")
    args = parser.parse_args(argv)
    parameters = dict(p.split("=", 1) for p in args.parameter) if "parameter" in args else {}
    if args.command == "fire":
        from localmode.server import fire_remote

        return fire_remote(args.rule, args.port)
    if args.command == "up":
        from localmode.server import up

        logging.basicConfig(level=logging.WARNING, stream=sys.__stderr__, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        data = None if args.no_sample else args.data
        try:
            if data is not None:
                check_data(data, args.metadata)
        except ToolError as err:
            return fail(str(err))
        return up(args.port, args.work_dir.resolve(), {"AutoApprove": "false", **parameters}, data, args.metadata,
                  schedules=not args.no_schedules, template=args.template)
    try:
        check_data(args.data, args.metadata)
    except ToolError as err:
        return fail(str(err))
    return run(args.data, args.metadata, args.work_dir, parameters, serve=args.serve)


if __name__ == "__main__":
    raise SystemExit(main())
