"""Reusable Qt widgets, each bound to a piece of project state; no training logic."""
