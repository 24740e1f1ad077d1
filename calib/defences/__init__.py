"""Defences against calibration attacks (SPEC §8, paper Table 4).

:mod:`calib.defences.posthoc` holds the post-hoc recalibrators (temperature scaling, splines,
Compression Scaling, AAA, MDTS) and :class:`CalibratedModel`, which puts one behind a
classifier; :mod:`calib.defences.training` holds the training-time defences (PGD-AT, CAAT,
DCA, SAM, label smoothing) as one-batch training steps for :func:`calib.train.fit`.
"""

from calib.defences.posthoc import (
    AAA,
    MDTS,
    POSTHOC,
    CalibratedModel,
    CompressionScaling,
    Recalibrator,
    SplineCalibration,
    TemperatureScaling,
    compression_target,
    fit_temperature,
    logit_features,
    make_recalibrator,
)
from calib.defences.training import (
    TRAINING_DEFENCES,
    CAATStep,
    CrossEntropyStep,
    DCAStep,
    PGDATStep,
    SAMStep,
    make_train_step,
)

__all__ = [
    "AAA",
    "MDTS",
    "POSTHOC",
    "TRAINING_DEFENCES",
    "CAATStep",
    "CalibratedModel",
    "CompressionScaling",
    "CrossEntropyStep",
    "DCAStep",
    "PGDATStep",
    "Recalibrator",
    "SAMStep",
    "SplineCalibration",
    "TemperatureScaling",
    "compression_target",
    "fit_temperature",
    "logit_features",
    "make_recalibrator",
    "make_train_step",
]
