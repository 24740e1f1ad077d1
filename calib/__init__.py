"""calib: attack, measure and recalibrate the confidence of PyTorch classifiers.

Companion package to "Calibration Attacks: A Comprehensive Study of Adversarial Attacks on
Model Confidence" (Obadinma, Zhu, Guo; TMLR, arXiv:2401.02718).

Subpackages by concern: :mod:`calib.data` (datasets and splits), :mod:`calib.models` (timm
factory), :mod:`calib.metrics` (ECE, KS, reliability), :mod:`calib.train` (training and
prediction), :mod:`calib.attacks` (UCA, OCA, MMA, RCA), :mod:`calib.defences`
(recalibration and robust training), :mod:`calib.plots` and :mod:`calib.io`.
"""

__version__ = "0.1.0"
