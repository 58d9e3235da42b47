"""The project's error types, shared by every layer (so the model layer need not import the data
layer to raise a data error)."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: the message names the file / row / field and what was expected."""


class OverBudget(DataError):
    """Rows of a batch longer than `model.max_length` under `model.truncation=drop_pair`: the
    data module that collated them drops `rows` (counted) and collates the rest again."""

    def __init__(self, message: str, rows: list[int]) -> None:
        super().__init__(message)
        self.rows = rows
