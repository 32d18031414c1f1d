"""`make bench`: each module measures one target against its baseline in the same process (no Qt here)."""

from engine.openmp_env import prefer_passive_waiting

prefer_passive_waiting()  # as main.py runs: every section measures the product as users run it
