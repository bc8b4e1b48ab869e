"""Save and load a :class:`BlockMask` as a safetensors file, without pickle.

The layout follows the safetensors format (huggingface/safetensors, "Format"): an
8-byte little-endian header length N, N bytes of JSON header, then the raw tensor
bytes. The header maps each tensor name to ``{"dtype", "shape", "data_offsets"}``
and holds string metadata under ``"__metadata__"``. Files written here open with the
``safetensors`` library; this module reads them with its own strict parser so that
loading needs nothing beyond numpy and can reject every malformed or hostile file
with a ``ValueError`` before any large allocation.
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from .unselected import Unselected
from .validation import as_path, meta_to_json, parse_json

if TYPE_CHECKING:
    from .block_mask import BlockMask

FORMAT_NAME = "sparsecore.BlockMask"
FORMAT_VERSION = "2"            # 2 adds ``unselected``; version 1 files (no such field) load as "drop"
READABLE_VERSIONS = ("1", "2")
MAX_HEADER_BYTES = 1 << 20  # a mask header is a few hundred bytes; refuse anything absurd
MAX_FILE_BYTES = 1 << 31

# name -> (safetensors dtype, numpy little-endian dtype, ndim); written in this order.
TENSORS = {
    "q_offsets": ("I64", "<i8", 1),
    "kv_offsets": ("I64", "<i8", 1),
    "indptr": ("I32", "<i4", 2),
    "indices": ("I32", "<i4", 1),
    "budgets": ("F64", "<f8", 1),
}


def save(mask: "BlockMask", path: Any) -> Path:
    """Write ``mask`` to ``path`` whole or not at all (see :func:`write_replacing`); returns ``path``."""
    path = as_path(path)
    if path.is_dir():
        raise ValueError(f"path: {str(path)[:200]!r} is a directory, not a file to write; pass a file path "
                         f"such as {str(path / 'mask.safetensors')[:200]!r}")
    header: dict[str, Any] = {"__metadata__": {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "num_heads": str(mask.num_heads),
        "meta": meta_to_json(mask.meta),
        "unselected": str(mask.unselected),
    }}
    chunks = []
    offset = 0
    for name, (st_dtype, np_dtype, _) in TENSORS.items():
        data = np.ascontiguousarray(getattr(mask, name), dtype=np_dtype).tobytes()
        header[name] = {"dtype": st_dtype, "shape": list(getattr(mask, name).shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the buffer 8-byte aligned, as the format recommends
    if len(text) > MAX_HEADER_BYTES:           # load refuses such a header: refuse to write it
        raise ValueError(f"meta: the file header would take {len(text):,} bytes, more than the {MAX_HEADER_BYTES:,} a "
                         f"mask file may hold (load refuses more); keep large records out of meta, in a file of their "
                         f"own")
    size = 8 + len(text) + sum(map(len, chunks))
    if size > MAX_FILE_BYTES:
        raise ValueError(f"indices: the file would take {size:,} bytes, more than the {MAX_FILE_BYTES:,} a mask file "
                         f"may hold (load refuses more); use larger blocks, or save groups of heads (select_heads)")
    write_replacing(path, [struct.pack("<Q", len(text)), text, *chunks])
    return path


def write_replacing(path: Path, parts: list[bytes]) -> None:
    """Write ``parts`` to a new file beside ``path``, flushed to disk, then rename it onto ``path``.

    The rename (``os.replace``, POSIX ``rename``) is atomic: a save that fails or is stopped part way (a full
    disk, Ctrl-C) leaves ``path`` as it was, the old mask or no file, never a truncated one, and removes its
    temporary file. A symbolic link at ``path`` is kept: the file it points to is replaced, and keeps its
    permission bits (a private file stays private).
    """
    target = path.resolve()
    if not target.parent.is_dir():
        raise FileNotFoundError(f"path: the folder of {str(path)[:200]!r} does not exist; create it first")
    mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else None
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    try:
        with temporary.open("xb") as file:          # "x": never overwrites another file of that name
            for part in parts:
                file.write(part)
            file.flush()
            os.fsync(file.fileno())                 # the data reaches the disk before the name does
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, target)
    finally:                                        # stopped part way (any error, Ctrl-C): no temporary left
        temporary.unlink(missing_ok=True)           # after a replace there is none: nothing to remove


def load(path: Any) -> "BlockMask":
    """Read a mask file: its 8-byte length and header first, checked, then exactly the data they describe."""
    path = as_path(path)
    try:
        info = path.stat()
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read a mask file here ({type(err).__name__}: {err.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{path}: is a directory, not a mask file; pass the path of a file written by "
                         f"BlockMask.save (e.g. {path / 'mask.safetensors'})")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: not a regular file (a device, pipe or socket); pass a file written by "
                         f"BlockMask.save")
    if info.st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: file is {info.st_size:,} bytes, more than the {MAX_FILE_BYTES:,} a mask may take")
    try:
        with open(path, "rb") as file:
            return _read(file, info.st_size, str(path))
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a mask file") from None


def from_bytes(data: bytes, source: str = "<bytes>") -> "BlockMask":
    """Parse a mask file's bytes; every defect raises ``ValueError`` naming ``source``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data: expected the bytes of a mask file, got {type(data).__name__}")
    return _read(io.BytesIO(data), memoryview(data).nbytes, source)   # bytes, whatever the view's item size


def _read(file: BinaryIO, size: int, source: str) -> "BlockMask":
    from .block_mask import BlockMask

    def bad(reason: str) -> ValueError:
        return ValueError(f"{source}: not a valid sparsecore mask file: {reason}")

    if size < 8:
        raise bad(f"{size} bytes, too short for the 8-byte header length")
    first = _read_exactly(file, 8, bad)
    (header_len,) = struct.unpack("<Q", first)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise bad(f"declared header length {header_len:,} does not fit (file has {size:,} bytes, "
                  f"limit {MAX_HEADER_BYTES:,}); the file is truncated or corrupted, or not a safetensors file at all "
                  f"(its first 8 bytes {first!r} are not a length; BlockMask.save writes mask files)")
    header = _parse_json(_read_exactly(file, header_len, bad), "header", bad)
    if not isinstance(header, dict):
        raise bad(f"header must be a JSON object, got {type(header).__name__}")
    expected_keys = {"__metadata__", *TENSORS}
    if set(header) != expected_keys:
        raise bad(f"header keys must be {sorted(expected_keys)}, got {sorted(map(str, header))[:12]}")
    meta_fields = _check_metadata(header["__metadata__"], bad)
    data_size = size - 8 - header_len
    spans = {name: _span(name, header[name], st_dtype, np_dtype, ndim, data_size, bad)
             for name, (st_dtype, np_dtype, ndim) in TENSORS.items()}
    _check_coverage(list(spans.values()), data_size, bad)
    num_heads = meta_fields["num_heads"]
    if not (num_heads.isascii() and num_heads.isdigit() and len(num_heads) <= 9 and num_heads[0] != "0"):
        raise bad(f"__metadata__.num_heads must be an integer string (a positive decimal), got {num_heads[:40]!r}")
    meta = _parse_json(meta_fields["meta"].encode(), "__metadata__.meta", bad)

    buffer = memoryview(_read_exactly(file, data_size, bad))   # only now: the header says what the bytes are
    try:
        arrays = {name: np.frombuffer(buffer[begin:end], dtype=TENSORS[name][1]).reshape(header[name]["shape"])
                  for name, (begin, end) in spans.items()}
        unselected = Unselected.parse(meta_fields.get("unselected", "drop"))
        return BlockMask(int(num_heads), arrays["q_offsets"], arrays["kv_offsets"], arrays["indptr"],
                         arrays["indices"], arrays["budgets"], meta, unselected)
    except (TypeError, ValueError) as err:
        raise bad(f"the arrays do not form a valid mask: {err}") from None


def _read_exactly(file: BinaryIO, count: int, bad) -> bytes:
    data = file.read(count)
    if len(data) != count:
        raise bad(f"expected {count:,} more bytes, got {len(data):,} (the file changed while being read)")
    return data


def _parse_json(raw: bytes, what: str, bad) -> Any:
    try:
        return parse_json(raw, what)
    except ValueError as err:
        raise bad(str(err)) from None


def _check_metadata(metadata: Any, bad) -> dict[str, str]:
    required = ("format", "format_version", "num_heads", "meta")
    if not isinstance(metadata, dict) or not all(isinstance(metadata.get(k), str) for k in required):
        raise bad(f"__metadata__ must be an object with string fields {list(required)}")
    if metadata["format"] != FORMAT_NAME:
        raise bad(f"__metadata__.format is {metadata['format']!r}, expected {FORMAT_NAME!r}")
    if metadata["format_version"] not in READABLE_VERSIONS:
        raise bad(f"format_version {metadata['format_version']!r} is not supported (this sparsecore reads "
                  f"{list(READABLE_VERSIONS)}); upgrade sparsecore or re-save the mask with this version")
    allowed = set(required) | ({"unselected"} if metadata["format_version"] != "1" else set())
    if set(metadata) - allowed or not all(isinstance(metadata[k], str) for k in metadata):
        raise bad(f"__metadata__ of format_version {metadata['format_version']} takes the string fields "
                  f"{sorted(allowed)}, got {sorted(map(str, metadata))}")
    return metadata


def _span(name: str, entry: Any, st_dtype: str, np_dtype: str, ndim: int, data_size: int, bad) -> tuple[int, int]:
    """The byte range of tensor ``name`` in the data, checked against its dtype and shape (no data read)."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"{name}: entry must have exactly dtype, shape, data_offsets")
    if entry["dtype"] != st_dtype:
        raise bad(f"{name}: dtype must be {st_dtype}, got {str(entry['dtype'])[:20]!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and len(shape) == ndim and all(_is_count(s) for s in shape)):
        raise bad(f"{name}: shape must be a list of {ndim} non-negative integers, got {str(shape)[:80]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise bad(f"{name}: data_offsets must be [begin, end] non-negative integers, got {str(offsets)[:80]}")
    begin, end = offsets
    nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
    if end < begin or end - begin != nbytes or end > data_size:
        raise bad(f"{name}: data_offsets {str(offsets)[:60]} do not hold shape {str(shape)[:60]} of {st_dtype} "
                  f"({_digits(nbytes)} bytes) inside a {data_size:,}-byte buffer")
    return begin, end


def _digits(count: int) -> str:
    """``count`` for a message: a crafted shape's byte count may be too large for a float or even for ``str``."""
    return f"{count:,}" if count.bit_length() <= 64 else f"over 2**{count.bit_length() - 1}"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_coverage(spans: list[tuple[int, int]], size: int, bad) -> None:
    """The tensors must tile the buffer exactly: no overlap, no gap, no trailing bytes."""
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise bad(f"tensor data overlaps or leaves a gap at byte {position} of the buffer")
        position = end
    if position != size:
        raise bad(f"{size - position:,} unexpected bytes after the last tensor")
