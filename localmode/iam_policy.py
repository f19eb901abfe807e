"""The identity policies of the template's roles, as the SAM transform makes them, and IAM's evaluation of them.

:func:`principals_from_template` runs SAM's own transform (samtranslator, the one cfn-lint and ``sam deploy``
run) so that ``Policies`` of functions and state machines, policy templates such as ``LambdaInvokePolicy`` and
the roles SAM generates for EventBridge targets become the ``AWS::IAM::Role`` resources a deployment would have;
intrinsics are then resolved with local mode's :class:`~localmode.template.Resolver` for the local account, region
and physical names. :func:`evaluate` is IAM's decision for one request against one principal's identity
policies: an explicit ``Deny`` wins, then any ``Allow``, otherwise the request is implicitly denied.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

ALLOW = "allow"
EXPLICIT_DENY = "explicit-deny"
IMPLICIT_DENY = "implicit-deny"


# ------------------------------------------------------------------ model
@dataclass(frozen=True)
class Statement:
    """One statement of a role's identity policy, intrinsics resolved.

    ``sid`` is ``<role>/<policy name>/<index>`` (plus ``:<Sid>`` when the statement has one): stable across runs
    for the same template, so traces of several runs can be compared statement by statement.
    """

    sid: str
    effect: str
    actions: tuple[str, ...] = ()
    not_actions: tuple[str, ...] = ()
    resources: tuple[str, ...] = ()
    not_resources: tuple[str, ...] = ()
    condition: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def matches(self, action: str, resource: str, context: Mapping[str, Any]) -> bool:
        """Does this statement apply to the request (action, resource and every condition)?"""
        if self.actions and not any(action_matches(p, action) for p in self.actions):
            return False
        if self.not_actions and any(action_matches(p, action) for p in self.not_actions):
            return False
        if self.resources and not any(arn_matches(p, resource) for p in self.resources):
            return False
        if self.not_resources and any(arn_matches(p, resource) for p in self.not_resources):
            return False
        return conditions_hold(self.condition, context)

    def without_action(self, action: str) -> Statement:
        """This statement with one entry of its ``Action`` list removed."""
        return replace(self, actions=tuple(a for a in self.actions if a != action))


@dataclass
class Principal:
    """A role and its identity policies.

    Attributes
    ----------
    role : str
        The role's logical id in the transformed template (``CheckDataFunctionRole``, ``SageMakerExecutionRole``).
    arn : str
        The role's ARN (``arn:aws:iam::<account>:role/<name>``).
    service : str
        The service principal that assumes it (``lambda.amazonaws.com``...), from its trust policy.
    session : str
        The session name in the ``assumed-role`` ARN that AWS's error messages show.
    statements : list of Statement
    managed_policy_arns : list of str
        Attached managed policies; their content is AWS's, not the template's, and is not evaluated here.
    """

    role: str
    arn: str
    service: str
    session: str
    statements: list[Statement]
    managed_policy_arns: list[str] = field(default_factory=list)

    @property
    def account(self) -> str:
        return self.arn.split(":")[4]

    @property
    def name(self) -> str:
        return self.arn.rsplit("/", 1)[-1]

    @property
    def assumed_role_arn(self) -> str:
        """What AWS names the caller in an AccessDenied message."""
        return f"arn:aws:sts::{self.account}:assumed-role/{self.name}/{self.session}"


# ------------------------------------------------------------------ matching
@functools.lru_cache(maxsize=4096)
def _glob(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    # IAM's wildcards are only * and ?; fnmatch's [...] classes must not apply.
    regex = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile(f"^{regex}$", re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def glob_matches(pattern: str, value: str, ignore_case: bool = False) -> bool:
    """IAM's string wildcard match (``*`` any run, ``?`` one character)."""
    return _glob(pattern, ignore_case).match(value) is not None


def action_matches(pattern: str, action: str) -> bool:
    """Action names match case-insensitively, with wildcards."""
    return glob_matches(pattern, action, ignore_case=True)


def arn_matches(pattern: str, arn: str) -> bool:
    """ARN matching as IAM does it: each of the six colon-separated parts separately, the last one may contain
    colons; ``*`` alone matches anything (including the ``*`` of actions without resource-level permissions)."""
    if pattern == "*":
        return True
    p_parts = pattern.split(":", 5)
    a_parts = arn.split(":", 5)
    if len(p_parts) != 6 or len(a_parts) != 6:
        return glob_matches(pattern, arn)
    return all(glob_matches(p, a) for p, a in zip(p_parts, a_parts, strict=True))


_NEGATED = {"StringNotEquals", "StringNotEqualsIgnoreCase", "StringNotLike", "ArnNotEquals", "ArnNotLike",
            "NumericNotEquals"}


def _one(op: str, expected: str, actual: Any) -> bool:
    """One context value against one policy value under a base operator (negations applied by the caller)."""
    text = str(actual).lower() if isinstance(actual, bool) else str(actual)
    if op in ("StringEquals", "StringNotEquals"):
        return text == expected
    if op in ("StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"):
        return text.lower() == expected.lower()
    if op in ("StringLike", "StringNotLike"):
        return glob_matches(expected, text)
    if op in ("ArnEquals", "ArnLike", "ArnNotEquals", "ArnNotLike"):
        return arn_matches(expected, text)
    if op == "Bool":
        return text.lower() == expected.lower()
    if op.startswith("Numeric"):
        a, e = float(text), float(expected)
        return {"NumericEquals": a == e, "NumericNotEquals": a == e, "NumericLessThan": a < e,
                "NumericLessThanEquals": a <= e, "NumericGreaterThan": a > e,
                "NumericGreaterThanEquals": a >= e}[op]
    raise NotImplementedError(f"condition operator {op} is not supported by local mode's IAM evaluation")


def _condition(op: str, key: str, expected: Any, context: Mapping[str, Any]) -> bool:
    qualifier = ""
    for prefix in ("ForAnyValue:", "ForAllValues:"):
        if op.startswith(prefix):
            qualifier, op = prefix, op[len(prefix):]
    if_exists = op.endswith("IfExists")
    base = op.removesuffix("IfExists")
    wanted = [str(e).lower() if isinstance(e, bool) else str(e) for e in
              (expected if isinstance(expected, list) else [expected])]
    present = key in context and context[key] is not None
    if base == "Null":
        # Null: true means "the key is absent".
        return (not present) == (wanted[0].lower() == "true")
    if not present:
        if if_exists or qualifier == "ForAllValues:":
            return True
        return base in _NEGATED
    raw = context[key]
    values = list(raw) if isinstance(raw, (list, tuple, set)) else [raw]
    if base in _NEGATED:
        # A negated operator holds when no policy value matches (every context value, for a set).
        return all(not any(_one(base, w, v) for w in wanted) for v in values)
    if qualifier == "ForAllValues:":
        return all(any(_one(base, w, v) for w in wanted) for v in values)
    return any(_one(base, w, v) for w in wanted for v in values)


def conditions_hold(condition: Mapping[str, Mapping[str, Any]], context: Mapping[str, Any]) -> bool:
    """Every operator block and every key in it must hold (keys are case-insensitive)."""
    if not condition:
        return True
    lowered = {k.lower(): v for k, v in context.items()}
    return all(_condition(op, key.lower(), expected, lowered)
               for op, block in condition.items() for key, expected in block.items())


@dataclass(frozen=True)
class Decision:
    """IAM's answer: ``allow``, ``explicit-deny`` or ``implicit-deny``, and the statement that decided."""

    outcome: str
    statement: Statement | None = None

    @property
    def allowed(self) -> bool:
        return self.outcome == ALLOW


def evaluate(statements: Iterable[Statement], action: str, resource: str, context: Mapping[str, Any]) -> Decision:
    """Explicit Deny > Allow > implicit deny, over one principal's identity-policy statements."""
    allowed: Statement | None = None
    for statement in statements:
        if not statement.matches(action, resource, context):
            continue
        if statement.effect == "Deny":
            return Decision(EXPLICIT_DENY, statement)
        allowed = allowed or statement
    return Decision(ALLOW, allowed) if allowed else Decision(IMPLICIT_DENY)


def unmet_condition_keys(statements: Iterable[Statement], action: str, resource: str,
                         context: Mapping[str, Any]) -> list[str]:
    """Condition keys of Allow statements that would apply but for a key absent from the request context: a hint
    in denial messages, since local mode builds the context and may lack a key AWS would set."""
    lowered = {k.lower() for k in context}
    missing: list[str] = []
    for st in statements:
        if st.effect != "Allow" or not st.condition or not replace(st, condition={}).matches(action, resource, {}):
            continue
        missing += [key for block in st.condition.values() for key in block if key.lower() not in lowered]
    return sorted(set(missing))


# ------------------------------------------------------------------ the template
@contextmanager
def _region(name: str) -> Iterator[None]:
    old = os.environ.get("AWS_DEFAULT_REGION")
    os.environ["AWS_DEFAULT_REGION"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("AWS_DEFAULT_REGION", None)
        else:
            os.environ["AWS_DEFAULT_REGION"] = old


def sam_transform(template: dict[str, Any], region: str) -> dict[str, Any]:
    """The CloudFormation template SAM's transform makes of ``template``.

    Managed policies are passed as an empty map: SAM then keeps the ARNs it is given and never looks AWS up. Local
    code paths stand in as S3 URIs, as ``sam package`` would make them.
    """
    if "AWS::Serverless-2016-10-31" not in str(template.get("Transform", "")):
        return copy.deepcopy(template)
    from samtranslator.parser.parser import Parser
    from samtranslator.translator.translator import Translator

    sam = copy.deepcopy(template)
    for res in sam.get("Resources", {}).values():
        props = res.get("Properties") or {}
        for key in ("CodeUri", "ContentUri", "DefinitionUri"):
            if isinstance(props.get(key), str):
                props[key] = "s3://local/placeholder"
    # SAM only needs parameters without defaults to have some value; the values are resolved later, locally.
    params = {name: "placeholder" for name, spec in sam.get("Parameters", {}).items() if "Default" not in spec}
    with _region(region):
        result: dict[str, Any] = Translator(managed_policy_map={}, sam_parser=Parser()).translate(
            sam_template=sam, parameter_values=params, passthrough_metadata=True)
    return result


def _as_tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(str(v) for v in (value if isinstance(value, list) else [value]))


def _statements(role: str, policy_name: str, document: Any) -> list[Statement]:
    raw = document.get("Statement", []) if isinstance(document, dict) else []
    out: list[Statement] = []
    for index, st in enumerate(raw if isinstance(raw, list) else [raw]):
        sid = f"{role}/{policy_name}/{index}" + (f":{st['Sid']}" if st.get("Sid") else "")
        out.append(Statement(
            sid=sid, effect=st.get("Effect", "Allow"),
            actions=_as_tuple(st.get("Action")), not_actions=_as_tuple(st.get("NotAction")),
            resources=_as_tuple(st.get("Resource")), not_resources=_as_tuple(st.get("NotResource")),
            condition={op: dict(block) for op, block in (st.get("Condition") or {}).items()},
        ))
    return out


_SESSIONS = {"lambda.amazonaws.com": None, "states.amazonaws.com": "StepFunctions",
             "sagemaker.amazonaws.com": "SageMaker", "events.amazonaws.com": "EventBridge"}


@dataclass
class PolicySet:
    """Every role of the transformed template and what uses it.

    Attributes
    ----------
    principals : dict
        Role logical id -> :class:`Principal`.
    functions : dict
        Function logical id -> role logical id.
    state_machines : dict
        State machine ARN -> role logical id.
    rules : dict
        Event rule name (``<logical id><event id>`` as local mode names them) -> role logical id.
    """

    principals: dict[str, Principal]
    functions: dict[str, str] = field(default_factory=dict)
    state_machines: dict[str, str] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)

    def by_arn(self, role_arn: str) -> Principal | None:
        """The principal whose role has this ARN."""
        return next((p for p in self.principals.values() if p.arn == role_arn), None)

    def statements(self) -> Iterator[Statement]:
        for principal in self.principals.values():
            yield from principal.statements

    def mutated(self, sid: str, action: str | None = None) -> PolicySet:
        """A copy without statement ``sid`` (or, with ``action``, without that entry of its Action list)."""
        principals: dict[str, Principal] = {}
        for role, p in self.principals.items():
            kept: list[Statement] = []
            for st in p.statements:
                if st.sid != sid:
                    kept.append(st)
                elif action is not None:
                    kept.append(st.without_action(action))
            principals[role] = replace(p, statements=kept)
        return replace(self, principals=principals)


def _role_logical_id(value: Any) -> str | None:
    """The role a ``Role``/``RoleArn`` property names (``!GetAtt X.Arn``), if it is the template's."""
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        target = value["Fn::GetAtt"]
        return str(target[0] if isinstance(target, list) else str(target).split(".")[0])
    return None


def principals_from_template(transformed: dict[str, Any], resolver: Any, account: str,
                             function_names: Mapping[str, str] | None = None) -> PolicySet:
    """Each ``AWS::IAM::Role`` of a transformed template with its inline and ``AWS::IAM::Policy`` statements.

    Parameters
    ----------
    transformed : dict
        The output of :func:`sam_transform`.
    resolver : localmode.template.Resolver
        Resolves the statements' intrinsics; ``refs``/``attrs`` of the roles are used for their ARNs when known.
    account : str
        The account of the role ARNs that are not in ``resolver.attrs``.
    function_names : mapping, optional
        Function logical id -> physical name (the Lambda session name); defaults to ``resolver.refs``.
    """
    resources: dict[str, Any] = transformed.get("Resources", {})
    conditions = getattr(resolver, "conditions", {})
    active = {k: v for k, v in resources.items()
              if "Condition" not in v or bool(conditions.get(v["Condition"], True))}
    policy_set = PolicySet(principals=_roles(active, resolver, account))
    _attach_policies(policy_set, active, resolver)
    _link_users(policy_set, active, resolver, dict(function_names or {}))
    return policy_set


def _roles(resources: dict[str, Any], resolver: Any, account: str) -> dict[str, Principal]:
    """Each ``AWS::IAM::Role`` with its inline policies' statements."""
    stack = resolver.pseudo.get("AWS::StackName", "stack")
    principals: dict[str, Principal] = {}
    for logical_id, res in resources.items():
        if res.get("Type") != "AWS::IAM::Role":
            continue
        props = res.get("Properties", {})
        trust = props.get("AssumeRolePolicyDocument", {}).get("Statement", [])
        services = [s for st in trust for s in _as_tuple((st.get("Principal") or {}).get("Service"))]
        service = services[0] if services else ""
        statements: list[Statement] = []
        for policy in props.get("Policies", []) or []:
            name = str(resolver.resolve(policy.get("PolicyName", "policy")))
            statements += _statements(logical_id, name, resolver.resolve(policy.get("PolicyDocument", {})))
        attrs = resolver.attrs.get(logical_id) or {}
        principals[logical_id] = Principal(
            role=logical_id, arn=str(attrs.get("Arn") or f"arn:aws:iam::{account}:role/{stack}-{logical_id}"),
            service=service, session=_SESSIONS.get(service) or logical_id, statements=statements,
            managed_policy_arns=[str(a) for a in resolver.resolve(props.get("ManagedPolicyArns", []) or [])],
        )
    return principals


def _attach_policies(policy_set: PolicySet, resources: dict[str, Any], resolver: Any) -> None:
    """Add each ``AWS::IAM::Policy``'s statements to the roles it names."""
    for logical_id, res in resources.items():
        if res.get("Type") != "AWS::IAM::Policy":
            continue
        props = res.get("Properties", {})
        for role_ref in props.get("Roles", []):
            role = role_ref.get("Ref") if isinstance(role_ref, dict) else None
            if role in policy_set.principals:
                name = str(resolver.resolve(props.get("PolicyName", logical_id)))
                policy_set.principals[role].statements += _statements(
                    role, name, resolver.resolve(props.get("PolicyDocument", {})))


def _link_users(policy_set: PolicySet, resources: dict[str, Any], resolver: Any, names: dict[str, str]) -> None:
    """Record which role each function, state machine and event rule runs as (and the functions' session names)."""
    for logical_id, res in resources.items():
        props = res.get("Properties", {})
        kind = res.get("Type")
        if kind == "AWS::Lambda::Function":
            role = _role_logical_id(props.get("Role"))
            if role in policy_set.principals:
                policy_set.functions[logical_id] = role
                session = names.get(logical_id) or resolver.refs.get(logical_id)
                if session:
                    policy_set.principals[role].session = str(session)
        elif kind == "AWS::StepFunctions::StateMachine":
            role = _role_logical_id(props.get("RoleArn"))
            if role in policy_set.principals and logical_id in resolver.refs:
                policy_set.state_machines[str(resolver.refs[logical_id])] = role
        elif kind == "AWS::Events::Rule":
            for target in props.get("Targets", []):
                role = _role_logical_id(target.get("RoleArn"))
                if role in policy_set.principals:
                    # SAM names a rule <resource><event id>; local mode's rules carry the same name.
                    policy_set.rules[logical_id] = role


def describe(statement: Statement) -> str:
    """A one-line summary for reports."""
    actions = ", ".join(statement.actions or tuple(f"NOT {a}" for a in statement.not_actions))
    resources = ", ".join(statement.resources or tuple(f"NOT {r}" for r in statement.not_resources))
    cond = ""
    if statement.condition:
        cond = " if " + "; ".join(f"{op} {k}={v}" for op, block in statement.condition.items()
                                  for k, v in block.items())
    return f"{statement.effect} {actions} on {resources}{cond}"


__all__ = ["ALLOW", "EXPLICIT_DENY", "IMPLICIT_DENY", "Decision", "PolicySet", "Principal", "Statement",
           "action_matches", "arn_matches", "conditions_hold", "describe", "evaluate", "glob_matches",
           "principals_from_template", "sam_transform", "unmet_condition_keys"]
