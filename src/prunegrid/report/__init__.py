"""The comparison grid report (CONTRACT.md "The grid"): ``python -m prunegrid.report``."""

from prunegrid.report.grid import ReportError, build, rows, seed_means

__all__ = ["ReportError", "build", "rows", "seed_means"]
