"""prunegrid's Hydra sweeper on Optuna >= 4: ``python train.py -m hydra/sweeper=optuna ...`` or a preset,
``python train.py -m sweep=l1``.

It stands in for Hydra's own Optuna sweeper (``hydra-optuna-sweeper``), whose release for Hydra 1.3
pins optuna<3, until Hydra 1.4 is released, and keeps that plugin's settings: ``sampler``,
``direction``, ``storage``, ``study_name``, ``n_trials``, ``n_jobs``, ``max_failure_rate`` and
``params`` (``interval()``, ``choice()``, ``range()``, ``tag(log, interval(...))``), plus ``pruner``,
``report_dir`` and ``max_complete`` (several workers on one study stop at exactly that many COMPLETE
trials). The storage defaults to ``$PRUNEGRID_OPTUNA_STORAGE`` (the head's PostgreSQL), else
``sqlite:///optuna.db``. Any Hydra launcher runs the trials; with Hydra's Ray launcher
(``hydra/launcher=ray``, or ``hydra/launcher=ray_cluster`` to join a running cluster) the jobs in Ray
workers reopen their trials from the storage, so pruning works there too.

The modules Hydra scans (:mod:`.config`, :mod:`.optuna_sweeper`) import nothing heavy; the work is in
:mod:`._impl`.
"""
