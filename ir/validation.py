"""Validation of the block-mask IR, in one place and in tiers.

Tier 1 checks types and shapes (cheap, no look at values); tier 2 checks values
(offsets, CSR pointers, index ranges, order, budgets). Every failure is a
``ValueError`` or ``TypeError`` whose message names the field, what was expected,
what was found, and where it makes sense, what to do about it.

The functions here take raw user input (numpy arrays, lists) and return canonical
read-only numpy arrays; :class:`sparsecore.ir.BlockMask` calls them from
``__post_init__`` so that no invalid mask can exist. Masks whose lists are torch
tensors on a device are checked by :func:`check_device_lists`: the same predicates,
evaluated on the device and read back in one transfer; when one fails, the NumPy
checks run on a host copy to produce the message, so both paths say the same thing.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from .csr import INDEX_LIMIT, is_tensor
from .head_meta import check_meta_heads

PAIR_LIMIT = 1 << 62                   # num_heads * q_len * kv_len: kept-pair counts are int64 with headroom
META_DEPTH = 32                        # nesting levels allowed in ``meta``


def as_numpy(value: Any, field: str) -> np.ndarray:
    """Return ``value`` as a numpy array; accepts numpy, torch tensors (copied to the host) and sequences."""
    if is_tensor(value):
        refuse_meta(value, field)
        value = value.detach().cpu()
        value = (value.double() if str(value.dtype) == "torch.bfloat16" else value).numpy()   # NumPy has no bf16
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{field}: expected an array-like of integers, got {type(value).__name__} ({err})") from None
    if isinstance(value, (list, tuple)) and arr.size and np.issubdtype(arr.dtype, np.number):
        flags = [isinstance(x, (bool, np.bool_)) for x in np.asarray(value, dtype=object).ravel()]
        if any(flags):                              # NumPy would read True as 1: a bool is not an index
            raise TypeError(f"{field}: expected integers, got a bool mixed with numbers at position "
                            f"{flags.index(True)} of {str(value)[:80]} (NumPy would read it as 1)")
    return arr


def refuse_meta(tensor: Any, field: str) -> None:
    """A tensor on the ``meta`` device holds no values to check or copy: refused by name."""
    if tensor.is_meta:
        raise ValueError(f"{field}: expected a tensor with values, got one on the 'meta' device; build the mask from "
                         f"tensors on a real device (a mask's lists are read, not traced)")


def as_path(value: Any, field: str = "path") -> Path:
    """A file path from a str or ``os.PathLike`` (not bytes, not a number), without a NUL character."""
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bytes):
        raise TypeError(f"{field}: expected a str or pathlib.Path, got {type(value).__name__}")
    path = Path(value)
    if "\x00" in str(path):
        raise ValueError(f"{field}: expected a file path, got one with a NUL character: {str(path)[:60]!r}")
    return path


def torch_device(value: Any, field: str = "device") -> Any:
    """A ``torch.device`` from a device string or device (not an int, which torch would read as a CUDA index)."""
    import torch
    if isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{field}: expected a device string such as 'cpu' or 'cuda:0' (or a torch.device), got "
                        f"{type(value).__name__}")
    try:
        return torch.device(value)
    except RuntimeError as err:
        raise ValueError(f"{field}: {value[:40]!r} is not a torch device; pass e.g. 'cpu', 'cuda', 'cuda:1' or 'npu' "
                         f"(torch: {str(err).splitlines()[0][:300]})") from None


def check_int(value: Any, field: str, minimum: int = 1) -> int:
    """An ``int`` (not ``bool``) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{field}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{field}: expected an int >= {minimum}, got {value}")
    return int(value)


def check_bool(value: Any, field: str) -> bool:
    """A Python ``bool``: a NumPy or torch boolean is refused with its remedy (``bool(x)``), as are 0 and 1."""
    if not isinstance(value, bool):
        kind = type(value)
        name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__.split('.')[0]}.{kind.__name__}"
        remedy = f"; pass bool({field})" if isinstance(value, (np.bool_, np.ndarray)) or is_tensor(value) else ""
        raise TypeError(f"{field}: expected a bool (True or False), got {name} {value!r}{remedy}")
    return value


def check_index(value: Any, field: str, count: int) -> int:
    """An ``int`` (not ``bool``) in ``0..count - 1``."""
    value = check_int(value, field, minimum=0)
    if value >= count:
        raise ValueError(f"{field}: expected 0..{count - 1}, got {value}")
    return value


def integer_array(value: Any, field: str, *, ndim: int, dtype: type) -> np.ndarray:
    """Tier 1 for an index array: integer dtype, ``ndim`` dimensions, values fit ``dtype``."""
    arr = as_numpy(value, field)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        if arr.size == 0 and arr.dtype == np.float64:  # an empty Python list
            arr = arr.astype(dtype)
        else:
            raise TypeError(f"{field}: expected an integer array, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise TypeError(f"{field}: expected a {ndim}-D integer array, got the scalar {type(value).__name__} {value!r}")
    if arr.ndim != ndim:
        raise ValueError(f"{field}: expected {ndim} dimension(s), got shape {tuple(arr.shape)}")
    info = np.iinfo(dtype)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise ValueError(f"{field}: values must fit {np.dtype(dtype).name}, got range [{arr.min()}, {arr.max()}]")
    return frozen(arr.astype(dtype, copy=True))


def read_only(value: Any) -> Any:
    """A writable NumPy array made read-only in place (a mask's host lists: host kernels are cached by their
    content); anything else as it is."""
    return frozen(value) if isinstance(value, np.ndarray) and value.flags.writeable else value


def frozen(arr: np.ndarray) -> np.ndarray:
    """Return ``arr`` C-contiguous and read-only (the caller passes an array it owns)."""
    arr = np.ascontiguousarray(arr)
    arr.setflags(write=False)
    return arr


def check_offsets(offsets: np.ndarray, field: str) -> None:
    """Block boundaries: ``[0, ..., length]``, strictly increasing, at least one block."""
    if offsets.shape[0] < 2:
        raise ValueError(f"{field}: expected at least 2 boundaries [0, ..., length], got {offsets.tolist()[:8]}")
    if offsets[0] != 0:
        raise ValueError(f"{field}[0]: expected 0 (blocks start at token 0), got {offsets[0]}")
    down = offsets[1:] <= offsets[:-1]          # compared, not subtracted: a difference could overflow int64
    if down.any():
        k = int(np.argmax(down))
        raise ValueError(
            f"{field}: boundaries must be strictly increasing, got {field}[{k}]={offsets[k]} "
            f"followed by {field}[{k + 1}]={offsets[k + 1]} (an empty or negative-size block)"
        )


def check_extent(num_heads: int, q_offsets: np.ndarray, kv_offsets: np.ndarray) -> None:
    """Both sides' boundaries, and a total size whose token-pair counts fit int64 (``H * q_len * kv_len < 2**62``)."""
    check_offsets(q_offsets, "q_offsets")
    check_offsets(kv_offsets, "kv_offsets")
    check_pairs(num_heads, int(q_offsets[-1]), int(kv_offsets[-1]))


def check_pairs(num_heads: int, q_len: int, kv_len: int, field: str = "q_offsets, kv_offsets",
                claim: str = "the block boundaries claim a sequence no attention input can have: check "
                             "q_offsets[-1] and kv_offsets[-1]") -> None:
    """``num_heads * q_len * kv_len`` below :data:`PAIR_LIMIT` (Python ints: no overflow while checking); the error
    names ``field``, the arguments the sizes came from, and says what they ``claim``."""
    pairs = int(num_heads) * int(q_len) * int(kv_len)
    if pairs >= PAIR_LIMIT:
        raise ValueError(f"{field}: num_heads x q_len x kv_len = {num_heads} x {q_len} x {kv_len} = {pairs:.3e} "
                         f"token pairs, expected fewer than 2**62 (their counts are int64); {claim}")


def check_csr(indptr: np.ndarray, indices: np.ndarray, num_heads: int, num_q_blocks: int, num_kv_blocks: int,
              kv_len: int) -> None:
    """Tier 1 + 2 for the per-head CSR lists."""
    expected = (num_heads, num_q_blocks + 1)
    if indptr.shape != expected:
        raise ValueError(f"indptr: expected shape [num_heads, num_q_blocks + 1] = {list(expected)}, "
                         f"got {list(indptr.shape)}")
    flat_starts = indptr[:, 0]
    if indptr[0, 0] != 0:
        raise ValueError(f"indptr[0, 0]: expected 0 (the lists start at the beginning of indices), got {indptr[0, 0]}")
    if indptr.min() < 0:                      # before the differences: int32 ones could wrap around
        h, i = np.argwhere(indptr < 0)[0]
        raise ValueError(f"indptr[{h}, {i}]: expected a pointer into indices (>= 0), got {indptr[h, i]}")
    if (np.diff(indptr, axis=1) < 0).any():
        h, i = np.argwhere(np.diff(indptr, axis=1) < 0)[0]
        raise ValueError(f"indptr[{h}]: expected non-decreasing pointers, got indptr[{h}, {i}]={indptr[h, i]} "
                         f"> indptr[{h}, {i + 1}]={indptr[h, i + 1]}")
    if num_heads > 1 and (flat_starts[1:] != indptr[:-1, -1]).any():
        h = int(np.argmax(flat_starts[1:] != indptr[:-1, -1])) + 1
        raise ValueError(f"indptr[{h}, 0]: expected {indptr[h - 1, -1]} (each head's lists follow the previous "
                         f"head's in indices), got {indptr[h, 0]}")
    if indptr[-1, -1] != indices.shape[0]:
        raise ValueError(f"indices: expected {indptr[-1, -1]} entries (indptr[-1, -1]), got {indices.shape[0]}")
    if indices.size == 0:
        return
    bad = (indices < 0) | (indices >= num_kv_blocks)
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(f"indices[{k}]={indices[k]} is out of range: key blocks are 0..{num_kv_blocks - 1} "
                         f"(kv_len={kv_len}, {num_kv_blocks} blocks)")
    # Within a row, ids must strictly increase; a row boundary may go down.
    steps = np.diff(indices.astype(np.int64))
    row_starts = np.zeros(indices.shape[0], dtype=bool)
    row_starts[indptr.ravel()[(indptr.ravel() > 0) & (indptr.ravel() < indices.shape[0])]] = True
    bad = (steps <= 0) & ~row_starts[1:]
    if bad.any():
        k = int(np.argmax(bad)) + 1
        h, i = _row_of(indptr, k)
        what = "a duplicate" if indices[k] == indices[k - 1] else "out of order"
        raise ValueError(f"indices[{k}]={indices[k]} after indices[{k - 1}]={indices[k - 1]} in row (head {h}, "
                         f"query block {i}) is {what}: each row must be sorted ascending and unique "
                         f"(use BlockMask.from_lists to sort rows)")


def _row_of(indptr: np.ndarray, position: int) -> tuple[int, int]:
    """The (head, query block) whose list holds ``indices[position]``."""
    for h in range(indptr.shape[0]):
        if indptr[h, 0] <= position < indptr[h, -1]:
            i = int(np.searchsorted(indptr[h], position, side="right")) - 1
            return h, i
    raise IndexError(position)  # unreachable for a position inside indices


def check_budgets(value: Any, num_heads: int) -> np.ndarray:
    """Per-head budgets: float or integer ``[num_heads]``, finite, in [0, 1]; returned as read-only float64."""
    arr = as_numpy(value, "budgets")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)) or arr.dtype == np.bool_:
        raise TypeError(f"budgets: expected a float array, got dtype {arr.dtype}")
    if arr.shape != (num_heads,):
        raise ValueError(f"budgets: expected shape [num_heads] = [{num_heads}], got {list(arr.shape)}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr) | (arr < 0) | (arr > 1)
    if bad.any():
        h = int(np.argmax(bad))
        raise ValueError(f"budgets[{h}]={arr[h]}: expected a fraction of key blocks in [0, 1]")
    return frozen(arr)


def freeze_meta(meta: Any, num_heads: int | None = None) -> Mapping[str, Any]:
    """``meta`` must be a JSON-able dict with string keys (and, for a mask of ``num_heads`` heads, per-head entries
    of that many: :func:`.head_meta.check_meta_heads`); returns a read-only deep copy."""
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta: expected a dict, got {type(meta).__name__}")
    _check_json(meta, "meta", 0)       # json.dumps alone would turn a key 1 into "1" and a tuple into a list
    try:
        text = json.dumps(meta, sort_keys=True, allow_nan=False, default=_thaw)
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"meta: expected a JSON-serializable dict (str keys; str, number, bool, None, list, dict "
                         f"values; no NaN), got {err}") from None
    frozen_meta = _deep_freeze(json.loads(text))
    return frozen_meta if num_heads is None else check_meta_heads(frozen_meta, num_heads)


def _check_json(value: Any, where: str, depth: int) -> None:
    """Every key a str, every value a JSON type (str, finite number, bool, None, list, dict); names the place."""
    expected = ("expected a JSON-serializable dict (str keys; str, number, bool, None, list, dict values; no NaN), "
                "got")
    if depth > META_DEPTH:
        raise ValueError(f"meta: {expected} values nested deeper than {META_DEPTH} levels at {where}")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"meta: {expected} the key {key!r} of type {type(key).__name__} at {where} (keys "
                                 f"are not converted: use str({key!r}))")
            _check_json(item, f"{where}[{key!r}]", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, float) and not np.isfinite(value):
        raise ValueError(f"meta: {expected} {value} at {where}")
    elif value is not None and not isinstance(value, (str, bool, int, float)):
        raise ValueError(f"meta: {expected} a {type(value).__name__} at {where}")


def _deep_freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return MappingProxyType({k: _deep_freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_deep_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """``json.dumps`` fallback for the read-only containers made by :func:`freeze_meta`."""
    if isinstance(value, MappingProxyType):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def parse_json(raw: bytes | str, what: str) -> Any:
    """JSON text read strictly: a key written twice (``json.loads`` alone keeps the last value silently), text that
    is not UTF-8 JSON, nesting past Python's recursion limit and integers past its digit limit all raise
    ``ValueError`` naming ``what``."""
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey as err:
        raise ValueError(f"{what} has the key {str(err)[:40]!r} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as err:   # JSONDecodeError, int digit limits
        raise ValueError(f"{what} is not valid UTF-8 JSON ({type(err).__name__}: {str(err)[:80]})") from None


class _DuplicateKey(Exception):
    """A JSON object with a key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    found = dict(pairs)
    if len(found) != len(pairs):                 # the first key seen twice, in one pass (a header may hold 10^5 keys)
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return found


def meta_to_json(meta: Mapping[str, Any]) -> str:
    """Canonical JSON text of a frozen ``meta``."""
    return json.dumps(meta, sort_keys=True, allow_nan=False, default=_thaw)


def thawed_meta(meta: Mapping[str, Any]) -> dict:
    """A frozen ``meta`` as plain dicts and lists (what ``pickle`` can write)."""
    return json.loads(meta_to_json(meta))


def check_device_lists(indptr: Any, indices: Any, budgets: Any, num_heads: int, num_q_blocks: int,
                       num_kv_blocks: int, kv_len: int) -> tuple[Any, Any, Any]:
    """Validate torch-held lists on their device; returns them as owned int32 / float64 tensors.

    Tier 1 (types, shapes, one device) reads no values. Tier 2 evaluates every value
    predicate of :func:`check_csr` and :func:`check_budgets` on the device and reads the
    flags back once; on a failure the NumPy checks run on host copies for the message.
    ``budgets`` are taken as a host mask takes them: a tensor of any integer or float dtype
    on any device, shape-checked, then copied to float64 on indptr's device; a sequence or
    NumPy array, checked by :func:`check_budgets` on the host, then uploaded.
    """
    import torch
    for name, t in (("indptr", indptr), ("indices", indices)):
        if not is_tensor(t):
            raise TypeError(f"{name}: expected a torch tensor like the other lists (a mask keeps indptr and indices "
                            f"on one side: both NumPy or both torch), got {type(t).__name__}")
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(f"{name}: expected an integer array, got dtype {str(t.dtype).removeprefix('torch.')}")
        refuse_meta(t, name)
    for name, t, ndim in (("indptr", indptr, 2), ("indices", indices, 1)):
        if t.ndim != ndim:
            raise ValueError(f"{name}: expected {ndim} dimension(s), got shape {tuple(t.shape)}")
    expected = (num_heads, num_q_blocks + 1)
    if tuple(indptr.shape) != expected:
        raise ValueError(f"indptr: expected shape [num_heads, num_q_blocks + 1] = {list(expected)}, "
                         f"got {list(indptr.shape)}")
    if indices.device != indptr.device:
        raise ValueError(f"indices: expected the device of indptr ({indptr.device}), got {indices.device}")
    if budgets is not None and not is_tensor(budgets):   # a host sequence or array, taken as a host mask takes it
        budgets = torch.tensor(check_budgets(budgets, num_heads), device=indptr.device)
    elif budgets is not None:
        refuse_meta(budgets, "budgets")
        if budgets.dtype == torch.bool or budgets.is_complex():
            raise TypeError(f"budgets: expected a float array, got dtype {str(budgets.dtype).removeprefix('torch.')}")
        if tuple(budgets.shape) != (num_heads,):
            raise ValueError(f"budgets: expected shape [num_heads] = [{num_heads}], got {list(budgets.shape)}")
        budgets = _owned(budgets, torch.float64, indptr.device)     # integer or any float dtype, from any device
    ptr, idx = indptr.to(torch.int64), indices.to(torch.int64)
    flags = [ptr.min() >= 0, ptr.max() <= INDEX_LIMIT, ptr[0, 0] == 0, (ptr[:, 1:] >= ptr[:, :-1]).all(),
             (ptr[1:, 0] == ptr[:-1, -1]).all(), ptr[-1, -1] == idx.shape[0]]
    if idx.numel():
        starts = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        inner = ptr.reshape(-1)
        starts[inner[(inner > 0) & (inner < idx.shape[0])]] = True
        flags += [idx.min() >= 0, idx.max() < num_kv_blocks, ((idx[1:] > idx[:-1]) | starts[1:]).all()]
    if budgets is not None:
        flags.append((torch.isfinite(budgets) & (budgets >= 0) & (budgets <= 1)).all())
    if not bool(torch.stack(flags).all()):                                  # the one host round trip
        host_ptr = integer_array(indptr, "indptr", ndim=2, dtype=np.int32)
        host_idx = integer_array(indices, "indices", ndim=1, dtype=np.int32)
        check_csr(host_ptr, host_idx, num_heads, num_q_blocks, num_kv_blocks, kv_len)
        if budgets is not None:
            check_budgets(budgets, num_heads)
        raise ValueError("indptr, indices: the device check failed but the host check found no defect; "
                         "this is a bug in sparsecore, please report it")
    return _owned(indptr, torch.int32), _owned(indices, torch.int32), budgets


def _owned(tensor: Any, dtype: Any, device: Any = None) -> Any:
    """A contiguous copy in ``dtype`` (on ``device``, if given) that the caller cannot reach (the mask owns its
    tensors)."""
    converted = tensor.to(device=device, dtype=dtype).contiguous()
    return converted.clone() if converted.data_ptr() == tensor.data_ptr() else converted
