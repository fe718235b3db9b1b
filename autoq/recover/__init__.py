"""Accuracy-recovery transforms applied between calibration and building: weight equalization, bias correction,
learned weight rounding (AdaRound)."""
