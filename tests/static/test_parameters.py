"""The deploy form reads well: every parameter says what it does, and the console shows each one once, in a group,
under a label (template.yaml's ``AWS::CloudFormation::Interface``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from localmode.template import load_template

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = load_template(REPO / "template.yaml")


def parameter_findings(template: dict[str, Any]) -> list[str]:
    """What keeps a parameter from reading well in the console's form."""
    parameters: dict[str, Any] = template["Parameters"]
    interface = template.get("Metadata", {}).get("AWS::CloudFormation::Interface", {})
    findings = [f"{name}: no Description" for name, spec in parameters.items()
                if len(str(spec.get("Description", "")).strip()) < 20]
    grouped = [name for group in interface.get("ParameterGroups", []) for name in group.get("Parameters", [])]
    for group in interface.get("ParameterGroups", []):
        if not str(group.get("Label", {}).get("default", "")).strip():
            findings.append(f"group {group.get('Parameters')}: no label")
    findings += [f"{name}: in no parameter group" for name in parameters if name not in grouped]
    findings += [f"{name}: in {grouped.count(name)} parameter groups" for name in sorted(set(grouped))
                 if grouped.count(name) > 1]
    findings += [f"{name}: grouped, but not a parameter" for name in sorted(set(grouped)) if name not in parameters]
    labels: dict[str, Any] = interface.get("ParameterLabels", {})
    findings += [f"{name}: no label" for name in parameters if not str(labels.get(name, {}).get("default", "")).strip()]
    findings += [f"{name}: labelled, but not a parameter" for name in labels if name not in parameters]
    return findings


def test_every_parameter_is_described_grouped_and_labelled() -> None:
    assert len(TEMPLATE["Parameters"]) > 40
    assert parameter_findings(TEMPLATE) == []


def test_a_parameter_added_without_its_description_group_and_label_is_caught() -> None:
    broken = copy.deepcopy(TEMPLATE)
    broken["Parameters"]["NewKnob"] = {"Type": "Number", "Default": 1}
    assert parameter_findings(broken) == ["NewKnob: no Description", "NewKnob: in no parameter group",
                                          "NewKnob: no label"]


def test_a_stale_or_doubled_group_entry_is_caught() -> None:
    broken = copy.deepcopy(TEMPLATE)
    groups = broken["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    groups[0]["Parameters"] = [*groups[0]["Parameters"], "Gone", groups[1]["Parameters"][0]]
    assert parameter_findings(broken) == [f"{groups[1]['Parameters'][0]}: in 2 parameter groups",
                                          "Gone: grouped, but not a parameter"]
