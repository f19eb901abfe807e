"""Read template.yaml and resolve CloudFormation intrinsics the way a deployment would, for local mode."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

_SHORT_TAGS = {
    "Ref": "Ref",
    "Condition": "Condition",
    "Sub": "Fn::Sub",
    "GetAtt": "Fn::GetAtt",
    "If": "Fn::If",
    "Equals": "Fn::Equals",
    "Not": "Fn::Not",
    "And": "Fn::And",
    "Or": "Fn::Or",
    "Join": "Fn::Join",
    "Select": "Fn::Select",
    "Split": "Fn::Split",
    "FindInMap": "Fn::FindInMap",
    "Base64": "Fn::Base64",
    "ImportValue": "Fn::ImportValue",
    "GetAZs": "Fn::GetAZs",
    # Rule-specific functions (the Rules section)
    "Contains": "Fn::Contains",
    "EachMemberEquals": "Fn::EachMemberEquals",
    "EachMemberIn": "Fn::EachMemberIn",
}


class TemplateRuleError(ValueError):
    """A Rules assertion failed: CloudFormation refuses the stack before creating anything."""


class _CfnLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]  # C: ~5x faster
    """A YAML loader that turns ``!Tag`` short forms into their long ``{"Fn::X": ...}`` forms."""


def _make_constructor(long_name: str) -> Callable[[yaml.Loader, yaml.Node], dict[str, Any]]:
    def construct(loader: yaml.Loader, node: yaml.Node) -> dict[str, Any]:
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
            if long_name == "Fn::GetAtt":
                value = str(value).split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {long_name: value}

    return construct


for _tag, _long in _SHORT_TAGS.items():
    _CfnLoader.add_constructor(f"!{_tag}", _make_constructor(_long))


def load_template(path: Path) -> dict[str, Any]:
    """Parse a CloudFormation/SAM template, short-form tags included."""
    with path.open() as fh:
        data = yaml.load(fh, Loader=_CfnLoader)  # noqa: S506 - the loader is a SafeLoader subclass
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a template")
    return data


def samconfig_parameters(path: Path, environment: str) -> dict[str, str]:
    """The ``parameter_overrides`` of one samconfig.toml environment, as a dict."""
    if not path.exists():
        return {}
    config = tomllib.loads(path.read_text())
    env = config.get(environment, {})
    raw = env.get("deploy", {}).get("parameters", {}).get("parameter_overrides", "")
    items = raw if isinstance(raw, list) else re.findall(r'(\w+)=("[^"]*"|\'[^\']*\'|\S+)', raw)
    result: dict[str, str] = {}
    for item in items:
        key, value = item if isinstance(item, tuple) else item.split("=", 1)
        result[key] = value.strip("\"'")
    return result


class Resolver:
    """Evaluate intrinsic functions against parameter values and the physical identities of resources.

    Parameters
    ----------
    template : dict
        The parsed template.
    parameters : Mapping[str, str]
        Values for the template's parameters (defaults fill the rest).
    pseudo : Mapping[str, str]
        ``AWS::Region``, ``AWS::AccountId``, ``AWS::StackName`` and ``AWS::Partition``.
    refs, attrs : dict
        Filled in by the caller as resources come to exist: ``refs[logical_id]`` and
        ``attrs[logical_id][attribute]``.
    """

    def __init__(self, template: dict[str, Any], parameters: Mapping[str, str], pseudo: Mapping[str, str]):
        self.template = template
        self.pseudo = dict(pseudo)
        self.parameters: dict[str, Any] = {}
        for name, spec in template.get("Parameters", {}).items():
            if name in parameters:
                value: Any = str(parameters[name])
            elif "Default" in spec:
                value = str(spec["Default"])
            else:
                raise KeyError(f"parameter {name} has no default and no local value")
            if spec.get("Type") == "CommaDelimitedList":
                value = value.split(",") if value else [""]
            self.parameters[name] = value
        unknown = set(parameters) - set(self.parameters)
        if unknown:
            raise KeyError(f"unknown parameters: {sorted(unknown)}")
        self.refs: dict[str, Any] = {}
        self.attrs: dict[str, dict[str, Any]] = {}
        self.conditions = {name: bool(self.resolve(expr)) for name, expr in template.get("Conditions", {}).items()}

    def check_rules(self) -> None:
        """Evaluate the template's Rules as CloudFormation does before it creates or updates a stack.

        Raises
        ------
        TemplateRuleError
            With the failing assertion's ``AssertDescription``, which is what CloudFormation's ValidationError
            reports.
        """
        for name, rule in self.template.get("Rules", {}).items():
            if "RuleCondition" in rule and not self.resolve(rule["RuleCondition"]):
                continue
            for assertion in rule.get("Assertions", []):
                if not self.resolve(assertion["Assert"]):
                    raise TemplateRuleError(assertion.get("AssertDescription") or f"Template rule {name} failed")

    def _ref(self, name: str) -> Any:
        if name in self.pseudo:
            return self.pseudo[name]
        if name == "AWS::NoValue":
            return _NO_VALUE
        if name in self.parameters:
            return self.parameters[name]
        if name in self.refs:
            return self.refs[name]
        raise KeyError(f"Ref {name} cannot be resolved (not created yet?)")

    def _getatt(self, logical_id: str, attribute: str) -> Any:
        try:
            return self.attrs[logical_id][attribute]
        except KeyError as err:
            raise KeyError(f"GetAtt {logical_id}.{attribute} cannot be resolved") from err

    def _sub(self, text: str, variables: Mapping[str, Any]) -> str:
        def replace(match: re.Match[str]) -> str:
            expr = match.group(1)
            if expr.startswith("!"):
                return "${" + expr[1:] + "}"
            if expr in variables:
                return str(variables[expr])
            if "." in expr and not expr.startswith("AWS::"):
                return str(self._getatt(*expr.split(".", 1)))
            return str(self._ref(expr))

        return re.sub(r"\$\{([^}]+)\}", replace, text)

    def resolve(self, node: Any) -> Any:
        """Resolve every intrinsic in ``node``; ``AWS::NoValue`` removes the key or item it stands in."""
        if isinstance(node, list):
            return [v for v in (self.resolve(i) for i in node) if v is not _NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            (key, arg), = node.items()
            if key in ("Ref", "Fn::GetAtt", "Fn::Sub", "Fn::If") or (key == "Condition" and isinstance(arg, str)):
                return self._reference(key, arg)
            if key.startswith("Fn::"):
                return self._function(key, arg)
        return {k: v for k, v in ((k, self.resolve(v)) for k, v in node.items()) if v is not _NO_VALUE}


    def _reference(self, key: str, arg: Any) -> Any:
        """``Ref``, ``Condition``, ``Fn::GetAtt``, ``Fn::Sub`` and ``Fn::If``: what names a value."""
        if key == "Ref":
            return self._ref(arg)
        if key == "Condition":
            return self.conditions[arg]
        if key == "Fn::GetAtt":
            logical, attribute = arg if isinstance(arg, list) else arg.split(".", 1)
            return self._getatt(logical, attribute)
        if key == "Fn::Sub":
            if isinstance(arg, list):
                return self._sub(arg[0], {k: self.resolve(v) for k, v in arg[1].items()})
            return self._sub(arg, {})
        name, when_true, when_false = arg  # Fn::If
        return self.resolve(when_true if self.conditions[name] else when_false)

    def _function(self, key: str, arg: Any) -> Any:
        """The other ``Fn::`` functions: conditions, lists, strings (the Rules functions included)."""
        if key == "Fn::Equals":
            a, b = (self.resolve(x) for x in arg)
            return str(a) == str(b)
        if key == "Fn::Not":
            return not self.resolve(arg[0])
        if key == "Fn::And":
            return all(self.resolve(x) for x in arg)
        if key == "Fn::Or":
            return any(self.resolve(x) for x in arg)
        if key == "Fn::Join":
            sep, items = arg
            return sep.join(str(x) for x in self.resolve(items))
        if key == "Fn::Select":
            index, items = arg
            return self.resolve(items)[int(self.resolve(index))]
        if key == "Fn::Split":
            sep, text = arg
            return str(self.resolve(text)).split(sep)
        if key == "Fn::Contains":
            members, value = (self.resolve(x) for x in arg)
            return str(value) in {str(m) for m in members}
        if key == "Fn::EachMemberEquals":
            members, value = (self.resolve(x) for x in arg)
            return all(str(m) == str(value) for m in members)
        if key == "Fn::EachMemberIn":
            members, allowed = (self.resolve(x) for x in arg)
            return {str(m) for m in members} <= {str(a) for a in allowed}
        if key == "Fn::ToJsonString":
            return json.dumps(self.resolve(arg))
        raise NotImplementedError(f"{key} is not supported in local mode")


class _NoValue:
    def __repr__(self) -> str:
        return "AWS::NoValue"


_NO_VALUE = _NoValue()


def _constant(value: str) -> Callable[[], str]:
    """A default factory that always gives ``value``."""
    return lambda: value


def function_environment(template: dict[str, Any], logical_id: str, parameters: Mapping[str, str] | None = None,
                         stack_name: str = "skin-lesion") -> dict[str, str]:
    """A function's environment (Globals merged) as a deployment would set it, with made-up physical names.

    For checks and benchmarks that import a handler outside any emulation: every resource resolves to a name
    derived from its logical id, every attribute to an ARN-shaped string.
    """
    from collections import defaultdict

    values = {"TrainingImageUri": "train:1", "InferenceImageUri": "infer:1", **(parameters or {})}
    resolver = Resolver(template, values, {"AWS::Region": "eu-west-1", "AWS::AccountId": "123456789012",
                                           "AWS::StackName": stack_name, "AWS::Partition": "aws"})
    for name in template["Resources"]:
        resolver.refs[name] = name.lower()
        resolver.attrs[name] = defaultdict(_constant(f"arn:aws:x:eu-west-1:123456789012:{name.lower()}"))
    env = dict(template.get("Globals", {}).get("Function", {}).get("Environment", {}).get("Variables", {}))
    env.update(template["Resources"][logical_id]["Properties"].get("Environment", {}).get("Variables", {}))
    return {k: str(v) for k, v in resolver.resolve(env).items()}
