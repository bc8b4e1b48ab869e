"""The block-mask IR: which key blocks each query block of each head attends to.

Format (validated at construction):

``num_heads``  int
    Number of query heads. The mask is per *query* head; under grouped-query
    attention several query heads share one key head but may keep different blocks.
``q_offsets``  int64 ``[num_q_blocks + 1]`` (NumPy, read-only)
    Query block boundaries ``[0, ..., q_len]``, strictly increasing. Block ``i`` holds query tokens
    ``q_offsets[i] : q_offsets[i + 1]``. Uniform blocks with a short last block are the common case;
    any sizes are allowed (frame-sized, text-sized blocks).
``kv_offsets``  int64 ``[num_kv_blocks + 1]`` (NumPy, read-only)
    Key/value block boundaries, same rules, ending at ``kv_len``.
``indptr``  int32 ``[num_heads, num_q_blocks + 1]``
    CSR row pointers into the one shared ``indices`` array: the list of (head ``h``, query block ``i``)
    is ``indices[indptr[h, i] : indptr[h, i + 1]]``. Heads are stored in order, so
    ``indptr[h + 1, 0] == indptr[h, -1]``, ``indptr[0, 0] == 0`` and ``indptr[-1, -1] == len(indices)``.
``indices``  int32 ``[nnz]``
    Key block ids, each row sorted ascending and unique. An empty row is allowed:
    its query tokens attend to nothing, giving output 0 and LSE -inf.
``budgets``  float64 ``[num_heads]``
    The per-head budget the method asked for, as a fraction of key blocks per query block in [0, 1].
    Kernels ignore it; it records intent (head-adaptive methods). Defaults to the fraction kept.
``meta``  read-only JSON-able mapping
    Method name, layer, step, parameters; kernels ignore it. Entries of ``meta["per_head_keys"]`` follow heads.
``unselected``  :class:`~.unselected.Unselected`
    What rows get from the key blocks they do not list: nothing (``"drop"``, the default) or an
    approximation (PASA). Kernels that cannot compute it refuse the mask.

Where the lists live. Block boundaries are host NumPy arrays: they follow from the video geometry,
are small, and every lowering plans its launch shape from them. The lists (``indptr``, ``indices``,
``budgets``) are either NumPy arrays (host masks: files, tests, the reference lowering, hand-written
patterns) or torch tensors on one device (masks that methods build every layer and step, which stay
where the kernel runs). :meth:`BlockMask.to` and :meth:`BlockMask.to_host` convert explicitly; NumPy
arrays are read-only, torch tensors are owned by the mask and must not be written to.

Semantics: query tokens of block ``i`` of head ``h`` attend, with softmax, to exactly the key tokens
of the blocks listed for ``(h, i)`` (plus the approximation of the others when ``unselected`` says
so). ``sparsecore.backends.reference`` is the executable definition.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import csr
from . import validation as v
from .head_meta import select_meta_heads
from .host_facts import carry_padding
from .unselected import DROP, Unselected, check_unselected

TOKEN_MASK_LIMIT = 1 << 28  # elements of a bool[H, q_len, kv_len] token mask (256 MiB)


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Per-head block-sparse attention pattern in CSR form; see the module docstring."""

    num_heads: int
    q_offsets: np.ndarray
    kv_offsets: np.ndarray
    indptr: Any
    indices: Any
    budgets: Any = None
    meta: Mapping[str, Any] = field(default=None)  # type: ignore[assignment]
    unselected: Unselected = DROP

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: canonicalize fields once, here
        num_heads = v.check_int(self.num_heads, "num_heads", minimum=1)
        q_offsets = v.integer_array(self.q_offsets, "q_offsets", ndim=1, dtype=np.int64)
        kv_offsets = v.integer_array(self.kv_offsets, "kv_offsets", ndim=1, dtype=np.int64)
        v.check_extent(num_heads, q_offsets, kv_offsets)   # boundaries, and sizes whose pair counts fit int64
        num_q_blocks, num_kv_blocks = len(q_offsets) - 1, len(kv_offsets) - 1
        if csr.is_tensor(self.indptr) or csr.is_tensor(self.indices):
            indptr, indices, budgets = v.check_device_lists(self.indptr, self.indices, self.budgets, num_heads,
                                                            num_q_blocks, num_kv_blocks, int(kv_offsets[-1]))
        else:
            indptr = v.integer_array(self.indptr, "indptr", ndim=2, dtype=np.int32)
            indices = v.integer_array(self.indices, "indices", ndim=1, dtype=np.int32)
            v.check_csr(indptr, indices, num_heads, num_q_blocks, num_kv_blocks, int(kv_offsets[-1]))
            budgets = None if self.budgets is None else v.check_budgets(self.budgets, num_heads)
        check_unselected(self.unselected)
        for name, value in (("num_heads", num_heads), ("q_offsets", q_offsets), ("kv_offsets", kv_offsets),
                            ("indptr", indptr), ("indices", indices), ("meta", v.freeze_meta(self.meta, num_heads))):
            set_(self, name, value)
        set_(self, "budgets", self._kept_block_fraction() if budgets is None else budgets)

    @classmethod
    def unchecked(cls, num_heads: int, q_offsets: np.ndarray, kv_offsets: np.ndarray, indptr: Any, indices: Any,
                  budgets: Any, meta: Mapping[str, Any] | None = None, unselected: Unselected = DROP) -> "BlockMask":
        """A mask from lists that are valid by construction, without reading their values.

        For planners that build masks every layer and step on the device (AdaSpa, PASA): their lists come from
        ``csr`` builders over top-k selections, sorted and in range by construction, so the element checks (and
        their host round trip) would only repeat work. Offsets and ``meta`` are still checked (host, small); the
        lists, int32 (indptr, indices) and float64 (budgets) on one device, are taken as they are (NumPy's read-only).
        """
        mask = cls.__new__(cls)
        set_ = object.__setattr__
        offsets = [v.integer_array(o, name, ndim=1, dtype=np.int64) for o, name in
                   ((q_offsets, "q_offsets"), (kv_offsets, "kv_offsets"))]
        num_heads = v.check_int(num_heads, "num_heads", minimum=1)
        v.check_extent(num_heads, *offsets)
        check_unselected(unselected)
        indptr, indices, budgets = map(v.read_only, (indptr, indices, budgets))
        for name, value in (("num_heads", num_heads), ("q_offsets", offsets[0]), ("kv_offsets", offsets[1]),
                            ("indptr", indptr), ("indices", indices), ("budgets", budgets),
                            ("meta", v.freeze_meta(meta, num_heads)), ("unselected", unselected)):
            set_(mask, name, value)
        return mask

    # ------------------------------------------------------------------ where the lists live
    @property
    def device(self) -> Any:
        """The torch device holding the lists, or None for a host (NumPy) mask."""
        return self.indptr.device if csr.is_tensor(self.indptr) else None

    on_host = property(lambda self: self.device is None, doc="Whether the lists are NumPy arrays (a host mask).")

    def to(self, device: Any) -> "BlockMask":
        """This mask with its lists as torch tensors on ``device`` (memoized: a host mask uploads once)."""
        from .placement import uploaded
        return uploaded(self, device)

    def copy_to(self, device: Any) -> "BlockMask":
        """A copy of this device mask's lists on ``device`` that the caller owns (:func:`.placement.copied`)."""
        from .placement import copied
        return copied(self, device)

    def to_host(self) -> "BlockMask":
        """This mask with NumPy lists (one device-to-host copy for a device mask, memoized)."""
        from .placement import downloaded
        return downloaded(self)

    @cached_property
    def compiled_kernels(self) -> "weakref.WeakValueDictionary":
        """``sparsecore.compile``'s kernels of this device mask (by device, backend, options), cached by identity
        (hashing millions of indices every layer is what the IR on the device avoids) and held weakly: a kernel
        refers to its mask, and a cycle would wait for the garbage collector (steps' plans piled up on GPUs)."""
        return weakref.WeakValueDictionary()

    @cached_property
    def derived(self) -> dict:
        """Derived once, kept with this mask (copies on other devices, a ring's cut, a host mask's kept pairs); never
        refers back to it."""
        return {}

    # ------------------------------------------------------------------ shape
    q_len = property(lambda self: int(self.q_offsets[-1]), doc="Number of query tokens.")
    kv_len = property(lambda self: int(self.kv_offsets[-1]), doc="Number of key tokens.")
    num_q_blocks = property(lambda self: len(self.q_offsets) - 1, doc="Number of query blocks.")
    num_kv_blocks = property(lambda self: len(self.kv_offsets) - 1, doc="Number of key blocks.")
    nnz = property(lambda self: int(self.indices.shape[0]), doc="Number of listed (head, query block, key block).")
    q_block_sizes = property(lambda self: np.diff(self.q_offsets), doc="Query block sizes, int64 ``[MB]``.")
    kv_block_sizes = property(lambda self: np.diff(self.kv_offsets), doc="Key block sizes, int64 ``[NB]``.")

    @property
    def row_lengths(self) -> Any:
        """Number of key blocks per (head, query block), int64 ``[H, MB]`` (on the lists' side)."""
        counts = self.indptr[:, 1:] - self.indptr[:, :-1]
        return counts.long() if csr.is_tensor(counts) else counts.astype(np.int64)

    def uniform_block_size(self, which: str) -> int | None:
        """The block size if every block but a shorter last one has it, else None (``which``: ``"q"`` or ``"kv"``)."""
        return self._common_block_size(which, short_first=False)

    def interior_block_size(self, which: str) -> int | None:
        """The size of every block but a shorter first and last one, else None (one or two blocks: the larger).

        What a kernel's tiles should fit: a slice of a uniform mask over a token range (a ring shard,
        :mod:`.slicing`) cuts its first and last blocks short and keeps this size inside.
        """
        return self._common_block_size(which, short_first=True)

    def largest_block_size(self, which: str) -> int:
        """The largest block's token count (``which``: ``"q"`` or ``"kv"``): what a kernel's tiles must cover."""
        return int(self._block_sizes(which).max())

    def _block_sizes(self, which: str) -> np.ndarray:
        if which not in ("q", "kv"):
            raise ValueError(f"which: expected 'q' or 'kv', got {which!r}")
        return self.q_block_sizes if which == "q" else self.kv_block_sizes

    def _common_block_size(self, which: str, short_first: bool) -> int | None:
        sizes = self._block_sizes(which)
        if not short_first:
            size, inner = int(sizes[0]), sizes[:-1]
        else:
            size, inner = (int(sizes[1]), sizes[1:-1]) if len(sizes) > 2 else (int(sizes.max()), sizes[:0])
        return size if (inner == size).all() and sizes[0] <= size and sizes[-1] <= size else None

    # ------------------------------------------------------------ constructors
    @staticmethod
    def uniform_offsets(length: int, block: int) -> np.ndarray:
        """Boundaries ``[0, block, 2*block, ..., length]``; the last block may be short (see :mod:`.constructors`)."""
        from .constructors import uniform_offsets
        return uniform_offsets(length, block)

    @classmethod
    def from_dense(cls, mask: Any, q_len: int, kv_len: int, q_block: int, kv_block: int | None = None, *,
                   budgets: Any = None, meta: Mapping[str, Any] | None = None) -> "BlockMask":
        """Build from a boolean block map ``mask[H, MB, NB]`` over uniform blocks (:func:`.constructors.from_dense`)."""
        from .constructors import from_dense
        return from_dense(mask, q_len, kv_len, q_block, kv_block, budgets=budgets, meta=meta)

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[Iterable[int]]], q_offsets: Any, kv_offsets: Any, *,
                   budgets: Any = None, meta: Mapping[str, Any] | None = None) -> "BlockMask":
        """Build from ``lists[h][i]``, the key-block ids of head h, query block i (:func:`.constructors.from_lists`)."""
        from .constructors import from_lists
        return from_lists(lists, q_offsets, kv_offsets, budgets=budgets, meta=meta)

    @classmethod
    def full(cls, num_heads: int, q_len: int, kv_len: int, q_block: int, kv_block: int | None = None, *,
             meta: Mapping[str, Any] | None = None) -> "BlockMask":
        """The dense mask: every query block keeps every key block."""
        from .constructors import full
        return full(num_heads, q_len, kv_len, q_block, kv_block, meta=meta)

    # ------------------------------------------------------------------ views
    def row(self, h: int, i: int) -> Any:
        """Key-block ids of head ``h``, query block ``i`` (read-only)."""
        for name, value, count in (("h", h, self.num_heads), ("i", i, self.num_q_blocks)):
            if isinstance(value, bool) or not hasattr(value, "__index__"):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
            if not 0 <= value.__index__() < count:
                raise IndexError(f"{name}={value}: expected 0..{count - 1}")
        return self.indices[int(self.indptr[h, i]):int(self.indptr[h, i + 1])]

    def to_dense(self) -> Any:
        """Boolean block map ``[H, MB, NB]`` (on the lists' side)."""
        return csr.to_block_map(self.indptr, self.indices, self.num_kv_blocks)

    def token_mask(self, limit: int = TOKEN_MASK_LIMIT) -> np.ndarray:
        """Boolean token map ``[H, q_len, kv_len]`` (True = attend), on the host.

        Refuses when ``H * q_len * kv_len`` exceeds ``limit`` elements, since the
        point of the IR is to never build this for real sequence lengths.
        """
        limit = v.check_int(limit, "limit", minimum=0)
        size = self.num_heads * self.q_len * self.kv_len
        if size > limit:
            raise ValueError(f"token_mask: {self.num_heads}x{self.q_len}x{self.kv_len} = {size:,} elements exceeds "
                             f"the limit of {limit:,}; use to_dense() for the block map, select_heads() for fewer "
                             f"heads, or pass a larger limit")
        dense = self.to_host().to_dense()
        q_rep = np.repeat(np.arange(self.num_q_blocks), self.q_block_sizes)
        kv_rep = np.repeat(np.arange(self.num_kv_blocks), self.kv_block_sizes)
        return dense[:, q_rep][:, :, kv_rep]

    def kept_pairs(self) -> Any:
        """Token pairs kept per head, int64 ``[H]`` on the lists' side: O(rows) for uniform key blocks, else O(entries)
        (85 ms on the host at CogVideoX 1.5's 2x joint mask: a host count is kept, read-only; a device one is new)."""
        if "kept_pairs" in self.derived:
            return self.derived["kept_pairs"]
        per_row = csr.kept_key_tokens(self.indptr, self.indices, self.kv_offsets)
        sizes = self.q_block_sizes
        if csr.is_tensor(per_row):
            from .uploads import queued
            return (per_row * queued(sizes, per_row.device)[None, :]).sum(dim=1)
        self.derived["kept_pairs"] = v.frozen((per_row * sizes[None, :]).sum(axis=1))
        return self.derived["kept_pairs"]

    def density(self, per_head: bool = False) -> float | np.ndarray:
        """Fraction of (query, key) token pairs kept: overall, or float64 ``[H]`` (a host read for a device mask)."""
        kept = self.kept_pairs()
        kept = kept.cpu().numpy() if csr.is_tensor(kept) else kept
        if per_head:
            return kept / (self.q_len * self.kv_len)
        return float(kept.sum() / (self.num_heads * self.q_len * self.kv_len))

    def _kept_block_fraction(self) -> Any:
        """Mean fraction of key blocks kept per query block, per head (the default budget)."""
        lengths, cells = self.row_lengths, self.num_q_blocks * self.num_kv_blocks   # true divisions on both sides
        return v.frozen(lengths.sum(axis=1) / cells) if self.on_host else \
            lengths.sum(dim=1).double() / lengths.new_full((1,), cells).double()     # by a tensor, not a reciprocal

    def flops(self, head_dim: int) -> int:
        """Useful FLOPs of one batch element: 4 * kept pairs * head_dim (QK^T and PV)."""
        head_dim = v.check_int(head_dim, "head_dim", minimum=1)
        return int(4 * int(self.kept_pairs().sum()) * head_dim)

    def dense_flops(self, head_dim: int) -> int:
        """FLOPs of dense attention over the same shape: 4 * H * q_len * kv_len * head_dim."""
        return 4 * self.num_heads * self.q_len * self.kv_len * v.check_int(head_dim, "head_dim", minimum=1)

    def select_heads(self, heads: Any) -> "BlockMask":
        """A mask of the given query heads (ints, a slice or a bool array), in that order."""
        if isinstance(heads, slice) and heads.step == 0:
            raise ValueError("heads: a slice step cannot be 0; pass e.g. slice(0, 4) or slice(0, 4, 2)")
        idx = np.arange(self.num_heads)[heads] if isinstance(heads, slice) else v.as_numpy(heads, "heads")
        if idx.dtype == np.bool_:
            if idx.shape != (self.num_heads,):
                raise ValueError(f"heads: a bool selector needs shape [{self.num_heads}], got {list(idx.shape)}")
            idx = np.nonzero(idx)[0]
        idx = np.atleast_1d(idx)
        if idx.size == 0:                                   # before the dtype: [] reads as float64
            raise ValueError(f"heads: expected a non-empty selection of 0..{self.num_heads - 1}, got []")
        if idx.ndim != 1:
            raise ValueError(f"heads: expected a flat list of head ids, got shape {list(idx.shape)}")
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"heads: expected ints, a slice or a bool array, got dtype {idx.dtype}")
        if ((idx < 0) | (idx >= self.num_heads)).any():
            raise ValueError(f"heads: expected a non-empty selection of 0..{self.num_heads - 1}, got {idx.tolist()}")
        idx = idx.astype(np.int64)  # a fresh copy: torch reads uint8 ids as a mask, refuses int8, uint16.. and -strides
        meta = select_meta_heads(self.meta, idx.tolist(), self.num_heads)    # per-head entries follow the heads
        if not self.on_host:
            import torch
            idx = torch.as_tensor(idx, device=self.device)
        indptr, indices = csr.select_heads(self.indptr, self.indices, idx)
        if self.on_host:
            indptr, indices, budgets = (v.frozen(a) for a in (indptr.astype(np.int32), indices.astype(np.int32),
                                                              self.budgets[idx]))
        else:
            indptr, indices, budgets = indptr.int(), indices.contiguous(), self.budgets[idx]
        selected = BlockMask.unchecked(len(idx), self.q_offsets, self.kv_offsets, indptr, indices, budgets, meta,
                                       self.unselected)
        return carry_padding(selected, self)                # the same blocks: its padding, if any, too

    def with_padding(self, length: int, meta: Mapping[str, Any] | None = None) -> "BlockMask":
        """This mask extended to ``length`` tokens by padding blocks no row lists, with empty rows (output 0), no
        larger than its largest blocks (:func:`.padding.with_padding`)."""
        from .padding import with_padding
        return with_padding(self, length, meta)

    # --------------------------------------------------------------- identity
    @cached_property
    def _fingerprint(self) -> str:
        host = self.to_host()
        digest = hashlib.sha256()
        digest.update(b"sparsecore.BlockMask/1")
        digest.update(np.array(self.num_heads, "<i8").tobytes())
        for arr in (host.q_offsets, host.kv_offsets, host.indptr, host.indices):  # little-endian: same on any host
            digest.update(np.array(arr.size, "<i8").tobytes())
            digest.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        if self.unselected != DROP:
            digest.update(str(self.unselected).encode())
        return digest.hexdigest()

    def fingerprint(self) -> str:
        """Stable SHA-256 hex digest of the structure (heads, offsets, lists, ``unselected``).

        Budgets and meta do not enter it: they do not change what a kernel computes, so masks that differ only
        there share one compiled kernel's plans (each kernel reports its own mask). A device mask is copied to the
        host to be hashed (O(nnz)): the compile cache keys device masks by identity instead, so hot paths never call
        this.
        """
        return self._fingerprint

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __reduce__(self) -> tuple:   # copy.deepcopy, pickle: rebuilt through the checks, without the caches
        return BlockMask, (self.num_heads, self.q_offsets, self.kv_offsets, self.indptr, self.indices, self.budgets,
                           v.thawed_meta(self.meta), self.unselected)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockMask):
            return NotImplemented
        return (self._fingerprint == other._fingerprint
                and np.array_equal(self.to_host().budgets, other.to_host().budgets)
                and v.meta_to_json(self.meta) == v.meta_to_json(other.meta))

    def __repr__(self) -> str:
        method = f", method={self.meta['method']!r}" if "method" in self.meta else ""
        where = "" if self.on_host else f", device={str(self.device)!r}"
        unselected = "" if self.unselected == DROP else f", unselected={str(self.unselected)!r}"
        return (f"BlockMask(heads={self.num_heads}, q_len={self.q_len}, kv_len={self.kv_len}, "
                f"blocks={self.num_q_blocks}x{self.num_kv_blocks}, nnz={self.nnz}, "
                f"density={self.density():.4f}{method}{unselected}{where})")

    # --------------------------------------------------- pictures and files
    def to_string(self, max_blocks: int = 64) -> str:
        """Text picture of each head's block map (``#`` kept, ``.`` skipped)."""
        from .draw import block_map_text
        return block_map_text(self.to_host(), max_blocks)

    def render(self, path: str | Path, heads: Sequence[int] | None = None) -> Path:
        """Write a PNG of the per-head block maps (needs matplotlib; pixels shaded by share kept); returns it."""
        from .draw import render_png
        return render_png(self.to_host(), path, heads)

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (no pickle; a device mask is copied to the host); returns the path."""
        from .serialization import save
        return save(self.to_host(), path)

    @classmethod
    def load(cls, path: str | Path) -> "BlockMask":
        """Read a mask written by :meth:`save` (a host mask); any bad file raises ``ValueError``."""
        from .serialization import load
        return load(path)
