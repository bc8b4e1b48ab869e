"""``meta`` entries that hold one value per head, selected with the heads.

A mask whose ``meta`` records something per head (STA's ``head_windows``) names those keys in
``meta["per_head_keys"]``; :meth:`.BlockMask.select_heads` keeps the selected heads' values, in the
selection's order, so the sub-mask's ``meta`` describes its own heads. A mask is refused at construction where
such an entry does not hold one value per head.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

PER_HEAD_KEYS = "per_head_keys"


def check_meta_heads(meta: Mapping[str, Any], num_heads: int) -> Mapping[str, Any]:
    """``meta`` (returned) if each entry that ``meta["per_head_keys"]`` names is a list of ``num_heads`` values."""
    keys = meta.get(PER_HEAD_KEYS)
    if keys is None:
        return meta
    if not isinstance(keys, (list, tuple)) or not all(isinstance(key, str) and key in meta for key in keys):
        raise ValueError(f"meta[{PER_HEAD_KEYS!r}]: expected a list of the meta keys whose values hold one entry per "
                         f"head, got {keys!r} (meta keys: {sorted(meta)}); name only keys present in meta")
    for key in keys:
        values = meta[key]
        if not isinstance(values, (list, tuple)) or len(values) != num_heads:
            got = f"{len(values)} entries" if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"meta[{key!r}]: listed in meta[{PER_HEAD_KEYS!r}], so expected a list of one entry per "
                             f"head ({num_heads}), got {got}; record one entry per head or drop the key from "
                             f"{PER_HEAD_KEYS!r}")
    return meta


def select_meta_heads(meta: Mapping[str, Any], heads: Sequence[int], num_heads: int) -> Mapping[str, Any]:
    """``meta`` with each entry that ``meta["per_head_keys"]`` names cut to ``heads`` (ids of ``num_heads``)."""
    check_meta_heads(meta, num_heads)
    selected = dict(meta)
    for key in meta.get(PER_HEAD_KEYS, ()):
        selected[key] = [meta[key][h] for h in heads]
    return selected
