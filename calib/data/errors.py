"""Errors for raw dataset files that cannot be obtained or fail their checks."""

from __future__ import annotations


class DataUnavailableError(RuntimeError):
    """The raw files are not on disk and cannot be obtained (offline, or download disabled)."""


class DataIntegrityError(ValueError):
    """A raw file is missing, corrupt or malformed (checksum mismatch, bad header, bad label)."""
