"""Inputs for batch scoring, read a row range at a time so memory follows the batch, not the file.

Every source has `rows`, `row_ids(start, stop)` and `read(start, stop) -> (x, errors)`: `x` holds
numbers `[stop - start, *input_shape]` in the file's own dtype (the scorer casts to float32 and
checks finiteness, as the runtime does) and `errors` maps a position in that range to why the row
could not be read (its values in `x` are then zeros). Problems with the file as a whole raise
`InputFileError`, when the source is opened or when a later read finds the file broken.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from forde_serve.errors import FordeError
from forde_serve.images import IMAGE_SUFFIXES, image_to_input
from forde_serve.runtime import InvalidInput, ModelCard

__all__ = ["InputFileError", "open_source"]


class InputFileError(FordeError, ValueError):
    """An input file or folder that cannot be scored at all; the message names what and why."""


def open_source(path: str | Path, card: ModelCard, key: str | None = None):
    """Open `path` (.npy, .npz, .parquet or a folder of pictures) for the model `card`."""
    path = Path(path)
    if path.is_dir():
        if key is not None:
            raise InputFileError(f"--key: an image folder has no named arrays, got {key!r}")
        return _ImageFolder(path, card)
    if not path.is_file():
        raise InputFileError(f"input {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if key is not None:
            raise InputFileError(f"--key: a .npy file holds one array, got {key!r}")
        with path.open("rb") as f:
            shape, dtype, offset = _npy_header(f, str(path))
        return _NpyFile(path, card, shape, dtype, offset)
    if suffix == ".npz":
        return _NpzMember(path, card, key)
    if suffix == ".parquet":
        return _ParquetColumn(path, card, key)
    raise InputFileError(
        f"input {str(path)!r}: expected a .npy, .npz or .parquet file or a folder of pictures, "
        f"got a {suffix or 'suffix-less'} file"
    )


def _npy_header(f, name: str) -> tuple[tuple[int, ...], np.dtype, int]:
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
    except ValueError as err:
        raise InputFileError(f"{name}: not a readable .npy array ({err})") from None
    if fortran and len(shape) > 1:
        raise InputFileError(
            f"{name}: expected a C-ordered array, got a Fortran-ordered one (save it with np.ascontiguousarray)"
        )
    return tuple(shape), dtype, f.tell()


def _check_array(name: str, shape: tuple[int, ...], dtype: np.dtype, card: ModelCard) -> None:
    if dtype.kind not in "fiu":
        raise InputFileError(f"{name}: expected numbers (float32), got dtype {dtype}")
    expected = list(card.input_shape)
    if len(shape) != len(expected) + 1 or list(shape[1:]) != expected:
        raise InputFileError(
            f"{name}: expected shape [rows, {', '.join(map(str, expected))}] for this model, got {list(shape)}"
        )


class _IndexedRows:
    """Array inputs: a row's id is its index."""

    def row_ids(self, start: int, stop: int) -> np.ndarray:
        return np.arange(start, stop, dtype=np.int64)


class _NpyFile(_IndexedRows):
    """A .npy file, memory-mapped one row range at a time (each map is dropped after its copy)."""

    def __init__(self, path: Path, card: ModelCard, shape, dtype, offset: int):
        _check_array(str(path), shape, dtype, card)
        self.path, self.shape, self.dtype, self.offset = path, shape, dtype, offset
        self.rows = shape[0]
        self._row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        if path.stat().st_size < offset + self.rows * self._row_bytes:
            raise InputFileError(f"{path}: truncated: its header promises {self.rows} rows, the file is shorter")

    def read(self, start: int, stop: int) -> tuple[np.ndarray, dict[int, str]]:
        view = np.memmap(
            self.path,
            dtype=self.dtype,
            mode="r",
            offset=self.offset + start * self._row_bytes,
            shape=(stop - start, *self.shape[1:]),
        )
        x = np.array(view)
        del view
        return x, {}


class _NpzMember(_IndexedRows):
    """One array of a .npz (stored or compressed), read by seeking inside its zip member."""

    def __init__(self, path: Path, card: ModelCard, key: str | None):
        try:
            self._zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as err:
            raise InputFileError(f"{path}: not a readable .npz file ({err})") from None
        names = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]
        if key is None:
            if len(names) != 1:
                raise InputFileError(f"{path}: holds arrays {names}; choose one with --key")
            key = names[0]
        elif key not in names:
            raise InputFileError(f"--key: {path} has no array {key!r}; it holds {names}")
        self.path, self.key = path, key
        self._member = self._zip.open(f"{key}.npy")
        self.shape, self.dtype, self._data_start = _npy_header(self._member, f"{path}[{key}]")
        _check_array(f"{path}[{key}]", self.shape, self.dtype, card)
        self.rows = self.shape[0]
        self._row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def read(self, start: int, stop: int) -> tuple[np.ndarray, dict[int, str]]:
        where = self._data_start + start * self._row_bytes
        wanted = (stop - start) * self._row_bytes
        try:
            if self._member.tell() != where:  # sequential reads never seek (a compressed seek re-inflates)
                self._member.seek(where)
            data = self._member.read(wanted)
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise InputFileError(f"{self.path}[{self.key}]: unreadable at row {start} ({err})") from None
        if len(data) != wanted:
            raise InputFileError(f"{self.path}[{self.key}]: truncated at row {start + len(data) // self._row_bytes}")
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, *self.shape[1:]), {}


class _ParquetColumn(_IndexedRows):
    """A Parquet column of (nested) number lists, streamed by record batch within row groups."""

    _BATCH = 1024

    def __init__(self, path: Path, card: ModelCard, key: str | None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            self._file = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise InputFileError(f"{path}: not a readable Parquet file ({err})") from None
        schema = self._file.schema_arrow
        lists = [f.name for f in schema if _is_list(f.type)]
        if key is None:
            if "input" in schema.names:
                key = "input"
            elif len(lists) == 1:
                key = lists[0]
            else:
                raise InputFileError(f"{path}: no column named 'input' and list columns {lists}; choose one with --key")
        if key not in schema.names:
            raise InputFileError(f"--key: {path} has no column {key!r}; it has {schema.names}")
        leaf = schema.field(key).type
        while _is_list(leaf):
            leaf = leaf.value_type
        if not _is_list(schema.field(key).type) or not (pa.types.is_floating(leaf) or pa.types.is_integer(leaf)):
            raise InputFileError(f"{path}: column {key!r}: expected lists of numbers, got {schema.field(key).type}")
        self.path, self.key, self.card = path, key, card
        # The leaf's own dtype, as for .npy: an int64 column cast straight to float32 rounds once, as
        # the service does with the same integers; through float64 it would round twice.
        self._dtype = leaf.to_pandas_dtype()
        self.rows = self._file.metadata.num_rows
        self._size = int(np.prod(card.input_shape))
        groups = [self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)]
        self._group_starts = np.concatenate([[0], np.cumsum(groups)]).astype(np.int64)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, dict[int, str]]:
        import pyarrow as pa

        first = int(np.searchsorted(self._group_starts, start, side="right") - 1)
        last = int(np.searchsorted(self._group_starts, stop, side="left"))
        position = int(self._group_starts[first])
        x = np.zeros((stop - start, self._size), dtype=self._dtype)
        errors: dict[int, str] = {}
        batches = self._file.iter_batches(batch_size=self._BATCH, row_groups=range(first, last), columns=[self.key])
        try:
            for batch in batches:
                lo, hi = max(start, position), min(stop, position + len(batch))
                if lo < hi:
                    self._fill(
                        batch.column(0).slice(lo - position, hi - lo), x[lo - start : hi - start], lo - start, errors
                    )
                position += len(batch)
                if position >= stop:
                    break
        except (pa.ArrowException, OSError) as err:
            raise InputFileError(f"{self.path}: unreadable near row {position} ({err})") from None
        return x.reshape(stop - start, *self.card.input_shape), errors

    def _fill(self, column, out: np.ndarray, first: int, errors: dict[int, str]) -> None:
        """Copy each row of `column` (lists of numbers, nested any depth) into `out` [rows, size];
        a null, a null inside, or the wrong count of numbers makes the row an error instead."""
        valid = np.asarray(column.is_valid())
        leaf, bounds = _leaf_values(column)
        leaf_valid = np.asarray(leaf.is_valid()) if leaf.null_count else None
        numbers = np.asarray(leaf.fill_null(0) if leaf.null_count else leaf, dtype=self._dtype)
        lengths = np.diff(bounds)
        shape = "x".join(map(str, self.card.input_shape))
        for r in range(len(out)):
            if not valid[r]:
                errors[first + r] = f"{self.key}: expected {self._size} numbers ({shape}), got null"
            elif lengths[r] != self._size:
                errors[first + r] = f"{self.key}: expected {self._size} numbers ({shape}), got {lengths[r]}"
            elif leaf_valid is not None and not leaf_valid[bounds[r] : bounds[r + 1]].all():
                errors[first + r] = f"{self.key}: expected {self._size} numbers ({shape}), got nulls among them"
            else:
                out[r] = numbers[bounds[r] : bounds[r + 1]]


def _is_list(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type)


def _leaf_values(column):
    """(leaf values, row bounds into them) of a list array nested to any depth: row r's numbers are
    leaf[bounds[r]:bounds[r + 1]]. Works on slices (offsets index the unsliced children)."""
    import pyarrow as pa

    bounds = np.arange(len(column) + 1, dtype=np.int64)
    values = column
    while _is_list(values.type):
        if pa.types.is_fixed_size_list(values.type):
            size = values.type.list_size
            offsets = np.arange(values.offset, values.offset + len(values) + 1, dtype=np.int64) * size
        else:
            offsets = np.asarray(values.offsets, dtype=np.int64)
        bounds = offsets[bounds]
        values = values.values
    return values, bounds


class _ImageFolder:
    """Every picture under a folder (by IMAGE_SUFFIXES, any case), in sorted relative-path order; row ids
    are those paths. Each is decoded by its content, whatever its suffix says."""

    def __init__(self, path: Path, card: ModelCard):
        if card.image is None:
            raise InputFileError(
                f"{path}: this model takes arrays, not images (its file has no image metadata); "
                "give a .npy, .npz or .parquet input"
            )
        self.path, self.card = path, card
        self._files = sorted(
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self._files:
            raise InputFileError(
                f"{path}: expected pictures in this folder ({' '.join(IMAGE_SUFFIXES)} files), found none"
            )
        self.rows = len(self._files)

    def row_ids(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._files[start:stop], dtype=object)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, dict[int, str]]:
        x = np.zeros((stop - start, *self.card.input_shape), dtype=np.float32)
        errors = {}
        for r, name in enumerate(self._files[start:stop]):
            try:
                x[r] = image_to_input(self.path / name, self.card.image, field=name)
            except InvalidInput as err:
                errors[r] = str(err)
        return x, errors
