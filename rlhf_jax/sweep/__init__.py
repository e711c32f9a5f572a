"""Sweeps, reports and experiments' machinery.

spec.py (grids of gin bindings as data), launch.py (`run_sweep`: checks, sweep.json, the
shared compilation cache), launchers.py (local processes, SLURM through submitit), report.py
(results.csv, report.md/html with bootstrap intervals), plots.py (learning curves, frontier),
commands.py (the `rlhf-jax sweep` and `rlhf-jax report` commands).
"""
