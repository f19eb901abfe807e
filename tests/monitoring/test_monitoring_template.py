"""The monitoring part of template.yaml: its functions get what they read, its rules match their sample events,
its alarms watch the metrics the functions publish. (Lint, security and checkov run on the whole template in
tests/static.)"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from localmode.eventbridge import pattern_matches, transform_input
from localmode.template import Resolver, load_template

REPO = Path(__file__).resolve().parents[2]
EVENTS = REPO / "events" / "monitoring"
NEW_FUNCTIONS = ("DetectDriftFunction", "EvaluateQualityFunction")


TEMPLATE = load_template(REPO / "template.yaml")
RESOURCES = TEMPLATE["Resources"]


def _resolver() -> Resolver:
    resolver = Resolver(TEMPLATE, {"TrainingImageUri": "x", "InferenceImageUri": "y"},
                        {"AWS::Region": "eu-west-1", "AWS::AccountId": "123456789012", "AWS::StackName": "skin-lesion",
                         "AWS::Partition": "aws"})
    resolver.refs["DataBucket"] = "skin-lesion-data-123456789012"
    for kind in ("Retraining", "Deployment"):
        resolver.refs[f"{kind}StateMachine"] = (f"arn:aws:states:eu-west-1:123456789012:stateMachine:"
                                                f"skin-lesion-{kind.lower()}")
    alarm = "arn:aws:cloudwatch:eu-west-1:123456789012:alarm:skin-lesion-"
    for logical_id, name in (("DriftAlarm", "image-drift"), ("ModelBalancedAccuracyAlarm", "model-balanced-accuracy"),
                             ("ModelMelanomaSensitivityAlarm", "model-melanoma-sensitivity"),
                             ("Endpoint5xxAlarm", "endpoint-5xx"), ("EndpointLatencyAlarm", "endpoint-p99-latency"),
                             ("UnreconciledUploadsAlarm", "unreconciled-uploads")):
        resolver.attrs[logical_id] = {"Arn": alarm + name}
    resolver.attrs["FailedEventsQueue"] = {"Arn": "arn:aws:sqs:eu-west-1:123456789012:skin-lesion-failed-events"}
    return resolver


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(_resolver().resolve(RESOURCES["MonitoringDashboard"]["Properties"]["DashboardBody"])))


def _shown_metrics(body: dict[str, Any], namespace: str) -> dict[str, str]:
    """Metric name -> widget title, for every metric of ``namespace`` a widget shows, plain or through a SEARCH
    expression (``"."`` repeats the row before's namespace, as CloudWatch reads it)."""
    shown: dict[str, str] = {}
    for widget in body["widgets"]:
        current = ""
        for metric in widget["properties"].get("metrics", []):
            names = [m for m in metric if isinstance(m, str)]
            if names:
                current = names[0] if names[0] != "." else current
                if current == namespace:
                    shown[names[1]] = widget["properties"]["title"]
            for item in metric:
                expression = item.get("expression", "") if isinstance(item, dict) else ""
                searched = re.search(r"SEARCH\('\{([^,}]+)[^}]*\} MetricName=\"(\w+)\"", expression)
                if searched and searched.group(1) == namespace:
                    shown[searched.group(2)] = widget["properties"]["title"]
    return shown


@pytest.mark.parametrize("logical_id", NEW_FUNCTIONS)
def test_new_functions_resolve_and_get_every_variable_they_read(logical_id: str) -> None:
    props = RESOURCES[logical_id]["Properties"]
    code = (REPO / props["CodeUri"] / "app.py").read_text()
    assert re.search(r"^def lambda_handler\(event", code, re.M)
    wanted = set(re.findall(r'os\.environ\["([A-Z0-9_]+)"\]', code))
    given = set(props["Environment"]["Variables"]) | set(TEMPLATE["Globals"]["Function"]["Environment"]["Variables"])
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

    rule = resolver.resolve(RESOURCES["RetrainingStateMachine"]["Properties"]["Events"]["QualityAlarm"]["Properties"])
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

    body = _dashboard()
    shown = set(_shown_metrics(body, "SkinLesion/Monitoring"))
    assert {"DriftScore", "ModelBalancedAccuracy", "ModelMelanomaSensitivity", "DriftSampleSize"} <= shown
    assert shown <= published
    titles = " ".join(w["properties"].get("title", "") for w in body["widgets"])
    for words in ("Invocations", "4XX / 5XX", "latency", "Instances", "Drift scores", "quality", "Training jobs",
                  "Retraining executions", "Deployment executions", "validated / duplicate / quarantined"):
        assert words in titles


def test_every_pipeline_metric_on_the_dashboard_is_one_a_handler_emits() -> None:
    """A widget over a metric nothing emits stays empty without a warning (as the training-job counters did once
    their handler was replaced by the .sync integration)."""
    emitted: set[str] = set()
    for source in [*(REPO / "functions").glob("*/app.py"), *(REPO / "layers").glob("*/*/*.py")]:
        tree = ast.parse(source.read_text())
        emitted |= {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    shown = _shown_metrics(_dashboard(), "SkinLesion")
    assert {"ImagesValidated", "ImagesDuplicate", "UploadsQuarantined", "ModelRegistered"} <= set(shown)
    assert {name for name in shown if name not in emitted} == set()


def test_monitoring_layer_needs_only_numpy() -> None:
    requirements = [line.split("==")[0] for line in (REPO / "layers/monitoring/requirements.txt").read_text()
                    .splitlines() if line.strip() and not line.startswith("#")]
    assert requirements == ["numpy"]
    # lesion_common: the common layer, which the template's Globals give every function.
    allowed = set(sys.stdlib_module_names) | {"numpy", "lesion_monitoring", "lesion_common"}
    for path in (REPO / "layers/monitoring/lesion_monitoring").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
