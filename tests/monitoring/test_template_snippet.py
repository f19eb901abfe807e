"""docs/monitoring-template.yaml, merged into a copy of template.yaml, is a valid, secure, working template.

The merge is the one the snippet's header describes; once it is done in template.yaml itself, the same tests
check that the template holds exactly the snippet's blocks.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from localmode.eventbridge import pattern_matches, transform_input
from localmode.template import Resolver, load_template

REPO = Path(__file__).resolve().parents[2]
SNIPPET = load_template(REPO / "docs" / "monitoring-template.yaml")
EVENTS = REPO / "events" / "monitoring"
NEW_FUNCTIONS = ("DetectDriftFunction", "EvaluateQualityFunction")


def merged() -> dict[str, Any]:
    """template.yaml with the snippet's blocks added where its header says (or checked equal if already there)."""
    template = copy.deepcopy(load_template(REPO / "template.yaml"))
    events = template["Resources"]["RetrainingStateMachine"]["Properties"]["Events"]
    for target, block in ((template["Parameters"], SNIPPET["Parameters"]),
                          (template["Resources"], SNIPPET["Resources"]),
                          (events, SNIPPET["RetrainingStateMachineEvents"])):
        for name, value in block.items():
            if name in target:
                assert target[name] == value, f"{name} in template.yaml differs from docs/monitoring-template.yaml"
            target[name] = copy.deepcopy(value)
    return template


MERGED = merged()
RESOURCES = MERGED["Resources"]


def _resolver() -> Resolver:
    resolver = Resolver(MERGED, {"TrainingImageUri": "x", "InferenceImageUri": "y"},
                        {"AWS::Region": "eu-west-1", "AWS::AccountId": "123456789012", "AWS::StackName": "skin-lesion",
                         "AWS::Partition": "aws"})
    resolver.refs["DataBucket"] = "skin-lesion-data-123456789012"
    for kind in ("Retraining", "Deployment"):
        resolver.refs[f"{kind}StateMachine"] = (f"arn:aws:states:eu-west-1:123456789012:stateMachine:"
                                                f"skin-lesion-{kind.lower()}")
    alarm = "arn:aws:cloudwatch:eu-west-1:123456789012:alarm:skin-lesion-"
    for logical_id, name in (("DriftAlarm", "image-drift"), ("ModelBalancedAccuracyAlarm", "model-balanced-accuracy"),
                             ("ModelMelanomaSensitivityAlarm", "model-melanoma-sensitivity"),
                             ("Endpoint5xxAlarm", "endpoint-5xx"), ("EndpointLatencyAlarm", "endpoint-p99-latency")):
        resolver.attrs[logical_id] = {"Arn": alarm + name}
    return resolver


def test_merged_template_passes_cfn_lint(tmp_path: Path) -> None:
    path = tmp_path / "template.json"  # cfn-lint reads JSON too; the intrinsics are already in long form
    path.write_text(json.dumps(MERGED))
    result = subprocess.run([str(Path(sys.executable).parent / "cfn-lint"), str(path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_merged_template_keeps_the_security_invariants() -> None:
    pytest.importorskip("samtranslator")
    from tests.static.test_security import security_findings

    assert security_findings(MERGED) == []


@pytest.mark.parametrize("logical_id", NEW_FUNCTIONS)
def test_new_functions_resolve_and_get_every_variable_they_read(logical_id: str) -> None:
    props = RESOURCES[logical_id]["Properties"]
    code = (REPO / props["CodeUri"] / "app.py").read_text()
    assert re.search(r"^def lambda_handler\(event", code, re.M)
    wanted = set(re.findall(r'os\.environ\["([A-Z0-9_]+)"\]', code))
    given = set(props["Environment"]["Variables"]) | set(MERGED["Globals"]["Function"]["Environment"]["Variables"])
    assert wanted <= given and wanted >= {"METRIC_NAMESPACE", "CAPTURE_S3_URI", "RESULTS_S3_URI"}
    assert props["LoggingConfig"]["LogGroup"]["Ref"] in RESOURCES
    assert {"Ref": "MonitoringLayer"} in props["Layers"]


def test_rules_match_their_sample_events_and_reject_near_misses() -> None:
    resolver = _resolver()
    ground_truth = resolver.resolve(RESOURCES["EvaluateQualityFunction"]["Properties"]["Events"]["GroundTruth"]
                                    ["Properties"]["Pattern"])
    event = json.loads((EVENTS / "ground_truth_uploaded.json").read_text())
    assert pattern_matches(ground_truth, event)
    event["detail"]["object"]["key"] = "incoming/clinic-a.csv"  # an upload for validation, not ground truth
    assert not pattern_matches(ground_truth, event)

    rule = resolver.resolve(SNIPPET["RetrainingStateMachineEvents"]["QualityAlarm"]["Properties"])
    alarm = json.loads((EVENTS / "quality_alarm.json").read_text())
    assert pattern_matches(rule["Pattern"], alarm)
    trigger = json.loads(transform_input(rule["InputTransformer"], alarm))["trigger"]
    assert trigger == {"type": "quality-alarm", "alarm": "skin-lesion-model-melanoma-sensitivity",
                       "reason": alarm["detail"]["state"]["reason"], "time": alarm["time"]}
    ok = json.loads(json.dumps(alarm))
    ok["detail"]["state"]["value"] = "OK"
    assert not pattern_matches(rule["Pattern"], ok)
    drift = json.loads((REPO / "events" / "retraining" / "drift_alarm.json").read_text())
    assert not pattern_matches(rule["Pattern"], drift)  # the drift alarm has its own rule and trigger type


def test_schedule_is_hourly_and_alarms_watch_the_published_metrics() -> None:
    from lesion_monitoring.drift import FAMILIES, score_name

    hourly = RESOURCES["DetectDriftFunction"]["Properties"]["Events"]["Hourly"]
    assert hourly["Type"] == "Schedule"
    assert re.fullmatch(r"cron\(\d+ \* \* \* \? \*\)", hourly["Properties"]["Schedule"])
    published = {"DriftScore", "DriftSampleSize", "PredictionPSI", "OODRate", *(score_name(f) for f in FAMILIES),
                 "ModelBalancedAccuracy", "ModelMelanomaSensitivity", "QualitySampleSize", "QualityMelanomaCases",
                 "GroundTruthUnmatched"}
    code = (REPO / "functions" / "evaluate_quality" / "app.py").read_text()
    for name in ("ModelBalancedAccuracy", "ModelMelanomaSensitivity", "QualitySampleSize", "GroundTruthUnmatched"):
        assert f'"{name}"' in code
    for logical_id in ("DriftAlarm", "ModelBalancedAccuracyAlarm", "ModelMelanomaSensitivityAlarm"):
        props = RESOURCES[logical_id]["Properties"]
        assert props["Namespace"] == "SkinLesion/Monitoring" and props["MetricName"] in published
        assert "Dimensions" not in props  # the functions publish without dimensions

    body = json.loads(_resolver().resolve(RESOURCES["MonitoringDashboard"]["Properties"]["DashboardBody"]))
    shown = set()
    for widget in body["widgets"]:
        for metric in widget["properties"].get("metrics", []):
            names = [m for m in metric if isinstance(m, str)]
            if names and names[0] in ("SkinLesion/Monitoring", "."):
                shown.add(names[1])
    assert {"DriftScore", "ModelBalancedAccuracy", "ModelMelanomaSensitivity", "DriftSampleSize"} <= shown
    assert shown - {"ExecutionsStarted", "ExecutionsSucceeded", "ExecutionsFailed", "ExecutionsTimedOut",
                    "ExecutionsAborted", "Invocation5XXErrors", "InvocationsPerInstance", "TrainingJobFailed",
                    "TrainingJobStopped", "ModelRegistered"} <= published
    titles = " ".join(w["properties"].get("title", "") for w in body["widgets"])
    for words in ("Invocations", "4XX / 5XX", "latency", "Instances", "Drift scores", "quality", "Training jobs",
                  "Retraining executions", "Deployment executions"):
        assert words in titles


def test_monitoring_layer_needs_only_numpy() -> None:
    requirements = [line.split("==")[0] for line in (REPO / "layers/monitoring/requirements.txt").read_text()
                    .splitlines() if line.strip() and not line.startswith("#")]
    assert requirements == ["numpy"]
    allowed = set(sys.stdlib_module_names) | {"numpy", "lesion_monitoring"}
    for path in (REPO / "layers/monitoring/lesion_monitoring").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"


@pytest.mark.tools
def test_checkov_finds_nothing_in_the_merged_template(tmp_path: Path) -> None:
    checkov = shutil.which("checkov")
    if checkov is None:
        pytest.skip("checkov not on PATH (make test puts .venv-checkov/bin there)")
    (tmp_path / "template.json").write_text(json.dumps(MERGED))
    result = subprocess.run([checkov, "-f", "template.json", "--framework", "cloudformation", "--skip-download",
                             "--compact", "-o", "json", "--quiet"], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f"{c['check_id']} {c['resource']}"
              for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    assert failed == []
    assert sum(r.get("summary", {}).get("resource_count", 0) for r in reports) > len(SNIPPET["Resources"])
