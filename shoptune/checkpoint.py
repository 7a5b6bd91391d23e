"""Safetensors checkpoints as bytes: read and check a shard's header, lay out and write a
new one, copy tensors' byte ranges, view a tensor's rows without loading it.

A safetensors file is an 8-byte little-endian length N, N bytes of JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, optional "__metadata__": {str: str}},
then the tensors' raw bytes (little-endian, row-major); offsets count from the end of the
header and the tensors tile the data exactly, as safetensors itself requires.

Files are written the way safetensors' own writer does (tensors by descending dtype, then by
name; the header padded with spaces to a multiple of 8), so the same tensors give the same
bytes whichever wrote them. Nothing here needs torch: bytes move with os.copy_file_range
and numpy memory maps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from shoptune import UserError

# Bytes per element, in the order of safetensors' Dtype enum (its writer sorts by it, descending).
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}
DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(DTYPE_SIZES)}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_HEADER_BYTES = 100_000_000  # safetensors refuses larger headers
COPY_BUFFER_BYTES = 16 << 20
WRITE_BYTES = 1 << 20
UNCOPYABLE = (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)  # copy_file_range can't: read and write


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Where one tensor's bytes lie in its file (`start`: an absolute file offset)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def rows(self) -> int:
        """Length of the first dimension (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.itemsize * math.prod(self.shape[1:])


@dataclasses.dataclass(frozen=True)
class Shard:
    """One safetensors file: its tensors in file order and its __metadata__ (None if absent)."""

    path: Path
    tensors: dict[str, Tensor]
    metadata: dict[str, str] | None

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# ---------------------------------------------------------------- reading


def read_shard(path: Path) -> Shard:
    """The header of a safetensors file, checked: a corrupt file is a one-line UserError naming it."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 8:
                raise UserError(f"{path}: not a safetensors file (only {size} bytes)")
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise UserError(f"{path}: corrupt safetensors file (a {length}-byte header in a {size}-byte file)")
            text = handle.read(length)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise UserError(f"{path}: corrupt safetensors header ({reason})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (expected a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise UserError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_start, data_bytes = 8 + length, size - 8 - length
    entries = [read_entry(path, name, info) for name, info in header.items()]
    entries.sort(key=lambda entry: entry[1])
    tensors, end = {}, 0
    for tensor, (begin, stop) in entries:
        if stop > data_bytes:
            raise UserError(
                f"{path}: tensor {tensor.name} ends at byte {stop} of the data, which has {data_bytes} "
                "(a truncated file?)"
            )
        if begin != end:
            previous = next(reversed(tensors), None)
            where = f"overlaps {previous}" if begin < end else f"starts at byte {begin}, after a gap from byte {end}"
            raise UserError(f"{path}: corrupt safetensors header (tensor {tensor.name} {where})")
        tensors[tensor.name] = dataclasses.replace(tensor, start=data_start + begin)
        end = stop
    if end != data_bytes:
        raise UserError(f"{path}: {data_bytes - end} bytes after the last tensor (corrupt safetensors file)")
    return Shard(path, tensors, metadata)


def read_entry(path: Path, name: str, info) -> tuple[Tensor, tuple[int, int]]:
    """One header entry as a Tensor (start relative to the data) and its [begin, end) offsets."""
    if not isinstance(info, dict):
        raise UserError(f"{path}: corrupt safetensors header (tensor {name} is not an object)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise UserError(f"{path}: tensor {name} has an unknown or unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(is_count(n) for n in shape)):
        raise UserError(f"{path}: corrupt safetensors header (tensor {name} has shape {shape!r})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(n) for n in offsets)):
        raise UserError(f"{path}: corrupt safetensors header (tensor {name} has data_offsets {offsets!r})")
    begin, end = offsets
    nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != nbytes:
        raise UserError(
            f"{path}: corrupt safetensors header (tensor {name}: data_offsets [{begin}, {end}] hold "
            f"{end - begin} bytes, a {dtype} tensor of shape {shape} needs {nbytes})"
        )
    return Tensor(name, dtype, tuple(shape), begin, nbytes), (begin, end)


def is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---------------------------------------------------------------- writing


def lay_out(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, list[Tensor]]:
    """The header (length prefix included) and the placement of (name, dtype, shape) tensors,
    in the order and form safetensors' writer gives them; __metadata__ keys sorted."""
    ordered = sorted(tensors, key=lambda t: (-DTYPE_RANK[t[1]], t[0]))
    header: dict = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
    placed, offset = [], 0
    for name, dtype, shape in ordered:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        placed.append(Tensor(name, dtype, tuple(shape), offset, nbytes))
        offset += nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data_start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, [dataclasses.replace(t, start=data_start + t.start) for t in placed]


def reserve(target: int, length: int) -> None:
    """Allocate a new file's blocks before writing it (less fragmented, and written about 20% faster
    on ext4); where the filesystem can't, the writes allocate them."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fallocate(target, 0, length)


def write_all(target: int, data) -> None:
    """Write a whole buffer at the current position of the file descriptor `target`, a MB at a
    time (8 MB writes were erratically, up to 10 times, slower on Linux 6.18 ext4; 1 MB ones never)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(target, view[:WRITE_BYTES]) :]


def write_zeros(target: int, length: int) -> None:
    zeros = bytes(min(length, COPY_BUFFER_BYTES))
    while length:
        write_all(target, zeros[: min(length, len(zeros))])
        length -= min(length, len(zeros))


def copy_bytes(source: int, target: int, offset: int, length: int) -> None:
    """Append `length` bytes of file descriptor `source`, from `offset`, at `target`'s position:
    in the kernel (copy_file_range) where it can, else through a buffer."""
    while length:
        try:
            copied = os.copy_file_range(source, target, length, offset)
        except (AttributeError, OSError) as err:
            if isinstance(err, OSError) and err.errno not in UNCOPYABLE:
                raise
            return copy_bytes_buffered(source, target, offset, length)
        if copied == 0:
            raise OSError(errno.EIO, f"copying: the source ends {length} bytes early")
        offset, length = offset + copied, length - copied


def copy_bytes_buffered(source: int, target: int, offset: int, length: int) -> None:
    while length:
        chunk = os.pread(source, min(length, COPY_BUFFER_BYTES), offset)
        if not chunk:
            raise OSError(errno.EIO, f"copying: the source ends {length} bytes early")
        write_all(target, chunk)
        offset, length = offset + len(chunk), length - len(chunk)


# ---------------------------------------------------------------- viewing


def element_type(tensor: Tensor) -> np.dtype:
    """An unsigned integer type of the tensor's element size: its bits, compared and moved as they are."""
    return np.dtype(f"<u{tensor.itemsize}")


def rows_view(path: Path, tensor: Tensor, first: int, count: int) -> np.ndarray:
    """Rows [first, first + count) of a tensor as a (count, row elements) memory map of its raw bits.
    Map a window at a time: the mapped pages count in the process's memory while the map lives."""
    per_row = tensor.row_bytes // tensor.itemsize
    if count == 0 or per_row == 0:
        return np.zeros((count, per_row), element_type(tensor))
    offset = tensor.start + first * tensor.row_bytes
    return np.memmap(path, dtype=element_type(tensor), mode="r", offset=offset, shape=(count, per_row))


def read_rows(path: Path, tensor: Tensor, rows: Iterable[int]) -> np.ndarray:
    """Some rows of a tensor, read (not mapped: a few rows, wherever they lie, cost their bytes only)
    as a (len(rows), row elements) array of raw bits."""
    rows = list(rows)
    taken = np.empty((len(rows), tensor.row_bytes // tensor.itemsize), element_type(tensor))
    with open(path, "rb", buffering=0) as handle:
        for i, row in enumerate(rows):
            if os.preadv(handle.fileno(), [taken[i]], tensor.start + row * tensor.row_bytes) != tensor.row_bytes:
                raise OSError(errno.EIO, f"{path}: {tensor.name} ends early")
    return taken


def row_windows(tensor: Tensor, window_bytes: int) -> Iterable[tuple[int, int]]:
    """(first row, row count) windows over a tensor, each at most `window_bytes` (at least one row)."""
    step = max(1, window_bytes // max(1, tensor.row_bytes))
    for first in range(0, tensor.rows, step):
        yield first, min(step, tensor.rows - first)


def to_float32(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Values of raw F16/BF16/F32/F64 bits as float32 (bfloat16 is the top half of a float32)."""
    if dtype == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    numpy_type = {"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype]
    return bits.view(numpy_type).astype(np.float32)
