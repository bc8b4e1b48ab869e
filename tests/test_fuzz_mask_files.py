"""Fuzzing ``BlockMask.load``: 2,400 mutated mask files give a valid mask or a ValueError, nothing else.

Mutations of a few valid files (seeded, so every run sees the same files): byte flips anywhere
and in the arrays' data only, truncations, edits of the header's JSON (huge, negative, fractional and misshapen shapes;
overlapping, out-of-range and reversed data offsets; wrong dtypes; duplicated keys; missing and
extra keys), edits of ``__metadata__`` (heads, meta, unselected, version), huge header lengths,
and random bytes behind a plausible length. Every file that loads must be a mask that keeps
its promises (round trip, density in [0, 1]). The whole run is bounded: 512 MiB more address
space than it starts with (:func:`hostile.bounded`) and a minute of wall time; one case in
twelve goes through a real file and ``load``, the rest through ``from_bytes``.
"""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest

from hostile import bounded

from sparsecore import BlockMask
from sparsecore.ir.serialization import from_bytes
from sparsecore.ir.unselected import Unselected

TRIALS = 2400
SEED = 20261201


def seeds() -> list[bytes]:
    rng = np.random.default_rng(7)
    dense = rng.random((3, 5, 7)) < 0.4
    masks = [BlockMask.from_dense(dense, 70, 100, 14, kv_block=15, budgets=[0.1, 0.5, 1.0],
                                  meta={"method": "lvsa", "step": 3, "w": [1, None, "x"]}),
             BlockMask.from_lists([[[0, 2], []], [[1], [0, 1, 2]]], [0, 5, 11], [0, 1, 7, 20]),
             BlockMask(1, [0, 64], [0, 64, 128], [[0, 2]], [0, 1], unselected=Unselected("grouped-first-order", 2))]
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as folder:
        return [m.save(Path(folder) / f"{i}.safetensors").read_bytes() for i, m in enumerate(masks)]


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header_text: str, buffer: bytes, length: int | None = None) -> bytes:
    text = header_text.encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + buffer


HOSTILE_NUMBERS = [-1, 0, 1, 3, 2**31, 2**32 + 1, 2**62, 2**63, 2**64 + 7, 10**30, 1.5, -0.0, 1e308, "7", None, True,
                   [], [1, 2]]


def pick(rng: np.random.Generator, values: list):
    return values[int(rng.integers(len(values)))]


def header_edit(rng: np.random.Generator, header: dict, buffer: bytes) -> bytes:
    name = str(rng.choice(["q_offsets", "kv_offsets", "indptr", "indices", "budgets"]))
    entry = header[name]
    kind = int(rng.integers(0, 9))
    if kind == 0:                                   # shapes: huge, negative, fractional, wrong rank
        entry["shape"] = [pick(rng, HOSTILE_NUMBERS) for _ in range(int(rng.integers(0, 4)))]
    elif kind == 1:                                 # data offsets: out of range, reversed, fractional
        entry["data_offsets"] = [pick(rng, HOSTILE_NUMBERS) for _ in range(2)]
    elif kind == 2:                                 # overlap another tensor's bytes (same size: passes the span check)
        other = header[str(rng.choice(["q_offsets", "kv_offsets", "indptr", "indices", "budgets"]))]
        entry["data_offsets"], entry["shape"] = list(other["data_offsets"]), list(other["shape"])
        entry["dtype"] = other["dtype"]
    elif kind == 3:                                 # wrong dtype
        entry["dtype"] = str(rng.choice(["F32", "I64", "U8", "BOOL", "F16", "I32", "F64", "", "i4"]))
    elif kind == 4:                                 # shift the data window
        shift = int(rng.integers(-16, 17))
        entry["data_offsets"] = [entry["data_offsets"][0] + shift, entry["data_offsets"][1] + shift]
    elif kind == 5:                                 # missing or extra keys
        if rng.random() < 0.5:
            header.pop(name)
        else:
            header[name + "_x"] = dict(entry)
    elif kind == 6:                                 # metadata fields
        meta = header["__metadata__"]
        field = str(rng.choice(["num_heads", "meta", "unselected", "format_version", "format", "extra"]))
        meta[field] = str(rng.choice(["0", "-1", "99999999", "2", "3", "", "{", "[]", "{\"a\": NaN}", "null",
                                      "{\"a\": 1, \"a\": 2}", "grouped-first-order:0", "zeroth", "drop:3", "1", "9",
                                      "sparsecore.BlockMask", "x" * 300]))
    elif kind == 7:                                 # a key written twice (json.loads would keep the last)
        text = json.dumps(header)
        return join(text.replace(f'"{name}":', f'"{name}": {{"dtype": "I32", "shape": [0], "data_offsets": [0, 0]}}, '
                                               f'"{name}":', 1), buffer)
    else:                                           # values of the wrong JSON type
        header[name] = pick(rng, HOSTILE_NUMBERS)
    return join(json.dumps(header), buffer)


def mutate(rng: np.random.Generator, good: bytes) -> bytes:
    kind = int(rng.integers(0, 7))
    if kind in (0, 6):                              # flip bytes anywhere, or in the tensors' data only
        (n,) = struct.unpack("<Q", good[:8])
        data = bytearray(good)
        for position in rng.integers(0 if kind == 0 else 8 + n, len(data), size=int(rng.integers(1, 9))):
            data[position] = int(rng.integers(0, 256))
        return bytes(data)
    if kind == 1:                                   # truncate
        return good[:int(rng.integers(0, len(good)))]
    if kind == 2:                                   # edit the header as JSON
        return header_edit(rng, *split(good))
    if kind == 3:                                   # corrupt the header's text
        (n,) = struct.unpack("<Q", good[:8])
        data = bytearray(good)
        for position in rng.integers(8, 8 + n, size=int(rng.integers(1, 4))):
            data[position] = int(rng.choice(list(b'{}[]":,0123456789-eE .')))
        return bytes(data)
    if kind == 4:                                   # a header length that does not fit, or is huge
        header, buffer = split(good)
        lengths = [0, 1, 2**20 + 1, 2**40, 2**63, 2**64 - 1, len(json.dumps(header)) + 1]
        length = lengths[int(rng.integers(len(lengths)))]
        return join(json.dumps(header), buffer, length)
    return struct.pack("<Q", int(rng.integers(0, 400))) + rng.bytes(int(rng.integers(0, 600)))


def test_mutated_mask_files_load_or_raise_value_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load must never unpickle")
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    files = seeds()
    rng = np.random.default_rng(SEED)
    outcomes = {"loaded": 0, "rejected": 0, "through load()": 0}
    path = tmp_path / "fuzz.safetensors"
    with bounded(headroom=512 << 20, seconds=60):
        for trial in range(TRIALS):
            data = mutate(rng, files[trial % len(files)])
            try:
                if trial % 12 == 0:
                    path.write_bytes(data)
                    outcomes["through load()"] += 1
                    mask = BlockMask.load(path)
                else:
                    mask = from_bytes(data, f"fuzz-{trial}")
            except ValueError as err:
                assert "not a valid sparsecore mask file" in str(err), (trial, str(err))
                outcomes["rejected"] += 1
                continue
            outcomes["loaded"] += 1
            assert 0.0 <= mask.density() <= 1.0 and mask.num_heads >= 1, trial
            assert BlockMask.load(mask.save(tmp_path / "again.safetensors")) == mask, trial
    assert sum(outcomes[k] for k in ("loaded", "rejected")) == TRIALS
    assert outcomes["rejected"] > TRIALS * 0.8, outcomes       # most mutations break something; none may crash


@pytest.mark.parametrize("edit", ["num_heads", "meta", "budgets"])
def test_a_mutation_that_keeps_the_file_valid_loads_what_it_says(tmp_path, edit):
    """The fuzz loop's other outcome, checked directly: a harmless edit loads the edited mask."""
    header, buffer = split(seeds()[0])
    if edit == "num_heads":
        header["__metadata__"]["num_heads"] = "3"
    elif edit == "meta":
        header["__metadata__"]["meta"] = json.dumps({"method": "other", "n": [1, 2]})
    else:
        budgets = np.array([0.25, 0.5, 0.75], "<f8").tobytes()
        begin, end = header["budgets"]["data_offsets"]
        buffer = buffer[:begin] + budgets + buffer[end:]
    mask = from_bytes(join(json.dumps(header), buffer))
    assert mask.num_heads == 3
    if edit == "meta":
        assert mask.meta["method"] == "other" and mask.meta["n"] == (1, 2)
    if edit == "budgets":
        assert mask.budgets.tolist() == [0.25, 0.5, 0.75]


def test_a_file_of_another_kind_is_said_to_be_one(tmp_path):
    """A JSON file (a PASA curve) given as a mask was said to declare a header length of 7e18 bytes, "truncated or
    corrupted"; the message now says it may not be a safetensors file at all and shows its first bytes."""
    path = tmp_path / "curve.json"
    path.write_text('{"steps": [0, 1, 2], "budgets": [1.0, 0.5, 0.2]}')
    with pytest.raises(ValueError, match=r"not a safetensors file at all \(its first 8 bytes b'\{\"steps\"' are not "
                                         r"a length; BlockMask.save writes mask files\)"):
        BlockMask.load(path)
