"""The one exception the data layer raises for bad input: :class:`DataError`."""
from __future__ import annotations

from typing import Optional

__all__ = ["DataError", "SchemaError"]


class DataError(ValueError):
    """Bad input data. The message names the file, column, row group and (where known) row.

    The parts are also kept as attributes (``file``, ``column``, ``row_group``, ``row``) so tools can
    point at the offending spot.
    """

    def __init__(
        self,
        message: str,
        *,
        file: Optional[str] = None,
        column: Optional[str] = None,
        row_group: Optional[int] = None,
        row: Optional[int] = None,
    ) -> None:
        self.reason = message
        self.file = file
        self.column = column
        self.row_group = row_group
        self.row = row
        where = []
        if file is not None:
            where.append(f"file {file}")
        if column is not None:
            where.append(f"column {column!r}")
        if row_group is not None:
            where.append(f"row group {row_group}")
        if row is not None:
            where.append(f"row {row}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)

    def __reduce__(self):  # keep the keyword parts through pickling (DataLoader workers)
        return (_rebuild, (self.reason, self.file, self.column, self.row_group, self.row))


def _rebuild(message, file, column, row_group, row) -> "DataError":
    return DataError(message, file=file, column=column, row_group=row_group, row=row)


class SchemaError(ValueError):
    """An invalid schema (independent of any data)."""
