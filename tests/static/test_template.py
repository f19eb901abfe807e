"""The template lints, its handlers resolve, its rules match their sample events, and the linter really checks."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from localmode.eventbridge import pattern_matches
from localmode.template import Resolver, function_environment, load_template

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = load_template(REPO / "template.yaml")
RESOURCES = TEMPLATE["Resources"]
FUNCTIONS = {k: v for k, v in RESOURCES.items() if v["Type"] == "AWS::Serverless::Function"}


def _cfn_lint(path: Path) -> subprocess.CompletedProcess[str]:
    cfn_lint = str(Path(sys.executable).parent / "cfn-lint")
    return subprocess.run([cfn_lint, str(path)], capture_output=True, text=True, timeout=300)


def test_cfn_lint_passes() -> None:
    result = _cfn_lint(REPO / "template.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new", "expected_rule"),
    [
        ("Runtime: python3.12", "Runtime: python3.99", "E3030"),  # not a Lambda runtime
        ("Runtime: python3.12", "Runtime: python3.11", "E2533"),  # deprecated: creation disabled
        ("    Timeout: 60\n", "    Timeout: 1200\n", "E3034"),  # over Lambda's 900 s
    ],
)
def test_cfn_lint_catches_broken_copies(tmp_path: Path, old: str, new: str, expected_rule: str) -> None:
    """The linter must run the SAM transform: errors inside Globals/Serverless resources are caught."""
    text = (REPO / "template.yaml").read_text()
    assert old in text
    broken = tmp_path / "template.yaml"
    broken.write_text(text.replace(old, new, 1))
    result = _cfn_lint(broken)
    assert result.returncode != 0
    assert expected_rule in result.stdout, result.stdout


def test_lambda_runtime_is_python312() -> None:
    assert TEMPLATE["Globals"]["Function"]["Runtime"] == "python3.12"
    for name, fn in FUNCTIONS.items():
        assert fn["Properties"].get("Runtime", "python3.12") == "python3.12", name


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_every_handler_resolves_to_a_callable(logical_id: str) -> None:
    props = FUNCTIONS[logical_id]["Properties"]
    module_name, _, attr = props["Handler"].rpartition(".")
    path = REPO / props["CodeUri"] / f"{module_name}.py"
    assert path.is_file(), f"{logical_id}: {path} missing"
    source = path.read_text()
    assert re.search(rf"^def {attr}\(event", source, re.M), f"{logical_id}: no def {attr}(event, ...) in {path}"
    assert (REPO / props["CodeUri"] / "requirements.txt").is_file()


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_every_env_var_a_handler_reads_is_set(logical_id: str) -> None:
    """Handlers fail at cold start on a missing variable: the template must set each one they read."""
    props = FUNCTIONS[logical_id]["Properties"]
    code = "\n".join(p.read_text() for p in (REPO / props["CodeUri"]).glob("*.py"))
    wanted = set(re.findall(r'os\.environ\["([A-Z0-9_]+)"\]', code))
    env = set(props.get("Environment", {}).get("Variables", {}))
    env |= set(TEMPLATE["Globals"]["Function"]["Environment"]["Variables"])
    assert wanted <= env, f"{logical_id} reads {sorted(wanted - env)} which the template does not set"


def test_lambdas_never_import_torch_or_sagemaker_sdk() -> None:
    offenders = []
    for path in list((REPO / "functions").rglob("*.py")) + list((REPO / "layers").rglob("*.py")):
        for line in path.read_text().splitlines():
            if re.match(r"\s*(import|from)\s+(torch|torchvision|sagemaker)\b", line):
                offenders.append(f"{path}: {line.strip()}")
    assert not offenders


def test_template_resolves_with_defaults() -> None:
    """Every parameter the template needs has a value in each samconfig environment or a default."""
    params = {"TrainingImageUri": "x", "InferenceImageUri": "y"}
    resolver = Resolver(TEMPLATE, params, {"AWS::Region": "eu-west-1", "AWS::AccountId": "1", "AWS::StackName": "s",
                                           "AWS::Partition": "aws"})
    assert resolver.conditions == {"HasEmail": False, "MonthlyEnabled": True}


# ------------------------------------------------------------------ EventBridge patterns vs sample events
def _rules() -> dict[str, dict]:
    rules = {}
    for logical_id, res in RESOURCES.items():
        for event_id, event in res.get("Properties", {}).get("Events", {}).items():
            if event["Type"] == "EventBridgeRule":
                rules[f"{logical_id}{event_id}"] = event["Properties"]
    return rules


def _resolve_pattern(pattern: dict) -> dict:
    """Resolve the intrinsics in a pattern with the values the sample events were written for."""
    resolver = Resolver(TEMPLATE, {"TrainingImageUri": "x", "InferenceImageUri": "y"},
                        {"AWS::Region": "eu-west-1", "AWS::AccountId": "123456789012", "AWS::StackName": "skin-lesion",
                         "AWS::Partition": "aws"})
    resolver.refs["DataBucket"] = "skin-lesion-data-123456789012"
    resolver.attrs["DriftAlarm"] = {"Arn": "arn:aws:cloudwatch:eu-west-1:123456789012:alarm:skin-lesion-image-drift"}
    resolver.attrs["ModelBalancedAccuracyAlarm"] = {
        "Arn": "arn:aws:cloudwatch:eu-west-1:123456789012:alarm:skin-lesion-model-balanced-accuracy"}
    resolver.attrs["ModelMelanomaSensitivityAlarm"] = {
        "Arn": "arn:aws:cloudwatch:eu-west-1:123456789012:alarm:skin-lesion-model-melanoma-sensitivity"}
    return resolver.resolve(pattern)


SAMPLES = {
    "ValidateImageFunctionUpload": ("validate_image/object_created.json", ("detail", "object", "key"),
                                    "validated/ISIC_0024306.jpg"),
    "RetrainingStateMachineDriftAlarm": ("retraining/drift_alarm.json", ("detail", "state", "value"), "OK"),
    "RetrainingStateMachineManual": ("retraining/manual_request.json", ("detail-type",), "RetrainingApproved"),
    "EvaluateQualityFunctionGroundTruth": ("monitoring/ground_truth_uploaded.json", ("detail", "object", "key"),
                                           "incoming/batch.csv"),
    "RetrainingStateMachineQualityAlarm": ("monitoring/quality_alarm.json", ("detail", "state", "value"), "OK"),
    "DeploymentStateMachineModelApproved": ("deployment/model_package_approved.json",
                                            ("detail", "ModelApprovalStatus"), "PendingManualApproval"),
}


def test_every_rule_has_a_sample_event() -> None:
    assert set(_rules()) == set(SAMPLES)


@pytest.mark.parametrize("rule", sorted(SAMPLES))
def test_rule_matches_its_sample_and_rejects_a_near_miss(rule: str) -> None:
    pattern = _resolve_pattern(_rules()[rule]["Pattern"])
    sample_file, path, wrong_value = SAMPLES[rule]
    event = json.loads((REPO / "events" / sample_file).read_text())
    assert pattern_matches(pattern, event)
    near_miss = json.loads(json.dumps(event))
    target = near_miss
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = wrong_value
    assert not pattern_matches(pattern, near_miss)


@pytest.mark.tools
def test_sam_validate_lint() -> None:
    sam = shutil.which("sam")
    if sam is None:
        pytest.skip("sam not on PATH (make test puts .venv-sam/bin there)")
    result = subprocess.run([sam, "validate", "--lint", "--region", "eu-west-1"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_handler_modules_import_with_the_template_environment(logical_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Import each handler with the environment the template gives it: configuration parses at cold start, and
    module-level code makes no AWS call."""
    for key, value in function_environment(TEMPLATE, logical_id).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    path = REPO / FUNCTIONS[logical_id]["Properties"]["CodeUri"] / "app.py"
    spec = importlib.util.spec_from_file_location(f"_static_{logical_id}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pydantic look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert callable(module.lambda_handler)


@pytest.mark.tools
def test_sam_build_succeeds_and_packages_stay_small(tmp_path: Path) -> None:
    """``sam build`` (no Docker) works; functions stay under 1 MB and the shared layer under 30 MB."""
    if shutil.which("sam") is None:
        pytest.skip("sam not on PATH (make test puts .venv-sam/bin there)")
    from benchmarks.package_size import measure, sam_build

    sam_build(tmp_path / "build")
    result = measure(tmp_path / "build")
    assert {f"{k}" for k in FUNCTIONS} <= set(result["artifacts"])
    assert all(row["ok"] for row in result["artifacts"].values()), result
