"""Saving and loading masks: round trips, interop with safetensors, and hostile files."""

from __future__ import annotations

import json
import pickle
import stat
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import block_masks
from test_block_mask_views import ANY

from sparsecore import BlockMask
from sparsecore.ir.serialization import from_bytes
from sparsecore.ir.validation import meta_to_json


def sample() -> BlockMask:
    dense = np.random.default_rng(0).random((3, 7, 9)) < 0.4
    return BlockMask.from_dense(dense, 100, 130, 15, budgets=[0.2, 0.4, 0.6], meta={"method": "lvsa", "step": 3,
                                                                                 "params": {"window": [1, 2]}})


@settings(max_examples=50)
@given(block_masks(ANY, num_heads=2), st.sampled_from([{}, {"method": "x", "layer": 4, "w": [1.5, None]}]))
def test_round_trip_is_exact(tmp_path_factory, mask, meta):
    mask = BlockMask(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices, mask.budgets, meta)
    path = mask.save(tmp_path_factory.mktemp("m") / "mask.safetensors")
    again = BlockMask.load(path)
    assert again == mask and again.fingerprint() == mask.fingerprint()
    assert meta_to_json(again.meta) == json.dumps(meta, sort_keys=True)


def test_file_opens_with_the_safetensors_library(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors not installed (test extra)")
    mask = sample()
    path = mask.save(tmp_path / "m.safetensors")
    tensors = safetensors_numpy.load_file(str(path))
    assert (tensors["indices"] == mask.indices).all() and (tensors["indptr"] == mask.indptr).all()
    assert (tensors["q_offsets"] == mask.q_offsets).all() and np.allclose(tensors["budgets"], mask.budgets)


def _rebuild(header: dict, buffer: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + buffer


def _parts(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _edited(edit) -> bytes:
    header, buffer = _parts(_sample_bytes())
    result = edit(header, buffer)
    return _rebuild(header, buffer) if result is None else result


def _sample_bytes(tmp=[]) -> bytes:  # noqa: B006 (cache of one file's bytes)
    if not tmp:
        import tempfile
        from pathlib import Path
        with tempfile.TemporaryDirectory() as d:
            tmp.append(sample().save(Path(d) / "m.safetensors").read_bytes())
    return tmp[0]


HOSTILE = {
    "empty": (lambda: b"", r"too short"),
    "header length beyond the file": (lambda: struct.pack("<Q", 2**63) + b"{}", r"declared header length"),
    "header not json": (lambda: struct.pack("<Q", 4) + b"\xff\xfe{x", r"header is not valid UTF-8 JSON"),
    "header a list": (lambda: struct.pack("<Q", 2) + b"[]", r"header must be a JSON object"),
    "json bomb": (lambda: struct.pack("<Q", 200000) + b"[" * 100000 + b"]" * 100000, r"not valid UTF-8 JSON"),
    "pickle file": (lambda: pickle.dumps({"indices": [1, 2]}), r"declared header length|not valid"),
    "missing tensor": (lambda: _edited(lambda h, b: h.pop("budgets") and None), r"header keys must be"),
    "extra tensor": (lambda: _edited(lambda h, b: h.update(x=h["budgets"])), r"header keys must be"),
    "wrong format": (lambda: _edited(lambda h, b: h["__metadata__"].update(format="other")), r"format is 'other'"),
    "future version": (lambda: _edited(lambda h, b: h["__metadata__"].update(format_version="9")),
                       r"format_version '9' is not supported"),
    "wrong dtype": (lambda: _edited(lambda h, b: h["indices"].update(dtype="F32")), r"indices: dtype must be I32"),
    "huge shape": (lambda: _edited(lambda h, b: h["indices"].update(shape=[2**62])), r"indices: data_offsets"),
    "negative shape": (lambda: _edited(lambda h, b: h["indices"].update(shape=[-1])), r"indices: shape must be"),
    "float offsets": (lambda: _edited(lambda h, b: h["indices"].update(data_offsets=[0.5, 3])),
                      r"indices: data_offsets must be"),
    "offsets past the end": (lambda: _edited(lambda h, b: h["budgets"].update(
        data_offsets=[h["budgets"]["data_offsets"][0] + 8, h["budgets"]["data_offsets"][1] + 8])),
        r"budgets: data_offsets"),
    "truncated data": (lambda: _sample_bytes()[:-5], r"budgets: data_offsets"),
    "trailing bytes": (lambda: _sample_bytes() + b"junk", r"unexpected bytes after the last tensor"),
    "overlapping tensors": (lambda: _edited(lambda h, b: h["kv_offsets"].update(
        data_offsets=h["q_offsets"]["data_offsets"], shape=h["q_offsets"]["shape"])), r"overlaps or leaves a gap"),
    "non-integer heads": (lambda: _edited(lambda h, b: h["__metadata__"].update(num_heads="two")),
                          r"num_heads must be an integer string"),
    "meta not json": (lambda: _edited(lambda h, b: h["__metadata__"].update(meta="{")), r"meta is not valid"),
    "invalid mask": (lambda: _edited(lambda h, b: h["__metadata__"].update(num_heads="4")),
                     r"the arrays do not form a valid mask: indptr: expected shape"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_files_raise_value_error(tmp_path, name):
    make, message = HOSTILE[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make())
    with pytest.raises(ValueError, match=message):
        BlockMask.load(path)


def test_a_thousand_fuzzed_files_only_raise_value_error(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("load must never unpickle")
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    good = _sample_bytes()
    rng = np.random.default_rng(2026)
    outcomes = {"loaded": 0, "rejected": 0}
    for trial in range(1000):
        data = bytearray(good)
        kind = trial % 4
        if kind == 0:    # flip random bytes anywhere
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
                data[pos] = int(rng.integers(0, 256))
        elif kind == 1:  # truncate
            data = data[:int(rng.integers(0, len(data)))]
        elif kind == 2:  # corrupt the header text only
            (n,) = struct.unpack("<Q", good[:8])
            for pos in rng.integers(8, 8 + n, size=int(rng.integers(1, 4))):
                data[pos] = int(rng.choice(list(b'{}[]":,0123456789-eE ')))
        else:            # random bytes behind a plausible header length
            data = struct.pack("<Q", int(rng.integers(0, 400))) + rng.bytes(int(rng.integers(0, 600)))
        try:
            from_bytes(bytes(data), f"fuzz-{trial}")
            outcomes["loaded"] += 1
        except ValueError:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 900, outcomes  # almost every mutation breaks something; none may crash


def test_serialization_module_does_not_use_pickle():
    import inspect

    import sparsecore.ir.serialization as module
    source = inspect.getsource(module)
    assert "pickle" not in vars(module) and "import pickle" not in source
    assert "allow_pickle" not in source and "np.load(" not in source and "torch.load" not in source


class _HalfWritten:
    """A file whose first write stores half its bytes, then raises ``error`` (a full disk, a Ctrl-C)."""

    def __init__(self, file, error: BaseException):
        self.file, self.error = file, error

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()

    def write(self, data):
        data = memoryview(data).cast("B")
        self.file.write(data[:len(data) // 2])
        raise self.error


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_an_interrupted_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, error):
    """``save`` wrote the destination in place: a write stopped half way left a truncated file (load refused it)
    where the good mask had been."""
    from pathlib import Path
    old = sample()
    path = old.save(tmp_path / "m.safetensors")
    good = path.read_bytes()
    real_open = Path.open

    def failing_open(self, mode="r", *args, **kwargs):
        file = real_open(self, mode, *args, **kwargs)
        return _HalfWritten(file, error) if any(c in mode for c in "wxa") else file

    monkeypatch.setattr(Path, "open", failing_open)
    new = BlockMask.from_dense(np.random.default_rng(1).random((2, 4, 4)) < 0.5, 40, 40, 10)
    with pytest.raises(type(error)):
        new.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good and BlockMask.load(path) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    monkeypatch.setattr(Path, "open", failing_open)
    with pytest.raises(type(error)):
        new.save(tmp_path / "fresh.safetensors")            # nothing there before: nothing there after
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert BlockMask.load(new.save(path)) == new                # and an uninterrupted save replaces the file


def test_a_save_over_a_private_file_keeps_it_private_and_a_missing_folder_is_named(tmp_path):
    """The replacing save wrote a new file with the default mode over a 0o600 one, and a missing folder's error
    named the hidden temporary file, not the path given."""
    path = sample().save(tmp_path / "m.safetensors")
    path.chmod(0o600)
    sample().save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileNotFoundError, match=r"path: the folder of '.*nowhere/m.safetensors' does not exist"):
        sample().save(tmp_path / "nowhere" / "m.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_refuses_a_directory_by_name(tmp_path):
    with pytest.raises(ValueError, match="path: .* is a directory"):
        sample().save(tmp_path)
