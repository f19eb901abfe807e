"""SageMaker training jobs, executed for real: the training image's entry point in a subprocess under the
container contract, its results reported as DescribeTrainingJob and the state-change events would report them.

Where moto's answers differ from SageMaker's for the calls the pipeline makes, the patched calls answer as SageMaker
does (docs/local-mode.md has the table): an unknown job is ``ValidationException`` "Requested resource not found.",
a taken name is ``ResourceInUse``, a volume key on an instance with NVMe instance storage is rejected, and
StopTrainingJob (which moto lacks) stops the subprocess and ends the job ``Stopped``."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3

from localmode import iam

log = logging.getLogger("localmode.sagemaker")

TERMINAL = ("Completed", "Failed", "Stopped")
# SageMaker gives the algorithm 120 s after SIGTERM; locally the process is killed sooner.
STOP_GRACE_SECONDS = 20.0
# DescribeTrainingJob/StopTrainingJob for a name no job has (boto/boto3#2808, aws/aws-sdk#165).
NOT_FOUND_MESSAGE = "Requested resource not found."


def _has_local_nvme(instance_type: str) -> bool:
    """The stack's table of instance types with NVMe instance storage (lesion_common.instances, the layer)."""
    from lesion_common.instances import has_local_nvme

    return bool(has_local_nvme(instance_type))


def _kill_if_running(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()


def name_taken_message(arn: str) -> str:
    """CreateTrainingJob's ResourceInUse message for a name already used (as SageMaker words it)."""
    return ("Training job names must be unique within an AWS account and region, and a training job with this name "
            f"already exists ({arn})")


def volume_key_message(instance_type: str) -> str:
    """CreateTrainingJob's ValidationException for VolumeKmsKeyId on an instance with local NVMe storage.

    The rule is botocore's documentation of ResourceConfig.VolumeKmsKeyId; the wording is local mode's closest
    rendering (unconfirmed: no published copy of SageMaker's exact message was found).
    """
    return (f"VolumeKmsKeyId is not supported for instance type {instance_type}: its local instance storage is "
            "encrypted by a hardware module on the instance. Remove VolumeKmsKeyId from ResourceConfig.")


def _s3_split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _jsonable(value: Any) -> Any:
    """The event's detail carries times as epoch milliseconds, as SageMaker's events do."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


class TrainingJobRunner:
    """Runs one training job in a job directory laid out like ``/opt/ml``.

    Parameters
    ----------
    job : moto FakeTrainingJob
        The job moto recorded; this runner updates its status, metrics and failure reason in place.
    request : dict
        The CreateTrainingJob request as the caller sent it.
    work_dir : Path
        Where ``<job name>/`` (the job's ``/opt/ml``) is created.
    repo_root : Path
        Holds ``training_image/train.py``, run with the repository on ``PYTHONPATH``.
    emit : callable
        ``emit(detail)`` publishes a ``SageMaker Training Job State Change`` event with that detail.
    """

    def __init__(self, job: Any, request: dict[str, Any], work_dir: Path, repo_root: Path,
                 emit: Callable[[dict[str, Any]], None], s3_endpoint: Any = None,
                 command: list[str] | None = None):
        self.job = job
        self.request = request
        self.name: str = request["TrainingJobName"]
        self.root = work_dir / self.name
        self.repo_root = repo_root
        self.emit = emit
        self.s3 = boto3.client("s3")
        self.metric_definitions = request["AlgorithmSpecification"].get("MetricDefinitions", [])
        self.metrics: dict[str, float] = {}
        # SageMaker runs ``<image> train``; here the image's entry point (tests may give a tiny stand-in).
        self.command = command or [sys.executable, str(repo_root / "training_image" / "train.py"), "train"]
        self.proc: subprocess.Popen[str] | None = None
        self.stop_requested = threading.Event()
        self._lock = threading.Lock()
        # The job reads its channels and writes its artefacts with the role passed to CreateTrainingJob.
        self.thread = threading.Thread(target=iam.run_as_role_arn(request.get("RoleArn"), self.run),
                                       name=f"training-{self.name}", daemon=True)

    def stop(self) -> None:
        """StopTrainingJob: Stopping now, SIGTERM to the algorithm, killed after the grace period, then Stopped."""
        with self._lock:
            if self.job.training_job_status != "InProgress" or self.stop_requested.is_set():
                return
            self.stop_requested.set()
            self._set_status("Stopping", "Stopping", "Stopping the training job")
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            threading.Timer(STOP_GRACE_SECONDS, _kill_if_running, args=(proc,)).start()

    # ----------------------------------------------------------------- status
    def _set_status(self, status: str, secondary: str, message: str) -> None:
        now = datetime.now(UTC)
        transitions = self.job.secondary_status_transitions
        if transitions and "EndTime" not in transitions[-1]:
            transitions[-1]["EndTime"] = now
        transitions.append({"Status": secondary, "StartTime": now, "StatusMessage": message})
        self.job.training_job_status = status
        self.job.secondary_status = secondary
        self.job.last_modified_time = now
        if status in TERMINAL:
            transitions[-1]["EndTime"] = now
            self.job.training_end_time = now
        self.emit(_jsonable(self.job.response_object))

    # ----------------------------------------------------------------- channels
    def _download_prefix(self, uri: str, dest: Path) -> int:
        bucket, prefix = _s3_split(uri)
        count = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):].lstrip("/") or Path(obj["Key"]).name
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                self.s3.download_file(bucket, obj["Key"], str(target))
                count += 1
        return count

    def _download_manifest(self, uri: str, dest: Path) -> int:
        bucket, key = _s3_split(uri)
        entries = json.loads(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        prefix_bucket, prefix_key = _s3_split(entries[0]["prefix"])
        for rel in entries[1:]:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(prefix_bucket, prefix_key + rel, str(target))
        return len(entries) - 1

    def _lay_out(self) -> dict[str, str]:
        """Write the job directory and return the environment the container would see."""
        if self.root.exists():
            shutil.rmtree(self.root)
        config = self.root / "input" / "config"
        config.mkdir(parents=True)
        for sub in ("model", "output/data", "checkpoints", "code"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        hps = {k: str(v) for k, v in self.request.get("HyperParameters", {}).items()}
        (config / "hyperparameters.json").write_text(json.dumps(hps))
        channels = self.request.get("InputDataConfig", [])
        (config / "inputdataconfig.json").write_text(json.dumps({
            c["ChannelName"]: {
                "ContentType": c.get("ContentType", "application/octet-stream"),
                "TrainingInputMode": "File",
                "S3DistributionType": c["DataSource"]["S3DataSource"].get("S3DataDistributionType", "FullyReplicated"),
                "RecordWrapperType": "None",
            }
            for c in channels
        }))
        (config / "resourceconfig.json").write_text(json.dumps(
            {"current_host": "algo-1", "hosts": ["algo-1"], "network_interface_name": "eth0"}))
        env = {
            "SM_BASE_DIR": str(self.root),
            "SM_MODEL_DIR": str(self.root / "model"),
            "SM_OUTPUT_DIR": str(self.root / "output"),
            "SM_OUTPUT_DATA_DIR": str(self.root / "output" / "data"),
            "SM_INPUT_DIR": str(self.root / "input"),
            "SM_INPUT_CONFIG_DIR": str(config),
            "SM_CHECKPOINT_DIR": str(self.root / "checkpoints"),
            "SM_HPS": json.dumps(hps),
            "SM_HOSTS": json.dumps(["algo-1"]),
            "SM_CURRENT_HOST": "algo-1",
            "SM_NUM_GPUS": "0",
            "SM_NUM_CPUS": str(os.cpu_count() or 1),
            "SM_CHANNELS": json.dumps([c["ChannelName"] for c in channels]),
            "SM_TRAINING_JOB_NAME": self.name,
        }
        for channel in channels:
            name = channel["ChannelName"]
            source = channel["DataSource"]["S3DataSource"]
            dest = self.root / "input" / "data" / name
            dest.mkdir(parents=True, exist_ok=True)
            if source["S3DataType"] == "ManifestFile":
                n = self._download_manifest(source["S3Uri"], dest)
            else:
                n = self._download_prefix(source["S3Uri"], dest)
            log.info("channel %s: %d files", name, n)
            env[f"SM_CHANNEL_{name.upper()}"] = str(dest)
        return env

    # ----------------------------------------------------------------- run
    def _parse_metrics(self, line: str) -> None:
        for definition in self.metric_definitions:
            match = re.search(definition["Regex"], line)
            if match:
                try:
                    self.metrics[definition["Name"]] = float(match.group(1))
                except ValueError:
                    continue

    def _upload_dir_as_tar(self, src: Path, uri: str) -> None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for path in sorted(src.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(src)), recursive=False)
        bucket, key = _s3_split(uri)
        self.s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())

    def _sync_checkpoints(self) -> None:
        """SageMaker copies the checkpoint directory to S3 as it changes; here, once at the end."""
        config = self.request.get("CheckpointConfig")
        if not config:
            return
        bucket, prefix = _s3_split(config["S3Uri"])
        local = self.root / "checkpoints"
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            self.s3.upload_file(str(path), bucket, prefix.rstrip("/") + "/" + str(path.relative_to(local)))

    def run(self) -> None:
        """Execute the job to a terminal state; never raises (failures become FailureReason)."""
        start = time.time()
        try:
            self._set_status("InProgress", "Downloading", "Downloading input data")
            # The image's PYTHONPATH (training_image/Dockerfile): the repository and the common layer.
            pythonpath = os.pathsep.join((str(self.repo_root), str(self.repo_root / "layers" / "common")))
            env = {**os.environ, **self._lay_out(), "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
            if self.stop_requested.is_set():
                self._end_stopped(start)
                return
            self._set_status("InProgress", "Training", "Training image download completed. Training in progress.")
            max_runtime = self.request.get("StoppingCondition", {}).get("MaxRuntimeInSeconds", 86400)
            log_path = self.root / "training.log"
            self.job.training_start_time = datetime.now(UTC)
            with log_path.open("w") as log_file:
                with self._lock:
                    if self.stop_requested.is_set():
                        self._end_stopped(start)
                        return
                    proc = self.proc = subprocess.Popen(
                        self.command,
                        cwd=self.repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                    )
                assert proc.stdout is not None
                timer = threading.Timer(max_runtime, proc.kill)
                timer.start()
                for line in proc.stdout:
                    log_file.write(line)
                    log_file.flush()
                    self._parse_metrics(line)
                rc = proc.wait()
                timer.cancel()
            self.job.final_metric_data_list = [
                {"MetricName": k, "Value": v, "Timestamp": datetime.now(UTC)} for k, v in self.metrics.items()
            ]
            self.job.algorithm_specification["MetricDefinitions"] = self.metric_definitions
            self._sync_checkpoints()
            elapsed = int(time.time() - start)
            self.job.training_time_in_seconds = elapsed
            self.job.billable_time_in_seconds = elapsed
            if self.stop_requested.is_set():
                self._end_stopped(start)
                return
            failure_file = self.root / "output" / "failure"
            if rc != 0:
                if failure_file.exists() and failure_file.read_text().strip():
                    reason = failure_file.read_text().strip().splitlines()[0]
                elif time.time() - start >= max_runtime:
                    reason = f"MaxRuntimeExceeded: the job ran past {max_runtime} s"
                else:
                    reason = f"AlgorithmError: the training process exited with code {rc}; see {log_path}"
                self.job.failure_reason = reason[:1024]
                self._set_status("Failed", "Failed", "Training job failed")
                return
            self._set_status("InProgress", "Uploading", "Uploading generated training model")
            out_prefix = f"{self.request['OutputDataConfig']['S3OutputPath'].rstrip('/')}/{self.name}/output"
            self._upload_dir_as_tar(self.root / "model", f"{out_prefix}/model.tar.gz")
            self._upload_dir_as_tar(self.root / "output" / "data", f"{out_prefix}/output.tar.gz")
            self.job.model_artifacts = {"S3ModelArtifacts": f"{out_prefix}/model.tar.gz"}
            self._set_status("Completed", "Completed", "Training job completed")
        except Exception as err:  # noqa: BLE001 - whatever breaks, the job must end with a reason
            log.exception("training job %s broke", self.name)
            self.job.failure_reason = f"InternalServerError: local runner: {type(err).__name__}: {err}"[:1024]
            self._set_status("Failed", "Failed", "Training job failed")

    def _end_stopped(self, start: float) -> None:
        elapsed = int(time.time() - start)
        self.job.training_time_in_seconds = elapsed
        self.job.billable_time_in_seconds = elapsed
        self._set_status("Stopped", "Stopped", "Training job stopped")


def install(work_dir: Path, repo_root: Path, emit: Callable[[dict[str, Any]], None],
            runners: list[TrainingJobRunner], command: list[str] | None = None) -> Callable[[], None]:
    """Make moto's training-job calls behave as SageMaker's: CreateTrainingJob starts a real run,
    DescribeTrainingJob and StopTrainingJob answer as SageMaker does; returns the function that undoes it.

    Parameters
    ----------
    command : list of str, optional
        The training process to run instead of ``training_image/train.py train`` (tests use a tiny stand-in).
    """
    from moto.sagemaker.exceptions import ResourceInUseException, ValidationError
    from moto.sagemaker.models import FakeTrainingJob, SageMakerModelBackend
    from moto.sagemaker.responses import SageMakerResponse

    original_create = SageMakerModelBackend.create_training_job
    original_describe = SageMakerModelBackend.describe_training_job
    by_name: dict[tuple[str, str, str], TrainingJobRunner] = {}

    def create_training_job(self: Any, **kwargs: Any) -> Any:
        name = kwargs["training_job_name"]
        if name in self.training_jobs:
            raise ResourceInUseException(message=name_taken_message(self.training_jobs[name].arn))
        resource = kwargs.get("resource_config") or {}
        if resource.get("VolumeKmsKeyId") and _has_local_nvme(resource.get("InstanceType", "")):
            raise ValidationError(message=volume_key_message(resource["InstanceType"]))
        definitions = list(kwargs["algorithm_specification"].get("MetricDefinitions", []))
        job = original_create(self, **kwargs)
        job.algorithm_specification["MetricDefinitions"] = definitions
        job.training_job_status = "InProgress"
        job.secondary_status = "Starting"
        job.final_metric_data_list = []
        job.training_end_time = None  # type: ignore[assignment]  # moto's annotation; AWS has none until the end
        # moto invents an artifact location at once; SageMaker has none until the job uploads it.
        job.model_artifacts = None  # type: ignore[assignment]
        request = {
            "TrainingJobName": name,
            "HyperParameters": kwargs["hyper_parameters"],
            "AlgorithmSpecification": {**kwargs["algorithm_specification"], "MetricDefinitions": definitions},
            "InputDataConfig": kwargs["input_data_config"],
            "OutputDataConfig": kwargs["output_data_config"],
            "ResourceConfig": resource,
            "StoppingCondition": kwargs["stopping_condition"] or {},
            "CheckpointConfig": kwargs["checkpoint_config"],
            "RoleArn": kwargs.get("role_arn"),
        }
        runner = TrainingJobRunner(job, request, work_dir, repo_root, emit, command=command)
        runners.append(runner)
        by_name[(self.account_id, self.region_name, name)] = runner
        runner.thread.start()
        return job

    def describe_training_job(self: Any, training_job_name: str) -> dict[str, Any]:
        if training_job_name not in self.training_jobs:
            raise ValidationError(message=NOT_FOUND_MESSAGE)
        response: dict[str, Any] = original_describe(self, training_job_name)
        return response

    def stop_training_job(self: Any, training_job_name: str) -> None:
        job: FakeTrainingJob | None = self.training_jobs.get(training_job_name)
        if job is None:
            raise ValidationError(message=NOT_FOUND_MESSAGE)
        if job.training_job_status != "InProgress":
            # Wording unconfirmed; the condition (only an InProgress job can be stopped) is SageMaker's.
            raise ValidationError(message=f"The request was rejected because the training job is in status "
                                          f"{job.training_job_status}.")
        runner = by_name.get((self.account_id, self.region_name, training_job_name))
        if runner is None:
            job.training_job_status = job.secondary_status = "Stopped"
            return
        threading.Thread(target=runner.stop, name=f"stop-{training_job_name}", daemon=True).start()
        deadline = time.monotonic() + 5
        while job.training_job_status == "InProgress" and time.monotonic() < deadline:
            time.sleep(0.01)  # the call returns once the job is Stopping, as SageMaker's does

    def stop_training_job_response(handler: Any) -> Any:
        from moto.core.responses import EmptyResult

        handler.sagemaker_backend.stop_training_job(handler._get_param("TrainingJobName"))
        return EmptyResult()

    SageMakerModelBackend.create_training_job = create_training_job  # type: ignore[method-assign,assignment]
    SageMakerModelBackend.describe_training_job = describe_training_job  # type: ignore[method-assign]
    SageMakerModelBackend.stop_training_job = stop_training_job  # type: ignore[attr-defined]
    SageMakerResponse.stop_training_job = stop_training_job_response  # type: ignore[attr-defined]

    def undo() -> None:
        SageMakerModelBackend.create_training_job = original_create  # type: ignore[method-assign]
        SageMakerModelBackend.describe_training_job = original_describe  # type: ignore[method-assign]
        del SageMakerModelBackend.stop_training_job  # type: ignore[attr-defined]
        del SageMakerResponse.stop_training_job  # type: ignore[attr-defined]

    return undo
