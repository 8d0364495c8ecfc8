"""Experiments around runs: the results folder, sweeps of runs, and reports over them.

results.py  results.json (rewritten every round), checkpoints, plots, the per-round table
sweep.py    `fednano sweep`: a resumable grid of runs
report.py   `fednano report`: tables, paired differences, curves and costs from results folders
"""
