"""Hostile paths and files for ``BlockMask.load``: ValueError (a bad file) or TypeError (a bad argument), bounded.

``load`` reads the 8-byte header length and the header first, checks them, and only then
reads exactly the data they describe; a directory, a device or a pipe is refused without
reading it. Memory and time are bounded per call (:func:`hostile.bounded`); a file whose
size alone would exceed the bound is made sparse, so nothing here writes gigabytes.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hostile import bounded, refused

from sparsecore import BlockMask
from sparsecore.ir.serialization import from_bytes


def sample() -> BlockMask:
    dense = np.random.default_rng(0).random((2, 3, 4)) < 0.5
    return BlockMask.from_dense(dense, 40, 50, 16, kv_block=13, meta={"method": "hand", "p": [1, 2]})


def parts(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def build(header: dict | str, buffer: bytes) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + buffer


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    return sample().save(tmp_path_factory.mktemp("good") / "m.safetensors").read_bytes()


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                                       max_size=3), max_leaves=6)
FIELDS = [("q_offsets", "shape"), ("q_offsets", "data_offsets"), ("indptr", "shape"), ("indptr", "dtype"),
          ("indices", "shape"), ("indices", "data_offsets"), ("budgets", "dtype"), ("budgets", "data_offsets"),
          ("__metadata__", "num_heads"), ("__metadata__", "meta"), ("__metadata__", "format_version"),
          ("__metadata__", "unselected"), ("__metadata__", "format"), ("kv_offsets", None), ("__metadata__", None)]


HARMLESS = [(("__metadata__", "meta"), '{"method": "edited"}'), (("__metadata__", "num_heads"), "2"),
            (("indptr", "dtype"), "I32"), (("__metadata__", "unselected"), "zeroth")]


def edit(good: bytes, field: tuple[str, str | None], value) -> bytes:
    """``good`` with one header entry (``key`` None) or one key of an entry set to ``value``."""
    header, buffer = parts(good)
    entry, key = field
    if key is None:
        header[entry] = value
    else:
        header[entry][key] = value
    return build(header, buffer)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=150)
@given(field=st.sampled_from(FIELDS), value=JSON_VALUES)
@example(field=HARMLESS[0][0], value=HARMLESS[0][1])                       # one that loads
def test_any_header_edit_is_refused_or_loads_a_valid_mask(good, field, value):
    data = edit(good, field, value)
    with bounded():
        try:
            mask = from_bytes(data, "edited")
        except ValueError as err:
            assert str(err).startswith("edited: not a valid sparsecore mask file: ")
        else:                                                              # a harmless edit keeps the blocks
            assert isinstance(mask, BlockMask) and (mask.to_dense() == sample().to_dense()).all()


@pytest.mark.parametrize("field, value", HARMLESS, ids=[f"{e}-{k}" for (e, k), _ in HARMLESS])
def test_harmless_header_edits_load_the_same_blocks(good, field, value):
    mask, want = from_bytes(edit(good, field, value), "edited"), sample()
    assert (mask.to_dense() == want.to_dense()).all()
    assert mask.meta == (json.loads(value) if field == ("__metadata__", "meta") else want.meta)
    assert str(mask.unselected) == (value if field == ("__metadata__", "unselected") else str(want.unselected))


@given(claim=st.integers(2**20, 2**62))
def test_huge_claimed_shapes_are_refused_before_any_read(good, claim):
    header, buffer = parts(good)
    header["indices"]["shape"] = [claim]
    header["indices"]["data_offsets"] = [header["indices"]["data_offsets"][0],
                                         header["indices"]["data_offsets"][0] + 4 * claim]
    refused(lambda: from_bytes(build(header, buffer), "huge"), "indices: data_offsets")


@pytest.mark.parametrize("shape", [[10**400], [2**62, 2**62]])
def test_claimed_byte_counts_past_any_float_are_refused_in_one_line(good, shape):
    """The message formatted the byte count as a float: OverflowError, a traceback out of ``load``."""
    header, buffer = parts(good)
    header["indices"]["shape"] = shape if len(shape) == 1 else shape[:1]
    refused(lambda: from_bytes(build(header, buffer), "huge"), "indices: data_offsets")


def test_an_empty_shape_with_a_huge_side_is_refused_as_a_bad_file(good):
    """indptr of shape [0, 2**62] holds no bytes, so its span checks pass; NumPy's reshape then failed unnamed."""
    header, buffer = parts(good)
    entry = header["indptr"]
    begin, end = entry["data_offsets"]
    entry["shape"], entry["data_offsets"] = [0, 2**62], [begin, begin]
    for name in ("indices", "budgets"):                      # the later tensors move up by the bytes indptr gave back
        header[name]["data_offsets"] = [o - (end - begin) for o in header[name]["data_offsets"]]
    data = build(header, buffer[:begin] + buffer[end:])
    with pytest.raises(ValueError, match="^cut: not a valid sparsecore mask file: "):
        from_bytes(data, "cut")


def test_from_bytes_counts_bytes_of_any_view(good):
    """A memoryview of 4-byte items was sized by its item count: a valid file read as truncated."""
    assert len(good) % 4 == 0                                # the header is padded to 8 bytes, the arrays are 4 or 8
    assert from_bytes(memoryview(good).cast("I"), "view") == from_bytes(good, "bytes")


def test_save_refuses_a_file_load_would_refuse_for_its_size(tmp_path, monkeypatch):
    """A mask may list 2**31 - 1 blocks (8 GiB of indices); load refuses files over 2 GiB, so save must too (here
    with the limit lowered to 512 bytes to stand for it)."""
    from sparsecore.ir import serialization
    monkeypatch.setattr(serialization, "MAX_FILE_BYTES", 512)
    mask = BlockMask.from_dense(np.ones((4, 8, 8), bool), 32, 32, 4)
    refused(lambda: mask.save(tmp_path / "big.safetensors"), "indices: the file would take")
    assert not (tmp_path / "big.safetensors").exists()


def test_save_refuses_a_header_load_would_refuse(tmp_path):
    mask = BlockMask.from_dense(np.eye(3, dtype=bool)[None], 10, 10, 4, meta={"notes": "\u8996" * 160_000})
    refused(lambda: mask.save(tmp_path / "big.safetensors"), "meta")
    assert not (tmp_path / "big.safetensors").exists()


def test_duplicate_header_keys_are_refused(good):
    """json.loads keeps the last value of a repeated key; a mask file must not mean two things."""
    header, buffer = parts(good)
    text = json.dumps(header)
    twice = text.replace('"indices":', '"indices": {"dtype": "I32", "shape": [0], "data_offsets": [0, 0]}, '
                                       '"indices":', 1)
    refused(lambda: from_bytes(build(twice, buffer), "dup"), "has the key 'indices' twice")
    meta = dict(header)
    meta["__metadata__"] = {**header["__metadata__"], "meta": '{"method": "a", "method": "b"}'}
    refused(lambda: from_bytes(build(meta, buffer), "dup"), "__metadata__.meta has the key 'method' twice")
    many = {**{f"{i:x}": 0 for i in range(80_000)}, **header}     # near the 1 MiB header limit
    many = json.dumps(many)[:-1] + ', "1387f": 1}'          # the 80,000th key again: found in one pass, in bounds
    refused(lambda: from_bytes(build(many, buffer), "dup"), "has the key '1387f' twice")


def test_a_file_shorter_than_its_size_is_refused():
    """A file may read fewer bytes than its size said (truncated while loading; files in /proc or /sys)."""
    from sparsecore.ir.serialization import _read
    refused(lambda: _read(io.BytesIO(b"\x01\x02"), 4096, "short"), "expected 8 more bytes, got 2")


@pytest.mark.parametrize("num_heads", ["", "0", "-2", "2.0", " 2", "2_0", "\u0662", "1" * 5000, "0x2", "+2"])
def test_num_heads_must_be_a_plain_decimal(good, num_heads):
    header, buffer = parts(good)
    header["__metadata__"]["num_heads"] = num_heads
    refused(lambda: from_bytes(build(header, buffer), "heads"), "num_heads")


def test_a_huge_file_with_a_bad_header_is_refused_without_reading_it(tmp_path):
    """The issue: load read a whole 1.9 GB file before rejecting its header."""
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 2) + b"[]")
        f.truncate(1_900_000_000)                      # sparse: takes no disk space
    refused(lambda: BlockMask.load(path), "header must be a JSON object", headroom=256 << 20)


def test_a_huge_file_whose_header_does_not_describe_it_is_refused_without_reading_the_data(tmp_path, good):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(good)
        f.truncate(1_900_000_000)
    refused(lambda: BlockMask.load(path), "unexpected bytes after the last tensor", headroom=256 << 20)


def test_paths_that_are_not_mask_files(tmp_path):
    refused(lambda: BlockMask.load(tmp_path), "is a directory")              # was IsADirectoryError
    refused(lambda: BlockMask.load("/dev/zero"), "not a regular file")        # would read forever
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    began = time.monotonic()
    refused(lambda: BlockMask.load(fifo), "not a regular file")              # would block forever
    assert time.monotonic() - began < 5
    refused(lambda: BlockMask.load(str(tmp_path / "a\x00b")), "path")
    refused(lambda: BlockMask.load(tmp_path / ("x" * 5000)), "cannot read")  # name too long
    with pytest.raises(FileNotFoundError):
        BlockMask.load(tmp_path / "missing.safetensors")


@given(path=st.one_of(st.integers(), st.none(), st.binary(max_size=4), st.lists(st.text(max_size=2), max_size=2),
                      st.floats()))
def test_path_arguments_of_the_wrong_type(path):
    refused(lambda: BlockMask.load(path), "path")
    refused(lambda: sample().save(path), "path")


def test_from_bytes_takes_bytes():
    refused(lambda: from_bytes("not bytes"), "data")


@pytest.mark.parametrize("text", ["drop:", "zeroth:", "global-first-order:", "grouped-first-order:"])
def test_an_unselected_field_with_a_colon_and_no_group_is_refused(good, text):
    """``Unselected.parse`` read ``"drop:"`` as ``"drop"`` (an empty group after the colon was taken as no group):
    a file no ``save`` writes loaded as if it were valid."""
    with pytest.raises(ValueError, match="^edited: not a valid sparsecore mask file: .*unselected: expected "
                                         "'<kind>:<group blocks>' with a positive integer"):
        from_bytes(edit(good, ("__metadata__", "unselected"), text), "edited")
