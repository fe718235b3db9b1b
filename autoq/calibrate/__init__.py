"""Calibration: statistics gathered once (stats), observer methods (ranges), frozen observers."""
