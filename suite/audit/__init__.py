"""The leakage audit: a fixed battery of threat levels, positive controls, verdicts and reports.

``battery`` (levels and budgets as data), ``plan`` (``plan_audit``), ``positive_control``,
``verdict`` (aggregation, the verdict table and its words), ``report`` (report.md/html, verdict
CSV/JSON, figures), ``run`` (``run_audit``: the MLflow runs). The names below are the package's
public API.

Imports: suite.execution and the layers below it; never suite.studies or suite.cli."""

from suite.audit.battery import BATTERY, BUDGETS, REALISTIC, Budget, ThreatLevel, budget_for
from suite.audit.plan import AuditPlan, PlannedLevel, apply_to_levels, fixed_keys, plan_audit
from suite.audit.report import level_figure, render_html, render_markdown, report_blocks, write_report
from suite.audit.run import CONTROL_KIND, KIND, LEVEL_KIND, AuditOutcome, run_audit
from suite.audit.verdict import (
    COLUMNS,
    SMALL_GAIN_DB,
    LevelOutcome,
    Sample,
    add_result,
    conclusion,
    display_rows,
    format_table,
    verdict_rows,
)

__all__ = [
    "BATTERY", "BUDGETS", "COLUMNS", "CONTROL_KIND", "KIND", "LEVEL_KIND", "REALISTIC", "SMALL_GAIN_DB",
    "AuditOutcome", "AuditPlan", "Budget", "LevelOutcome", "PlannedLevel", "Sample", "ThreatLevel", "add_result",
    "budget_for", "conclusion", "display_rows", "format_table", "level_figure", "plan_audit", "apply_to_levels", "fixed_keys", "render_html",
    "render_markdown", "report_blocks", "run_audit", "verdict_rows", "write_report",
]
