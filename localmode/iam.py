"""IAM in local mode: every AWS call made on behalf of a role is checked against that role's policies.

Who acts is a context variable: :class:`~localmode.lambdas.LambdaRuntime` sets the function's role around each
invocation, the ASL interpreter's execution thread runs as the state machine's role, a training job's S3 access and
an endpoint's model download run as the role passed to SageMaker, and an EventBridge rule starts a state machine
as the role SAM gives the rule. Local mode's own scaffolding (deploying the stack, tests' fixtures, the operator's
tools) acts as nobody and is not checked, as an administrator's calls would not be limited by these roles.

Each call by a principal is mapped to the authorizations AWS makes (:mod:`localmode.iam_actions`), evaluated
against the role's statements from the SAM-transformed template (:mod:`localmode.iam_policy`), and recorded in a
JSON-lines trace for the mutation test (:mod:`localmode.iam_mutations`). A denied call raises botocore's
``ClientError`` with the code and message shape the service uses::

    User: arn:aws:sts::123456789012:assumed-role/<role>/<session> is not authorized to perform: s3:GetObject
    on resource: "arn:aws:s3:::bucket/key" because no identity-based policy allows the s3:GetObject action

Modes: ``enforce`` (default), ``report`` (denials are logged and traced, the call goes on) and ``off``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from localmode.iam_actions import CITED, Check, Mapper, MotoWorld, UnmappedOperation
from localmode.iam_policy import (
    ALLOW,
    EXPLICIT_DENY,
    Decision,
    PolicySet,
    Principal,
    evaluate,
    principals_from_template,
    sam_transform,
    unmet_condition_keys,
)

log = logging.getLogger("localmode.iam")

MODES = ("enforce", "report", "off")
ENV_MODE = "LOCALMODE_IAM"
ENV_TRACE_DIR = "LOCALMODE_IAM_TRACE_DIR"

_ACTING: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("localmode_iam_principal", default=None)
_ENFORCER: Enforcer | None = None

# The error each service answers a denied request with: (code, HTTP status). JSON-protocol services use
# AccessDeniedException; the XML/query ones AccessDenied; SNS its own AuthorizationError.
_DENIED = {"s3": ("AccessDenied", 403), "sns": ("AuthorizationError", 403), "sqs": ("AccessDenied", 403),
           "iam": ("AccessDenied", 403), "sts": ("AccessDenied", 403), "cloudwatch": ("AccessDenied", 403),
           "lambda": ("AccessDeniedException", 403), "ec2": ("UnauthorizedOperation", 403)}
_DEFAULT_DENIED = ("AccessDeniedException", 400)


# ------------------------------------------------------------------ who acts
def current() -> Principal | None:
    """The principal the current code acts as (None: local mode's scaffolding, not checked)."""
    return _ACTING.get()


@contextlib.contextmanager
def acting_as(principal: Principal | None, replace: bool = False) -> Iterator[None]:
    """Run the block as ``principal``; None leaves the current one, or with ``replace`` acts as nobody."""
    if principal is None and not replace:
        yield
        return
    token = _ACTING.set(principal)
    try:
        yield
    finally:
        _ACTING.reset(token)


def _lookup(kind: str, key: str | None) -> Principal | None:
    enforcer = _ENFORCER
    if enforcer is None or key is None:
        return None
    policies = enforcer.policies
    role = {"function": policies.functions, "state-machine": policies.state_machines,
            "rule": policies.rules}.get(kind, {}).get(key)
    if kind == "role-arn":
        # A role the template does not define was made by a test's own scaffolding: not checked.
        principal = policies.by_arn(key)
        if principal is None:
            log.debug("IAM: role %s is not the template's; its calls are not checked", key)
        return principal
    if role is None:
        raise KeyError(f"local mode IAM: the template gives {kind} {key} no role")
    return policies.principals[role]


def as_function(logical_id: str) -> contextlib.AbstractContextManager[None]:
    """Act as a function's execution role (no-op when IAM is not enforced)."""
    return acting_as(_lookup("function", logical_id))


def as_role_arn(role_arn: str | None) -> contextlib.AbstractContextManager[None]:
    """Act as the role with this ARN, as a service does with the role passed to it, whoever asked it to (as
    nobody, unchecked, when the role is not the template's)."""
    return acting_as(_lookup("role-arn", role_arn), replace=True)


def as_rule(rule_name: str) -> contextlib.AbstractContextManager[None]:
    """Act as the role an EventBridge rule uses to reach its target."""
    return acting_as(_lookup("rule", rule_name))


def run_as_role_arn(role_arn: str | None, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` wrapped to run as ``role_arn`` (as nobody when the role is not the template's): the work a service
    does with the role passed to it, whoever started it."""
    def run() -> Any:
        with as_role_arn(role_arn):
            return fn()

    return run


# ------------------------------------------------------------------ enforcement
class Enforcer:
    """Checks, records and (in ``enforce`` mode) denies the calls principals make.

    Parameters
    ----------
    policies : PolicySet
        The roles and what uses them.
    mapper : Mapper
        Maps calls to authorizations.
    mode : str
        ``enforce`` or ``report``.
    trace_path : Path, optional
        JSON-lines trace of every check; its first line describes the deployment (see :func:`enable`).
    deployment : dict, optional
        Written as the trace's header so that the mutation test can resolve the template as this run did.
    """

    def __init__(self, policies: PolicySet, mapper: Mapper, mode: str = "enforce", trace_path: Path | None = None,
                 deployment: dict[str, Any] | None = None):
        if mode not in ("enforce", "report"):
            raise ValueError(f"IAM mode {mode!r}: use one of {MODES}")
        self.policies = policies
        self.mapper = mapper
        self.mode = mode
        self.trace_path = trace_path
        self.denials: list[dict[str, Any]] = []
        self.unmapped: list[str] = []
        self.calls = 0
        self._lock = threading.Lock()
        self._trace: Any = None
        if trace_path is not None:
            trace_path.parent.mkdir(parents=True, exist_ok=True)
            self._trace = trace_path.open("a", buffering=1)
            self._write({"type": "deployment", **(deployment or {})})

    def _write(self, record: dict[str, Any]) -> None:
        if self._trace is None:
            return
        with self._lock:
            self._trace.write(json.dumps(record, default=str, sort_keys=True) + "\n")

    def _context(self, principal: Principal, check: Check) -> dict[str, Any]:
        return {"aws:PrincipalArn": principal.arn, "aws:PrincipalAccount": principal.account,
                "aws:PrincipalType": "AssumedRole", "aws:userid": f"{principal.role}:{principal.session}",
                **check.context}

    def decide(self, principal: Principal, check: Check, context: dict[str, Any]) -> Decision:
        """The caller's decision, or the passed role's where the check allows either (``or_role``)."""
        decision = evaluate(principal.statements, check.action, check.resource, context)
        if decision.allowed or decision.outcome == EXPLICIT_DENY or not check.or_role:
            return decision
        other = self.policies.by_arn(check.or_role)
        if other is None:
            return decision
        alternative = evaluate(other.statements, check.action, check.resource, context)
        return alternative if alternative.allowed else decision

    def authorize(self, client: Any, principal: Principal, operation: str, params: dict[str, Any]) -> None:
        """Check one call; raise the service's AccessDenied error when a required authorization fails."""
        service = client.meta.service_model.service_name
        signing = client.meta.service_model.signing_name
        try:
            checks = self.mapper.checks(service, operation, dict(params or {}), signing_name=signing)
        except UnmappedOperation as err:
            self.unmapped.append(str(err))
            self._write({"type": "unmapped", "principal": principal.role, "service": service,
                         "operation": operation, "error": str(err), "time": time.time()})
            if self.mode == "enforce":
                raise
            log.warning("IAM (report mode): %s", err)
            return
        self.calls += 1
        call_id = uuid.uuid4().hex[:12]
        first_denial: tuple[Check, Decision] | None = None
        for check in checks:
            context = self._context(principal, check)
            decision = self.decide(principal, check, context)
            self._write({
                "type": "check", "call": call_id, "time": time.time(), "principal": principal.role,
                "role_arn": principal.arn, "service": service, "operation": operation, "action": check.action,
                "resource": check.resource, "context": context, "kind": check.kind, "why": check.why,
                "or_role": check.or_role, "allowed": decision.allowed, "decision": decision.outcome,
                "statement": decision.statement.sid if decision.statement else None,
            })
            if not decision.allowed and first_denial is None:
                first_denial = (check, decision)
        if first_denial is None:
            return
        check, decision = first_denial
        hint = unmet_condition_keys(principal.statements, check.action, check.resource, self._context(principal, check))
        denial = {"principal": principal.role, "service": service, "operation": operation, "action": check.action,
                  "resource": check.resource, "kind": check.kind, "why": CITED.get(check.why, ""),
                  "missing_condition_keys": hint}
        self.denials.append(denial)
        error = denied_error(client, operation, principal, check, decision)
        if self.mode == "report":
            log.warning("IAM (report mode) would deny %s.%s: %s", service, operation,
                        error.response["Error"]["Message"])
            return
        log.info("IAM denied %s.%s for %s: %s%s", service, operation, principal.role, check.action,
                 f" (condition keys not in the local request context: {hint})" if hint else "")
        raise error

    def close(self) -> None:
        """Close the trace."""
        if self._trace is not None:
            with self._lock:
                self._trace.close()
                self._trace = None

    # ------------------------------------------------------------------ hooks
    def install(self) -> Callable[[], None]:
        """Hook botocore's API calls, the ASL interpreter's executions and thread pools; returns the undo."""
        global _ENFORCER
        from botocore.client import BaseClient
        from moto.stepfunctions.parser.backend.execution_worker import ExecutionWorker

        if _ENFORCER is not None:
            raise RuntimeError("local mode IAM is already installed (one LocalCloud at a time)")
        enforcer = self
        original_call = BaseClient._make_api_call
        original_logic = ExecutionWorker._execution_logic
        original_submit = ThreadPoolExecutor.submit
        original_start = threading.Thread.start

        def _make_api_call(client: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
            principal = _ACTING.get()
            if principal is not None and _ENFORCER is enforcer:
                enforcer.authorize(client, principal, operation_name, api_params)
            return original_call(client, operation_name, api_params)

        def _execution_logic(worker: Any) -> Any:
            arn = worker._evaluation_details.state_machine_details.arn
            role = enforcer.policies.state_machines.get(arn)
            # Whoever called StartExecution, the execution acts as the state machine's role.
            with acting_as(enforcer.policies.principals[role] if role else None, replace=True):
                return original_logic(worker)

        def submit(pool: Any, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            # Work in a pool (s3transfer's, a handler's) acts as whoever submitted it, not as whoever happened to
            # start the pool's thread.
            return original_submit(pool, contextvars.copy_context().run, fn, *args, **kwargs)

        def start(thread: threading.Thread) -> None:
            # A thread acts as the principal that started it (the ASL interpreter runs each state in threads of
            # its own; a handler's threads are the function's).
            if _ACTING.get() is not None and not getattr(thread, "_localmode_iam", False):
                run, context = thread.run, contextvars.copy_context()
                thread.run = lambda: context.run(run)  # type: ignore[method-assign]
                thread._localmode_iam = True  # type: ignore[attr-defined]
            original_start(thread)

        BaseClient._make_api_call = _make_api_call
        ExecutionWorker._execution_logic = _execution_logic  # type: ignore[method-assign]
        ThreadPoolExecutor.submit = submit  # type: ignore[method-assign]
        threading.Thread.start = start  # type: ignore[method-assign,assignment]
        _ENFORCER = self

        def undo() -> None:
            global _ENFORCER
            BaseClient._make_api_call = original_call
            ExecutionWorker._execution_logic = original_logic  # type: ignore[method-assign]
            ThreadPoolExecutor.submit = original_submit  # type: ignore[method-assign]
            threading.Thread.start = original_start  # type: ignore[method-assign]
            _ENFORCER = None
            self.close()

        return undo


def denied_error(client: Any, operation: str, principal: Principal, check: Check, decision: Decision) -> ClientError:
    """The ``ClientError`` (the service's modeled subclass where it has one) AWS would answer with."""
    service = client.meta.service_model.service_name
    code, status = _DENIED.get(service, _DEFAULT_DENIED)
    if service == "s3" and operation in ("HeadObject", "HeadBucket"):
        # A HEAD response has no body: botocore reports the bare status.
        code, message = "403", "Forbidden"
    elif check.kind == "missing-key":
        message = "Access Denied"
    else:
        resource = f'"{check.resource}"' if service == "s3" else check.resource
        on = "" if check.resource == "*" else f" on resource: {resource}"
        reason = ("with an explicit deny in an identity-based policy" if decision.outcome == EXPLICIT_DENY
                  else f"because no identity-based policy allows the {check.action} action")
        message = f"User: {principal.assumed_role_arn} is not authorized to perform: {check.action}{on} {reason}"
    parsed = {"Error": {"Code": code, "Message": message},
              "ResponseMetadata": {"RequestId": uuid.uuid4().hex.upper(), "HTTPStatusCode": status,
                                   "HTTPHeaders": {}, "RetryAttempts": 0}}
    error_class = client.exceptions.from_code(code)
    error: ClientError = error_class(parsed, operation)
    return error


# ------------------------------------------------------------------ LocalCloud
def policies_for(template: dict[str, Any], resolver: Any, account: str, region: str) -> PolicySet:
    """The roles of ``template`` after SAM's transform, resolved with ``resolver``."""
    return principals_from_template(sam_transform(template, region), resolver, account)


def enable(cloud: Any, mode: str | None = None, trace_dir: Path | None = None) -> Enforcer | None:
    """Turn IAM on for a started :class:`~localmode.cloud.LocalCloud` (after its deployment).

    Parameters
    ----------
    cloud : LocalCloud
    mode : str, optional
        ``enforce``, ``report`` or ``off``; default ``$LOCALMODE_IAM`` or ``enforce``.
    trace_dir : Path, optional
        Where the trace goes; default ``$LOCALMODE_IAM_TRACE_DIR`` or ``<work dir>/iam-trace``.

    Returns
    -------
    Enforcer or None
        None when off. ``cloud._undo`` gets the uninstall.
    """
    mode = mode or os.environ.get(ENV_MODE) or "enforce"
    if mode not in MODES:
        raise ValueError(f"IAM mode {mode!r}: use one of {MODES}")
    if mode == "off":
        return None
    from localmode.cloud import ACCOUNT, REGION

    policies = policies_for(cloud.template, cloud.resolver, ACCOUNT, REGION)
    directory = Path(trace_dir or os.environ.get(ENV_TRACE_DIR) or cloud.work_dir / "iam-trace")
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    trace = directory / f"{cloud.stack_name}-{stamp}.jsonl"
    deployment = {
        "stack_name": cloud.stack_name, "account": ACCOUNT, "region": REGION,
        "parameters": cloud.parameter_values, "refs": cloud.resolver.refs, "attrs": cloud.resolver.attrs,
        "pseudo": cloud.resolver.pseudo, "mode": mode,
    }
    enforcer = Enforcer(policies, Mapper(ACCOUNT, REGION, MotoWorld(ACCOUNT, REGION)), mode=mode,
                        trace_path=trace, deployment=deployment)
    cloud._undo.append(enforcer.install())
    return enforcer


def summary(enforcer: Enforcer | None) -> str:
    """One line for the end of a run."""
    if enforcer is None:
        return "IAM: not enforced"
    where = f"; trace {enforcer.trace_path}" if enforcer.trace_path else ""
    denied = f", {len(enforcer.denials)} denied" if enforcer.denials else ""
    unmapped = f", {len(enforcer.unmapped)} unmapped" if enforcer.unmapped else ""
    return f"IAM ({enforcer.mode}): {enforcer.calls} calls checked{denied}{unmapped}{where}"


__all__ = ["ALLOW", "ENV_MODE", "ENV_TRACE_DIR", "MODES", "Enforcer", "acting_as", "as_function", "as_role_arn",
           "UnmappedOperation", "as_rule", "current", "denied_error", "enable", "policies_for", "run_as_role_arn",
           "summary"]
