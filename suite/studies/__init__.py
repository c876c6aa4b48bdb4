"""Studies: YAML specs expanded into settings and run as MLflow child runs of one parent.

``spec`` (the YAML schema and its validation), ``expand`` (settings), ``run`` (``run_study``),
``summary`` (the outcome, its table and files). The names below are the package's public API.

Imports: suite.execution and the layers below it; never suite.audit or suite.cli."""

from suite.studies.expand import Setting, dry_run_lines, expand, expand_settings, parse_sets
from suite.studies.run import DEFAULT_RUNNER, check_variants, run_study
from suite.studies.spec import STUDY_KEYS, ExecutorBlock, StudySpec, load_spec, parse_spec
from suite.studies.summary import StudyOutcome, format_table, leak_sentence

__all__ = [
    "DEFAULT_RUNNER", "STUDY_KEYS", "ExecutorBlock", "Setting", "StudyOutcome", "StudySpec", "check_variants",
    "dry_run_lines", "expand", "expand_settings", "format_table", "leak_sentence", "load_spec", "parse_sets",
    "parse_spec", "run_study",
]
