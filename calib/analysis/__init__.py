"""Characteristic analyses of calibration attacks (SPEC §9): sweeps, detection,
representations, saliency, the MMA bound and the claims checklist.

Each submodule is imported explicitly (``from calib.analysis import detection``); the
notebooks ``notebooks/4x_*.ipynb`` and ``50_claims.ipynb`` are thin narratives over them.
"""
