"""Files sparsecore writes besides masks (PASA's calibration profile, STA's searched strategy) are written whole or not
at all, as mask files are (``ir.serialization.write_replacing``): they were written in place, so a save stopped part
way (a full disk, Ctrl-C) left a truncated file where the good one had been."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sparsecore.methods import pasa, sta
from sparsecore.methods.sta_search import save_strategy
from sparsecore.methods.sta_strategy import MaskStrategy


def _full_disk(fd: int) -> None:
    raise OSError(28, "No space left on device")


def _profile(tmp_path, values):
    return pasa.CurvatureProfile(np.array(values)).save(tmp_path / "profile.json")


def _strategy(tmp_path, window):
    path = tmp_path / "strategy.json"
    save_strategy(MaskStrategy({(0, 0): (window, window)}), path)
    return path


@pytest.mark.parametrize("save, old, new, read", [
    (_profile, [np.nan, 1.0, 2.0], [np.nan, 5.0, 6.0, 7.0], lambda p: pasa.CurvatureProfile.load(p).values.tolist()),
    (_strategy, (1, 2, 2), (3, 2, 2), lambda p: dict(sta.read_strategy(p))),
])
def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, save, old, new, read):
    path = save(tmp_path, old)
    before, good = path.read_bytes(), read(path)
    monkeypatch.setattr(os, "fsync", _full_disk)               # the data does not reach the disk
    with pytest.raises(OSError, match="No space"):
        save(tmp_path, new)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
    save(tmp_path, new)
    assert read(path) != good                                  # an uninterrupted save replaces it
