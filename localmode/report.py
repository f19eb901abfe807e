"""The local-mode monitoring report: the numbers the CloudWatch dashboard shows on AWS, as Markdown with PNG plots.

Call :func:`write_report` at the end of a local run with plain dicts: the results ``detect_drift`` and
``evaluate_quality`` return (or :func:`lesion_monitoring.drift.compute_drift`'s), and the state machine executions
as Step Functions describes them. Every input is optional; what is missing is said in the report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display in local mode or CI
import matplotlib.dates as mdates  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

FAMILY_ORDER = ("embedding", "prediction", "confidence", "image")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# ------------------------------------------------------------------ plots
def plot_drift_scores(drift: Mapping[str, Any], threshold: float, path: Path) -> str:
    """Bar chart of each test family's score and the DriftScore, with the alarm threshold."""
    tests = drift.get("tests") or {}
    names = [f for f in FAMILY_ORDER if f in tests] + [f for f in tests if f not in FAMILY_ORDER]
    values = [float(tests[n]["score"]) for n in names] + [float(drift.get("drift_score") or 0.0)]
    labels = names + ["DriftScore"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    colours = ["#c0392b" if v >= threshold else "#2e86c1" for v in values]
    ax.bar(labels, values, color=colours)
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_ylabel("score (1 = significance level)")
    ax.set_title(f"Drift scores, {drift.get('n_records', 0)} records")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_drift_history(history: Sequence[Mapping[str, Any]], threshold: float, path: Path) -> str | None:
    """DriftScore over the windows evaluated (skipped windows left out)."""
    points: list[tuple[datetime, float]] = []
    for h in history:
        when, score = _time((h.get("window") or {}).get("end")), h.get("drift_score")
        if when is not None and score is not None:
            points.append((when, float(score)))
    if len(points) < 2:
        return None
    points.sort()
    fig, ax = plt.subplots(figsize=(6.5, 2.8))
    ax.plot(mdates.date2num([t for t, _ in points]), [s for _, s in points], marker="o")
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1)
    ax.set_ylabel("DriftScore")
    ax.set_title("DriftScore by window")
    fig.autofmt_xdate()
    return _save(fig, path)


def plot_drift_tests(drift: Mapping[str, Any], path: Path) -> str | None:
    """-log10 p of each KS test (embedding components, image statistics) against its Bonferroni line."""
    tests = drift.get("tests") or {}
    panels = [(f, tests[f], key) for f, key in (("embedding", "components"), ("image", "statistics")) if f in tests]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.2), squeeze=False)
    for ax, (family, block, key) in zip(axes[0], panels, strict=True):
        details = block.get(key) or {}
        names = list(details)
        ax.bar(names, [-float(details[n]["log10_p"]) for n in names], color="#7d3c98")
        # A single test reaches the family's level at alpha_t / m (Bonferroni over m tests).
        line = -math.log10(float(block["alpha"]) / max(len(names), 1))
        ax.axhline(line, color="black", linestyle="--", linewidth=1, label="family level")
        ax.set_title(f"{family}: KS per {'component' if key == 'components' else 'statistic'}")
        ax.set_ylabel("-log10 p")
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_class_distribution(drift: Mapping[str, Any], path: Path) -> str | None:
    """Predicted-class shares of the window against the reference's."""
    block = (drift.get("tests") or {}).get("prediction")
    if not block:
        return None
    ref, win = block["reference_fractions"], block["window_fractions"]
    classes = list(ref)
    x = range(len(classes))
    fig, ax = plt.subplots(figsize=(6.5, 3.0))
    ax.bar([i - 0.2 for i in x], [ref[c] for c in classes], width=0.4, label="reference")
    ax.bar([i + 0.2 for i in x], [win.get(c, 0.0) for c in classes], width=0.4, label="window")
    ax.set_xticks(list(x), classes)
    ax.set_ylabel("share of predictions")
    ax.set_title(f"Predicted classes (PSI {_fmt(block.get('psi'))})")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_quality(quality: Mapping[str, Any], thresholds: Mapping[str, float], path: Path) -> str | None:
    """Live balanced accuracy and melanoma sensitivity against their alarm thresholds, and per-class recall."""
    q = quality.get("quality") or {}
    if not q.get("n"):
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.2), gridspec_kw={"width_ratios": [1, 2]})
    names = ["balanced_accuracy", "melanoma_sensitivity"]
    values = [q.get(n) for n in names]
    left.bar(["bal. acc.", "mel. sens."], [v if v is not None else 0.0 for v in values], color="#17a589")
    for i, n in enumerate(names):
        if n in thresholds:
            left.hlines(thresholds[n], i - 0.4, i + 0.4, colors="black", linestyles="--")
    left.set_ylim(0, 1)
    left.set_title(f"Live quality, n = {q['n']}")
    recall = q.get("recall") or {}
    right.bar(list(recall), list(recall.values()), color="#5d6d7e")
    right.set_ylim(0, 1)
    right.set_title("Recall per class (ground truth)")
    return _save(fig, path)


# ------------------------------------------------------------------ report
def _drift_section(drift: Mapping[str, Any] | None, history: Sequence[Mapping[str, Any]], threshold: float,
                   out: Path) -> list[str]:
    lines = ["## Drift", ""]
    if not drift:
        return lines + ["No drift evaluation was run.", ""]
    window = drift.get("window") or {}
    lines.append(f"Window {window.get('start', '?')} to {window.get('end', '?')}; "
                 f"{drift.get('n_records', 0)} predictions of model version {_fmt(drift.get('model_version'))}.")
    if drift.get("status") == "skipped" or drift.get("drift_score") is None:
        lines += ["", f"**Skipped**: {drift.get('reason', 'no test family had enough records')}.", ""]
    else:
        verdict = "**DRIFT**" if float(drift["drift_score"]) >= threshold else "no drift"
        lines += ["", f"DriftScore **{drift['drift_score']:.3f}** (threshold {threshold:g}, alpha "
                  f"{_fmt(drift.get('alpha'), 4)}): {verdict}.", ""]
        tests = drift.get("tests") or {}
        rows = [(f, tests[f]["score"], tests[f]["log10_p"], tests[f].get("n"), tests[f].get("worst", ""))
                for f in FAMILY_ORDER if f in tests]
        lines += _table(["test", "score", "log10 p", "n", "strongest"], rows) + [""]
        for reason_family, reason in (drift.get("skipped") or {}).items():
            lines.append(f"- {reason_family} not run: {reason}")
        if drift.get("ood_rate") is not None:
            lines.append(f"- share of images the endpoint flagged out-of-distribution: {_fmt(drift['ood_rate'])}")
        lines.append("")
        for name, plot in (("Scores", plot_drift_scores(drift, threshold, out / "drift_scores.png")),
                           ("Tests", plot_drift_tests(drift, out / "drift_tests.png")),
                           ("Classes", plot_class_distribution(drift, out / "class_distribution.png"))):
            if plot:
                lines += [f"![{name}]({plot})", ""]
    plot = plot_drift_history(history, threshold, out / "drift_history.png")
    if plot:
        lines += [f"![DriftScore by window]({plot})", ""]
    return lines


def _quality_section(quality: Mapping[str, Any] | None, thresholds: Mapping[str, float], out: Path) -> list[str]:
    lines = ["## Model quality (ground truth)", ""]
    if not quality:
        return lines + ["No ground truth was evaluated.", ""]
    q = quality.get("quality") or {}
    rows = [("balanced accuracy", q.get("balanced_accuracy"), thresholds.get("balanced_accuracy")),
            ("melanoma sensitivity", q.get("melanoma_sensitivity"), thresholds.get("melanoma_sensitivity")),
            ("accuracy", q.get("accuracy"), None)]
    lines += _table(["metric", "value", "alarm below"], rows) + [""]
    lines.append(f"{_fmt(q.get('n'))} labelled predictions ({_fmt(q.get('melanoma_cases'))} melanomas) of model "
                 f"version {_fmt(quality.get('model_version'))}.")
    gt = quality.get("ground_truth") or {}
    if gt:
        lines.append(f"Last upload: {gt.get('rows')} rows, {gt.get('matched')} matched, {gt.get('unmatched')} "
                     f"without a captured prediction, {gt.get('rejected')} rejected.")
    for reason in quality.get("not_published") or []:
        lines.append(f"- not published: {reason}")
    lines.append("")
    plot = plot_quality(quality, thresholds, out / "quality.png")
    if plot:
        lines += [f"![Quality]({plot})", ""]
    return lines


def _executions_section(executions: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["## State machine executions", ""]
    if not executions:
        return lines + ["None.", ""]
    rows = []
    for ex in executions:
        arn = str(ex.get("executionArn", ""))
        # arn:...:stateMachine:<machine> / arn:...:execution:<machine>:<execution>
        machine_arn = str(ex.get("stateMachineArn", ""))
        machine = machine_arn.rsplit(":", 1)[-1] if machine_arn else (arn.split(":")[-2] if arn.count(":") >= 7
                                                                         else "")
        trigger = ex.get("trigger")
        if trigger is None and isinstance(ex.get("input"), str):
            try:
                trigger = json.loads(ex["input"]).get("trigger")
            except (ValueError, AttributeError):
                trigger = None
        started, stopped = _time(ex.get("startDate")), _time(ex.get("stopDate"))
        seconds = (stopped - started).total_seconds() if started and stopped else None
        rows.append((machine, ex.get("name") or arn.rsplit(":", 1)[-1], ex.get("status"),
                     (trigger or {}).get("type") if isinstance(trigger, dict) else trigger,
                     started.isoformat(timespec="seconds") if started else None,
                     f"{seconds:.0f} s" if seconds is not None else None,
                     ex.get("error") or ex.get("cause")))
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row[2])] = counts.get(str(row[2]), 0) + 1
    lines += _table(["state machine", "execution", "status", "trigger", "started", "took", "error"], rows)
    lines += ["", "Totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), ""]
    return lines


def write_report(
    out_dir: str | Path,
    *,
    drift_result: Mapping[str, Any] | None,
    quality_result: Mapping[str, Any] | None,
    executions: Sequence[Mapping[str, Any]] = (),
    drift_history: Sequence[Mapping[str, Any]] = (),
    drift_threshold: float = 1.0,
    quality_thresholds: Mapping[str, float] | None = None,
    title: str = "Monitoring report (local mode)",
) -> Path:
    """Write ``report.md`` and its PNG plots into ``out_dir``; returns the report's path.

    Parameters
    ----------
    out_dir : str or Path
        Created if missing; existing plots of the same names are replaced.
    drift_result : dict or None
        What ``detect_drift`` returns (a skipped window included).
    quality_result : dict or None
        What ``evaluate_quality`` returns.
    executions : sequence of dict
        Step Functions executions (``describe_execution`` / ``list_executions`` items, optionally with
        ``trigger``, ``error``, ``cause``).
    drift_history : sequence of dict
        Earlier drift results, for a DriftScore-by-window plot.
    drift_threshold : float
        The drift alarm's threshold (``DriftThreshold``).
    quality_thresholds : dict, optional
        ``{"balanced_accuracy": ..., "melanoma_sensitivity": ...}``: the quality alarms' thresholds.
    title : str
        The report's heading.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    thresholds = dict(quality_thresholds or {})
    lines = [f"# {title}", ""]
    lines += _drift_section(drift_result, drift_history, drift_threshold, out)
    lines += _quality_section(quality_result, thresholds, out)
    lines += _executions_section(executions)
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
