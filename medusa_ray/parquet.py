"""Every Parquet file we read goes through here: its schema is checked before a single row is read.

Ray Data registers an Arrow extension type for pickled Python objects. In any process that has imported
``ray.data``, pyarrow turns a cell of that type into a Python object by unpickling it, which runs whatever code
the file's author put there. Prompts, distilled shards and training rows come from other people and from shared
storage, so a file whose schema has, or nests, any extension type is refused in one line naming the file and
the column. Plain ``pyarrow.parquet`` calls elsewhere would bypass the check: don't add any.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from medusa_ray.errors import UserError

_EXTENSION_KEY = b"ARROW:extension:name"  # how a file names an extension type pyarrow has not registered


class UnsafeParquetError(UserError):
    """A Parquet file whose schema could make a reader run code."""


def _extension_in(dtype: pa.DataType) -> str | None:
    """The name of the extension type ``dtype`` is or nests, else None."""
    if isinstance(dtype, pa.BaseExtensionType):
        return getattr(dtype, "extension_name", None) or str(dtype)
    if pa.types.is_dictionary(dtype):
        return _extension_in(dtype.value_type)
    if pa.types.is_map(dtype):
        return _extension_in(dtype.key_type) or _extension_in(dtype.item_type)
    if isinstance(dtype, (pa.ListType, pa.LargeListType, pa.FixedSizeListType)) or \
            type(dtype).__name__ in ("ListViewType", "LargeListViewType"):
        return _extension_in(dtype.value_type)
    if pa.types.is_struct(dtype) or pa.types.is_union(dtype):
        for i in range(dtype.num_fields):
            found = _field_extension(dtype.field(i))
            if found:
                return found
    return None


def _field_extension(field: pa.Field) -> str | None:
    if field.metadata and _EXTENSION_KEY in field.metadata:
        return field.metadata[_EXTENSION_KEY].decode(errors="replace")
    return _extension_in(field.type)


def check_schema(schema: pa.Schema, where: str) -> pa.Schema:
    """``schema`` unless a column has or nests an extension type (refused in one line)."""
    for field in schema:
        found = _field_extension(field)
        if found:
            raise UnsafeParquetError(f"{where}: column {field.name!r} has the Arrow extension type {found!r}, which "
                                     "could run code when read; refusing the file (write plain Arrow types)")
    return schema


def read_schema(file: str | Path) -> pa.Schema:
    """The file's checked schema (a damaged or non-Parquet file is one line too)."""
    try:
        schema = pq.read_schema(file)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{file}: not a readable Parquet file: {exc}") from None
    return check_schema(schema, str(file))


def open_file(file: str | Path) -> pq.ParquetFile:
    """A ``ParquetFile`` whose schema has been checked."""
    handle = pq.ParquetFile(file)
    check_schema(handle.schema_arrow, str(file))
    return handle


def read_table(file: str | Path, columns: Iterable[str] | None = None) -> pa.Table:
    """The file (or ``columns`` of it) after its schema is checked."""
    read_schema(file)
    return pq.read_table(file, columns=list(columns) if columns is not None else None)


def num_rows(file: str | Path) -> int:
    """Rows in the file, from its footer (no row is read)."""
    return pq.ParquetFile(file).metadata.num_rows
