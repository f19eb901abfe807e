"""The state machines: valid ASL, fully parameterised, and every Task retries and catches."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from localmode.template import load_template

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = load_template(REPO / "template.yaml")
MACHINES = {
    logical_id: res["Properties"]
    for logical_id, res in TEMPLATE["Resources"].items()
    if res["Type"] == "AWS::Serverless::StateMachine"
}
ASL_FILES = sorted((REPO / "statemachines").glob("*.asl.json"))
# Succeed states that end an execution on purpose without a message: the execution of a duplicate event, which
# must stay quiet. Each is reached only by catching one named error (never States.ALL) and says so in its Comment.
QUIET_ENDS = {"deployment.asl.json": {"AlreadyDeploying"}}


def _states(definition: dict) -> dict[str, dict]:
    """Every state, those inside Parallel branches and Map iterators included."""
    found: dict[str, dict] = {}
    for name, state in definition["States"].items():
        found[name] = state
        for branch in state.get("Branches", []):
            found.update(_states(branch))
        for key in ("Iterator", "ItemProcessor"):
            if key in state:
                found.update(_states(state[key]))
    return found


def test_every_asl_file_is_used_by_a_state_machine() -> None:
    used = {(REPO / p["DefinitionUri"]).resolve() for p in MACHINES.values()}
    assert {p.resolve() for p in ASL_FILES} == used


@pytest.mark.parametrize("logical_id", sorted(MACHINES))
def test_substitutions_match_both_ways(logical_id: str) -> None:
    props = MACHINES[logical_id]
    text = (REPO / props["DefinitionUri"]).read_text()
    used = set(re.findall(r"\$\{([A-Za-z0-9_]+)\}", text))
    assert used == set(props["DefinitionSubstitutions"])


@pytest.mark.parametrize("path", ASL_FILES, ids=lambda p: p.name)
def test_no_account_region_or_arn_literals(path: Path) -> None:
    text = path.read_text()
    assert "arn:aws:" not in text.replace("arn:aws:states:::", "")
    assert not re.search(r"\b\d{12}\b", text)
    assert not re.search(r"\b(us|eu|ap|sa|ca|me|af)-(east|west|north|south|central|northeast|southeast)-\d\b", text)


def _successors(state: dict) -> list[str]:
    targets = [state.get("Next"), state.get("Default")]
    targets += [c.get("Next") for c in state.get("Choices", [])]
    targets += [c.get("Next") for c in state.get("Catch", [])]
    return [t for t in targets if t]


def _notifies(name: str, states: dict[str, dict], seen: frozenset[str] = frozenset(),
              quiet: frozenset[str] = frozenset()) -> bool:
    """Does every path from ``name`` publish a notification before it ends (or end in a declared quiet end)?"""
    state = states[name]
    if ":sns:publish" in state.get("Resource", "") or name in quiet:
        return True
    if state["Type"] in ("Succeed", "Fail") or name in seen:
        return name in seen  # a loop back is fine: it comes round to its own exits
    return all(_notifies(n, states, seen | {name}, quiet) for n in _successors(state))


@pytest.mark.parametrize("path", ASL_FILES, ids=lambda p: p.name)
def test_every_task_has_retry_and_catch_to_a_notifying_path(path: Path) -> None:
    definition = json.loads(path.read_text())
    states = _states(definition)
    quiet = frozenset(QUIET_ENDS.get(path.name, set()))
    for name, state in states.items():
        if state["Type"] != "Task":
            continue
        assert state.get("Retry"), f"{name} has no Retry"
        assert state.get("Catch"), f"{name} has no Catch"
        if ":sns:publish" in state["Resource"]:
            continue  # a failed notification can only end the run
        for catcher in state["Catch"]:
            assert _notifies(catcher["Next"], states, quiet=quiet), \
                f"{name} catches to {catcher['Next']}, which does not notify"


@pytest.mark.parametrize("path", ASL_FILES, ids=lambda p: p.name)
def test_every_terminal_path_notifies(path: Path) -> None:
    """Each Succeed/Fail state is reached only from a notification."""
    states = _states(json.loads(path.read_text()))
    predecessors: dict[str, set[str]] = {n: set() for n in states}
    for name, state in states.items():
        for target in _successors(state):
            predecessors[target].add(name)
    quiet = QUIET_ENDS.get(path.name, set())
    for name in quiet:
        assert states[name]["Type"] == "Succeed" and "quiet" in states[name].get("Comment", "").lower(), name
        for before in predecessors[name]:
            catchers = [c for c in states[before].get("Catch", []) if c["Next"] == name]
            assert catchers and states[before].get("Next") != name, f"{before} reaches {name} other than by a Catch"
            assert all("States.ALL" not in c["ErrorEquals"] for c in catchers), f"{before} hides failures in {name}"
    for name, state in states.items():
        if state["Type"] in ("Succeed", "Fail") and name not in quiet:
            for before in predecessors[name]:
                assert ":sns:publish" in states[before].get("Resource", ""), f"{before} -> {name} skips notifying"


@pytest.mark.tools
@pytest.mark.parametrize("path", ASL_FILES, ids=lambda p: p.name)
def test_asl_validator(path: Path) -> None:
    tool = shutil.which("asl-validator") or str(REPO / "node_modules" / ".bin" / "asl-validator")
    if not Path(tool).exists():
        pytest.skip("asl-validator not installed (make test installs it with npm ci)")
    result = subprocess.run([tool, "--json-path", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
