"""checkov finds nothing in the template: every check passes or is skipped in the template with its reason."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from localmode.template import load_template

REPO = Path(__file__).resolve().parents[2]


def _checkov(path: Path, quiet: bool = True) -> list[dict[str, Any]]:
    checkov = shutil.which("checkov")
    if checkov is None:
        pytest.skip("checkov not on PATH (make test puts .venv-checkov/bin there)")
    cmd = [checkov, "-f", str(path), "--framework", "cloudformation", "--skip-download", "--compact", "-o", "json"]
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


@pytest.mark.tools
def test_every_checkov_skip_has_a_reason() -> None:
    skips = [(lid, skip) for lid, res in load_template(REPO / "template.yaml")["Resources"].items()
             for skip in res.get("Metadata", {}).get("checkov", {}).get("skip", [])]
    assert skips
    for logical_id, skip in skips:
        assert str(skip.get("id", "")).startswith("CKV"), (logical_id, skip)
        assert len(str(skip.get("comment", ""))) > 20, f"{logical_id}: skip of {skip.get('id')} without a reason"


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
