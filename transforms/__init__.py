"""Reusable DoFns, PTransforms and ModelHandlers for batch image labeling."""

__version__ = "0.1.0"
