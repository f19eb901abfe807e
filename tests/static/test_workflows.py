"""The GitHub Actions workflows pass actionlint, and the delivery rules hold: OIDC only, production behind approval."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))


def _actionlint() -> str:
    local = Path(sys.executable).parent / "actionlint"  # installed into .venv by requirements/dev.txt
    found = str(local) if local.is_file() else shutil.which("actionlint")
    if found is None:
        pytest.skip("actionlint not installed (requirements/dev.txt installs it into .venv)")
    return found


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def test_actionlint_passes() -> None:
    assert WORKFLOWS
    result = subprocess.run([_actionlint(), "-no-color", *map(str, WORKFLOWS)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
                      "      - run: echo ${{ github.nonexistent_context_key }}\n"
                      "      - uses: aws-actions/configure-aws-credentials@v6\n")
    result = subprocess.run([_actionlint(), "-no-color", str(broken)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "aws-region" in result.stdout, result.stdout


def test_no_long_lived_keys_and_actions_are_pinned() -> None:
    for path in WORKFLOWS:
        text = path.read_text()
        assert "aws-access-key-id" not in text and "AWS_SECRET_ACCESS_KEY" not in text, path.name
        for ref in re.findall(r"uses:\s*(\S+)", text):
            assert re.search(r"@(v\d+(\.\d+)*|[0-9a-f]{40})$", ref), f"{path.name}: {ref} is not pinned to a version"


def test_pull_requests_run_lint_types_and_make_test() -> None:
    pr = [w for w in map(_load, WORKFLOWS) if "pull_request" in w["on"]]
    assert pr
    runs = "\n".join(step.get("run", "") for w in pr for job in w["jobs"].values() for step in job["steps"])
    assert "ruff check" in runs and "mypy" in runs and "make test" in runs


def test_main_deploys_staging_then_production_behind_approval_with_oidc() -> None:
    deploy = [w for w in map(_load, WORKFLOWS) if "push" in w["on"]]
    assert len(deploy) == 1
    jobs = deploy[0]["jobs"]
    prod = [j for j in jobs.values() if j.get("environment") == "production"]
    assert len(prod) == 1
    runs = "\n".join(step.get("run", "") for step in prod[0]["steps"])
    assert "--config-env prod" in runs
    assert set(prod[0]["needs"]) >= {name for name, j in jobs.items() if j.get("environment") == "staging"}
    for job in jobs.values():
        uses = [step.get("uses", "") for step in job["steps"]]
        if any(u.startswith("aws-actions/configure-aws-credentials") for u in uses):
            assert job["permissions"]["id-token"] == "write"
            step = next(s for s in job["steps"] if s.get("uses", "").startswith("aws-actions/configure-aws"))
            assert "vars." in step["with"]["role-to-assume"]
    files = {step.get("with", {}).get("file") for job in jobs.values() for step in job["steps"]}
    assert {"training_image/Dockerfile", "inference_image/Dockerfile"} <= files
