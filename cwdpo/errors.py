"""The project's error types, shared by every layer (so the model layer need not import the data
layer to raise a data error)."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: the message names the file / row / field and what was expected."""
