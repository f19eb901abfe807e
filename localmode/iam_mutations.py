"""Mutation test of the template's IAM policies against traces of local-mode runs.

Every call a principal made in local mode is in a trace (``<work dir>/iam-trace/*.jsonl``, or the directory
``$LOCALMODE_IAM_TRACE_DIR`` names) with the authorizations it needed. For each statement of the SAM-transformed
``template.yaml`` (and each action of a statement with several), this tool removes it and re-evaluates every
recorded authorization against the mutated policies: the removal is *caught* when some call that succeeded would
then be denied (or, for S3's missing-key rule, would get 403 instead of 404). A removal that is not caught is
listed with the reason the permission is still needed (:data:`REASONS`: what the local loop cannot exercise), or
as UNJUSTIFIED.

Usage::

    python -m localmode.iam_mutations --trace .local/iam-trace [more files or directories] \\
        --out docs/iam-mutations.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localmode.iam_actions import Check
from localmode.iam_policy import (
    EXPLICIT_DENY,
    Decision,
    PolicySet,
    Statement,
    describe,
    evaluate,
    glob_matches,
    principals_from_template,
    sam_transform,
)
from localmode.template import Resolver, load_template

REPO_ROOT = Path(__file__).resolve().parent.parent

# (role logical id pattern, action pattern) -> why the permission is needed although no local run exercises it.
REASONS: dict[tuple[str, str], str] = {
    ("ConfigureAutoscalingFunctionRole", "cloudwatch:DeleteAlarms"):
        "Application Auto Scaling deletes a target tracking policy's old alarms with the caller's permissions when "
        "the policy is replaced (a redeployment that changes the target); the local loop configures each endpoint "
        "once.",
    ("UpdateEndpointFunctionRole", "application-autoscaling:DeregisterScalableTarget"):
        "update_endpoint releases the variant from auto scaling only when a new model changes the instance type "
        "(tests/unit/test_deployment_handlers.py covers it); every local deployment keeps the stack's one type.",
    ("SageMakerExecutionRole", "kms:Encrypt"):
        "OutputDataConfig.KmsKeyId: 'the SageMaker execution role must include permissions to call kms:Encrypt' "
        "(CreateTrainingJob API reference); SageMaker's own upload of the model artefact is not emulated.",
    ("RetrainingStateMachineRole", "sagemaker:ListTags"):
        "Listed in the Step Functions policy for the SageMaker .sync integration (Step Functions Developer Guide, "
        "'IAM policies for Amazon SageMaker AI'); local mode's integration does not list tags.",
    ("CheckDataFunctionRole", "s3:AbortMultipartUpload"):
        "lesion_common.s3_stream aborts a dataset file's multipart upload when writing it fails (an error inside "
        "the block); tests/unit/test_class_counts.py drives that path on moto, the local runs never fail there.",
    ("PrepareTrainingFunctionRole", "sagemaker:DescribeModelPackage"):
        "Read when an approved model exists, to pass it as the baseline channel; the local runs retrain before any "
        "approval (tests/unit/test_training_handlers.py covers it).",
    ("RegisterModelFunctionRole", "dynamodb:*"):
        "Powertools idempotency reads the record (GetItem) when a request repeats while in progress and deletes it "
        "(DeleteItem) when the handler fails; the local runs register each model once.",
    ("*FunctionRole", "sqs:SendMessage"):
        "Lambda's on-failure destination (SAM's EventInvokeConfig policy): used only when an asynchronous "
        "invocation fails after its retries; the local loop drives that path for ValidateImage "
        "(tests/fidelity/test_deploy_rules.py), the same statement as for the other asynchronous functions.",
    ("ValidateImageFunctionRole", "s3:ListBucket"):
        "Makes S3 answer 404 instead of 403 for an upload deleted before validation ran (the handler skips it); "
        "the local runs validate uploads that exist.",
    ("EvaluateQualityFunctionRole", "s3:ListBucket"):
        "Makes S3 answer 404 instead of 403 for a ground-truth file deleted before the run; the local runs read "
        "files that exist.",
    ("EvaluateModelFunctionRole", "s3:ListBucket"):
        "Makes S3 answer 404 for a job without output.tar.gz, so the failure says 'missing' not 'denied' "
        "(tests/unit/test_training_handlers.py::test_evaluate_tells_a_missing_output_from_a_denied_read).",
    ("ValidateImageFunctionRole", "s3:GetObject"):
        "An upload event without a version id (a bucket whose versioning was suspended) is read pinned to its ETag "
        "with GetObject; the stack's bucket is versioned, so the local events carry version ids.",
    ("RegisterModelFunctionRole", "s3:GetObject"):
        "Kept on purpose, unverified: whether CreateModelPackage reads ModelDataUrl and the ModelQuality statistics "
        "with the caller's rights is not documented; removing it could fail the first registration on AWS. To be "
        "checked on a real account.",
    ("SageMakerExecutionRole", "ecr:*"):
        "SageMaker pulls the training and inference images from ECR with the execution role; local mode runs the "
        "images' code from the repository.",
    ("SageMakerExecutionRole", "logs:*"):
        "SageMaker writes training-job and endpoint logs to /aws/sagemaker/* with the execution role; local mode "
        "writes them to files.",
    ("SageMakerExecutionRole", "cloudwatch:PutMetricData"):
        "The training container and SageMaker publish job/endpoint metrics with the execution role; local mode "
        "parses the metrics from the log instead.",
    ("SageMakerExecutionRole", "ec2:*"):
        "Jobs and endpoints in a VPC (SubnetIds set): SageMaker creates and deletes ENIs with the execution role; "
        "local mode has no VPC.",
    ("SageMakerExecutionRole", "kms:CreateGrant"):
        "SageMaker creates grants on the key for encrypted ML storage volumes of jobs and endpoints; local mode has "
        "no volumes.",
    ("SageMakerExecutionRole", "kms:DescribeKey"):
        "SageMaker describes the volume/output key before it uses it for a job's or endpoint's storage; local mode "
        "has no volumes.",
    ("SageMakerExecutionRole", "s3:AbortMultipartUpload"):
        "SageMaker aborts its own failed multipart uploads of model artefacts and checkpoints; local uploads do "
        "not fail midway.",
    ("*StateMachineRole", "logs:*"):
        "Step Functions sets up vended log delivery to the state machine's log group (Logging) with its role; local "
        "mode does not deliver execution logs to CloudWatch Logs.",
}


@dataclass(frozen=True)
class Record:
    """One recorded authorization, deduplicated across calls."""

    principal: str
    action: str
    resource: str
    context: str  # JSON, so records hash
    kind: str
    or_role: str | None
    allowed: bool

    def check(self) -> Check:
        return Check(self.action, self.resource, json.loads(self.context), or_role=self.or_role, kind=self.kind)


@dataclass
class Trace:
    """One trace file: its deployment, the policies of the current template resolved as that run resolved them,
    and its distinct authorizations."""

    path: Path
    policies: PolicySet
    records: dict[Record, int] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    # Values that differ from run to run (KMS key ids) -> the logical id, so reports of runs compare.
    aliases: dict[str, str] = field(default_factory=dict)


def _resolver(template: dict[str, Any], header: dict[str, Any]) -> Resolver:
    known = set(template.get("Parameters", {}))
    params = {k: ",".join(v) if isinstance(v, list) else str(v) for k, v in (header.get("parameters") or {}).items()
              if k in known}
    resolver = Resolver(template, params, header.get("pseudo") or {})
    resolver.refs.update(header.get("refs") or {})
    resolver.attrs.update(header.get("attrs") or {})
    stack = header.get("stack_name", "stack")
    account, region = header.get("account", "123456789012"), header.get("region", "us-east-1")
    # Resources added to the template since the run: named as local mode would name them.
    for logical_id in template.get("Resources", {}):
        resolver.refs.setdefault(logical_id, f"{stack}-{logical_id}")
        resolver.attrs.setdefault(logical_id, defaultdict(
            lambda lid=logical_id: f"arn:aws:local:{region}:{account}:{stack}-{lid}"))  # type: ignore[misc]
    return resolver


def load_trace(path: Path, template: dict[str, Any], transformed: dict[str, Any]) -> Trace:
    """Read a trace and resolve the current template's policies with the run's physical names."""
    header: dict[str, Any] | None = None
    records: dict[Record, int] = defaultdict(int)
    unmapped: list[str] = []
    with path.open() as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("type") == "deployment":
                header = row
            elif row.get("type") == "check":
                records[Record(row["principal"], row["action"], row["resource"],
                               json.dumps(row.get("context") or {}, sort_keys=True), row.get("kind", "required"),
                               row.get("or_role"), bool(row["allowed"]))] += 1
            elif row.get("type") == "unmapped":
                unmapped.append(row.get("error", ""))
    if header is None:
        raise ValueError(f"{path}: no deployment header (not a local-mode IAM trace)")
    resolver = _resolver(template, header)
    policies = principals_from_template(transformed, resolver, header.get("account", "123456789012"))
    aliases: dict[str, str] = {}
    for logical_id, attrs in (header.get("attrs") or {}).items():
        if isinstance(attrs, dict) and "KeyId" in attrs:
            aliases[str(attrs.get("Arn"))] = f"<{logical_id}>"
            aliases[str(attrs["KeyId"])] = f"<{logical_id}>"
    return Trace(path, policies, dict(records), unmapped, aliases)


def decide(policies: PolicySet, record: Record) -> Decision:
    """The decision the enforcer would make for this record under ``policies``."""
    principal = policies.principals.get(record.principal)
    if principal is None:
        return Decision("implicit-deny")
    check = record.check()
    decision = evaluate(principal.statements, check.action, check.resource, check.context)
    if decision.allowed or decision.outcome == EXPLICIT_DENY or not check.or_role:
        return decision
    other = policies.by_arn(check.or_role)
    if other is not None:
        alternative = evaluate(other.statements, check.action, check.resource, check.context)
        if alternative.allowed:
            return alternative
    return decision


@dataclass
class Outcome:
    """What removing one statement (or one action of it) did."""

    sid: str
    action: str | None
    statement: Statement
    caught_by: list[Record] = field(default_factory=list)
    matched: int = 0  # distinct recorded authorizations the statement (or action) applies to
    redundant_with: set[str] = field(default_factory=set)

    @property
    def caught(self) -> bool:
        return bool(self.caught_by)


def _reason(role: str, actions: Iterable[str]) -> str | None:
    reasons: list[str] = []
    for action in actions:
        found = next((text for (r, a), text in REASONS.items()
                      if glob_matches(r, role) and glob_matches(a, action, ignore_case=True)), None)
        if found is None:
            return None
        if found not in reasons:
            reasons.append(found)
    return " ".join(reasons) if reasons else None


def run(traces: list[Trace]) -> tuple[list[Outcome], dict[str, Any]]:
    """Apply every mutation to every trace; return the outcomes and the baseline facts for the report."""
    baseline: list[tuple[Trace, Record, Decision]] = []
    stale: list[Record] = []
    for trace in traces:
        for record in trace.records:
            decision = decide(trace.policies, record)
            if record.kind == "required" and record.allowed and not decision.allowed:
                stale.append(record)  # the template changed since the run: this call would now be denied
            baseline.append((trace, record, decision))
    statements: dict[str, Statement] = {}
    by_trace: dict[int, dict[str, Statement]] = {}
    for trace in traces:
        by_trace[id(trace)] = {st.sid: st for st in trace.policies.statements()}
        for st in trace.policies.statements():
            statements.setdefault(st.sid, st)
    outcomes: list[Outcome] = []
    for sid, st in statements.items():
        role = sid.split("/", 1)[0]
        mutations: list[str | None] = [None]
        if len(st.actions) > 1:
            mutations += list(st.actions)
        for action in mutations:
            outcome = Outcome(sid, action, st)
            mutated: dict[int, PolicySet] = {}
            for trace, record, before in baseline:
                if record.principal != role and not (record.or_role and trace.policies.principals.get(role) and
                                                     trace.policies.principals[role].arn == record.or_role):
                    continue
                # Each trace resolves the statement with its own run's physical names (keys, ARNs).
                own = by_trace[id(trace)].get(sid)
                check = record.check()
                applies = own is not None and own.matches(check.action, check.resource, check.context) and (
                    action is None or glob_matches(action, check.action, ignore_case=True))
                if not applies:
                    continue
                outcome.matched += 1
                if id(trace) not in mutated:
                    mutated[id(trace)] = trace.policies.mutated(sid, action)
                after = decide(mutated[id(trace)], record)
                if before.allowed and not after.allowed:
                    outcome.caught_by.append(record)
                elif before.allowed and after.statement is not None:
                    outcome.redundant_with.add(after.statement.sid)
            outcomes.append(outcome)
    denied = sorted({r for t in traces for r in t.records if not r.allowed and r.kind == "required"},
                    key=lambda r: (r.principal, r.action, r.resource))
    facts = {"records": sum(len(t.records) for t in traces), "calls": sum(sum(t.records.values()) for t in traces),
             "stale": stale, "denied": denied, "unmapped": sorted({u for t in traces for u in t.unmapped}),
             "principals_seen": {r.principal for t in traces for r in t.records},
             "principals": sorted({p for t in traces for p in t.policies.principals})}
    return outcomes, facts


def _verdict(outcome: Outcome, seen: set[str]) -> tuple[str, str]:
    role = outcome.sid.split("/", 1)[0]
    if outcome.caught:
        r = min(outcome.caught_by, key=lambda rec: (rec.action, rec.resource))
        return "caught", f"{r.action} on {r.resource}"
    actions = [outcome.action] if outcome.action else list(outcome.statement.actions or outcome.statement.not_actions)
    reason = _reason(role, actions)
    if reason:
        return "not caught", reason
    if outcome.redundant_with:
        return "UNJUSTIFIED", f"redundant: its calls are also allowed by {', '.join(sorted(outcome.redundant_with))}"
    if role not in seen:
        return "UNJUSTIFIED", "this role made no call in the traces"
    return "UNJUSTIFIED", "no traced call needs it"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report(outcomes: list[Outcome], facts: dict[str, Any], traces: list[Trace], command: str) -> str:
    """The Markdown report."""
    seen = facts["principals_seen"]
    stmt = [o for o in outcomes if o.action is None]
    acts = [o for o in outcomes if o.action is not None]
    verdicts = {id(o): _verdict(o, seen) for o in outcomes}

    def count(items: list[Outcome], label: str) -> int:
        return sum(1 for o in items if verdicts[id(o)][0] == label)

    lines = [
        "# IAM mutation report",
        "",
        "Generated by `localmode/iam_mutations.py`; do not edit by hand. Regenerate with:",
        "",
        f"    {command}",
        "",
        "Where traces come from: `make run` writes them to `.local/iam-trace/`; the e2e tests write them where "
        "`LOCALMODE_IAM_TRACE_DIR` points (`LOCALMODE_IAM_TRACE_DIR=$PWD/.local/iam-trace-e2e "
        ".venv/bin/python -m pytest -q tests/e2e`).",
        "",
        "Each statement of the SAM-transformed template.yaml (and each action of a statement with several) is "
        "removed in turn and every authorization recorded in the traces is evaluated again: a removal is **caught** "
        "when a call that succeeded would be denied (or S3 would answer 403 instead of 404). A removal that is not "
        "caught needs a reason (what the local loop cannot exercise, `REASONS` in localmode/iam_mutations.py); "
        "without one it is **UNJUSTIFIED**.",
        "",
        f"Traces: {len(traces)} ({', '.join(t.path.name for t in traces)}); {facts['calls']} authorizations, "
        f"{facts['records']} distinct.",
        "",
        "| | statements | actions of multi-action statements |",
        "| --- | --- | --- |",
        f"| caught | {count(stmt, 'caught')} | {count(acts, 'caught')} |",
        f"| not caught, with a reason | {count(stmt, 'not caught')} | {count(acts, 'not caught')} |",
        f"| UNJUSTIFIED | {count(stmt, 'UNJUSTIFIED')} | {count(acts, 'UNJUSTIFIED')} |",
        "",
    ]
    idle = [p for p in facts["principals"] if p not in seen]
    if idle:
        lines += [f"Roles that made no call in these traces: {', '.join(idle)}.", ""]
    if facts["denied"]:
        lines += ["## Denied calls in the traces (permissions the code needs and the template lacks)", "",
                  "| role | action | resource |", "| --- | --- | --- |"]
        lines += [f"| {r.principal} | {r.action} | {_cell(r.resource)} |" for r in facts["denied"]]
        lines.append("")
    if facts["stale"]:
        lines += ["## Calls that succeeded in the traces but the current template denies", "",
                  "| role | action | resource |", "| --- | --- | --- |"]
        lines += [f"| {r.principal} | {r.action} | {_cell(r.resource)} |" for r in sorted(
            set(facts["stale"]), key=lambda r: (r.principal, r.action, r.resource))]
        lines.append("")
    if facts["unmapped"]:
        lines += ["## Unmapped operations (not checked)", ""] + [f"- {u}" for u in facts["unmapped"]] + [""]
    lines += ["## Statements", "", "| statement | policy | result | detail |", "| --- | --- | --- | --- |"]
    for o in sorted(stmt, key=lambda o: o.sid):
        verdict, detail = verdicts[id(o)]
        lines.append(f"| {_cell(o.sid)} | {_cell(describe(o.statement))} | {verdict} | {_cell(detail)} |")
    lines += ["", "## Actions of multi-action statements", "", "| statement | action | result | detail |",
              "| --- | --- | --- | --- |"]
    for o in sorted(acts, key=lambda o: (o.sid, o.action or "")):
        verdict, detail = verdicts[id(o)]
        lines.append(f"| {_cell(o.sid)} | {o.action} | {verdict} | {_cell(detail)} |")
    lines.append("")
    text = "\n".join(lines)
    for trace in traces:
        for value, alias in sorted(trace.aliases.items(), key=lambda kv: -len(kv[0])):
            text = text.replace(value, alias)
    return text


def _trace_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        files += sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localmode.iam_mutations", description=__doc__.split("\n")[0])
    parser.add_argument("--trace", nargs="+", required=True, help="trace files or directories of them")
    parser.add_argument("--template", default=str(REPO_ROOT / "template.yaml"))
    parser.add_argument("--out", help="write the Markdown report here (default: stdout)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any removal is UNJUSTIFIED")
    args = parser.parse_args(argv)
    files = _trace_files(args.trace)
    if not files:
        parser.error("no trace files found")
    template = load_template(Path(args.template))
    region = "us-east-1"
    transformed = sam_transform(template, region)
    traces = [load_trace(f, template, transformed) for f in files]
    outcomes, facts = run(traces)
    command = "python -m localmode.iam_mutations --trace " + " ".join(args.trace) + (
        f" --out {args.out}" if args.out else "")
    text = report(outcomes, facts, traces, command)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    unjustified = sum(1 for o in outcomes if _verdict(o, facts["principals_seen"])[0] == "UNJUSTIFIED")
    sys.stderr.write(f"{len(outcomes)} mutations, {sum(o.caught for o in outcomes)} caught, {unjustified} "
                     f"UNJUSTIFIED\n")
    return 1 if args.strict and unjustified else 0


if __name__ == "__main__":
    raise SystemExit(main())
