"""The tuning report: a self-contained HTML page and PNG figures, built from an Optuna study alone."""

from autoq.report.page import write_report

__all__ = ["write_report"]
