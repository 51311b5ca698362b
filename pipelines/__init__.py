"""Composed Beam jobs and their entry points."""
