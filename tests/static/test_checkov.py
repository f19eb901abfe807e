"""checkov finds nothing in the template: every check passes or is skipped with its reason, in .checkov.yaml (skips
for every resource) or in a resource's Metadata.checkov.skip (skips for that resource)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from localmode.template import load_template

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / ".checkov.yaml"


def _checkov(path: Path, quiet: bool = True) -> list[dict[str, Any]]:
    checkov = shutil.which("checkov")
    if checkov is None:
        pytest.skip("checkov not on PATH (make test puts .venv-checkov/bin there)")
    cmd = [checkov, "-f", str(path), "--config-file", str(CONFIG), "--framework", "cloudformation", "--skip-download",
           "--compact", "-o", "json"]
    if quiet:
        cmd.append("--quiet")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=path.parent)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report = json.loads(result.stdout)
    reports: list[dict[str, Any]] = report if isinstance(report, list) else [report]
    return reports


@pytest.mark.tools
def test_checkov_reports_no_failed_check() -> None:
    reports = _checkov(REPO / "template.yaml")
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}"
              for r in reports for c in r.get("results", {}).get("failed_checks", [])]
    assert failed == []
    assert any(r.get("summary", {}).get("resource_count", 0) > 20 for r in reports), reports


def test_every_checkov_skip_has_a_reason() -> None:
    skips = [(lid, skip) for lid, res in load_template(REPO / "template.yaml")["Resources"].items()
             for skip in res.get("Metadata", {}).get("checkov", {}).get("skip", [])]
    assert skips
    for logical_id, skip in skips:
        assert str(skip.get("id", "")).startswith("CKV"), (logical_id, skip)
        assert len(str(skip.get("comment", ""))) > 20, f"{logical_id}: skip of {skip.get('id')} without a reason"
    config_skips = _config_skip_reasons(CONFIG.read_text())
    assert config_skips
    for check, reason in config_skips.items():
        assert len(reason) > 40, f".checkov.yaml: skip of {check} without a reason in the comment above it"


def _config_skip_reasons(text: str) -> dict[str, str]:
    """``skip-check`` of a checkov config: each check id with the comment lines right above it."""
    listed = yaml.safe_load(text)["skip-check"]
    reasons: dict[str, str] = {}
    comment: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("# "))
        elif m := re.fullmatch(r"-\s*(CKV\w+)", stripped):
            reasons[m.group(1)] = " ".join(comment)
            comment = []
        else:
            comment = []
    assert sorted(reasons) == sorted(listed), "every skip-check entry on a line of its own"
    return reasons


def test_a_config_skip_without_a_reason_is_caught() -> None:
    bare = CONFIG.read_text().replace("  - CKV_AWS_117\n", "  - CKV_AWS_117\n  - CKV_AWS_45\n")
    assert _config_skip_reasons(bare)["CKV_AWS_45"] == ""


def on_failure_findings(template: dict[str, Any]) -> list[str]:
    """Functions invoked asynchronously (a SAM event source: rules, schedules) without an on-failure destination.

    What checkov's CKV_AWS_116 (dead-letter queue), skipped in .checkov.yaml, stands for here.
    """
    findings = []
    for logical_id, res in template["Resources"].items():
        if res["Type"] != "AWS::Serverless::Function" or not res["Properties"].get("Events"):
            continue
        destination = (res["Properties"].get("EventInvokeConfig") or {}).get("DestinationConfig", {})
        if not destination.get("OnFailure", {}).get("Destination"):
            findings.append(f"{logical_id}: invoked asynchronously without EventInvokeConfig OnFailure")
    return findings


def test_every_asynchronously_invoked_function_has_an_on_failure_destination() -> None:
    template = load_template(REPO / "template.yaml")
    assert on_failure_findings(template) == []
    asynchronous = [k for k, r in template["Resources"].items()
                    if r["Type"] == "AWS::Serverless::Function" and r["Properties"].get("Events")]
    assert len(asynchronous) >= 3, asynchronous
    del template["Resources"][asynchronous[0]]["Properties"]["EventInvokeConfig"]
    assert on_failure_findings(template) == [
        f"{asynchronous[0]}: invoked asynchronously without EventInvokeConfig OnFailure"]


@pytest.mark.tools
def test_checkov_catches_a_broken_copy(tmp_path: Path) -> None:
    """checkov really reads the template: an unencrypted topic and a bucket without logging fail."""
    text = (REPO / "template.yaml").read_text()
    for old in ("      KmsMasterKeyId: !Ref DataKey\n", "        LogFilePrefix: data-bucket/\n"):
        assert old in text
    text = text.replace("      KmsMasterKeyId: !Ref DataKey\n", "", 1)
    text = text.replace("      LoggingConfiguration:\n        DestinationBucketName: !Ref AccessLogsBucket\n"
                        "        LogFilePrefix: data-bucket/\n", "", 1)
    broken = tmp_path / "template.yaml"
    broken.write_text(text)
    failed = {(c["check_id"], c["resource"]) for r in _checkov(broken)
              for c in r.get("results", {}).get("failed_checks", [])}
    assert ("CKV_AWS_26", "AWS::SNS::Topic.NotificationTopic") in failed, failed
    assert ("CKV_AWS_18", "AWS::S3::Bucket.DataBucket") in failed, failed
