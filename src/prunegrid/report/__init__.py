"""The comparison grid report (CONTRACT.md "The grid"): ``python -m prunegrid.report``; the code is in
:mod:`prunegrid.report.grid`."""
