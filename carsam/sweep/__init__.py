"""Optuna sweeps over run configs: `space` (search-space files), `storage` (journal / RDB storages and
heartbeats), `runner` (studies, trials as runs, worker processes), `summary` (trial tables, best trials).
"""
