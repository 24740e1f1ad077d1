"""calib: attack, measure and recalibrate the confidence of PyTorch classifiers.

Companion package to "Calibration Attacks: A Comprehensive Study of Adversarial Attacks on
Model Confidence" (Obadinma, Zhu, Guo; TMLR, arXiv:2401.02718).

Subpackages by concern: :mod:`calib.data` (datasets and splits), :mod:`calib.models` (timm
factory, features), :mod:`calib.metrics` (ECE, KS, reliability), :mod:`calib.runtime` (device,
seeding, prediction), :mod:`calib.train` (training), :mod:`calib.attacks` (UCA, OCA, MMA, RCA,
the attack grid and ordinary attacks), :mod:`calib.defences` (recalibration and robust
training), :mod:`calib.analysis` (the paper's analyses), :mod:`calib.config` (the params
schema), :mod:`calib.plots`, :mod:`calib.site` and :mod:`calib.io`.
"""

__version__ = "0.1.0"
