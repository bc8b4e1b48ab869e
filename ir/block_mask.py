"""The block-mask IR: which key blocks each query block of each head attends to.

Format (all arrays are numpy, read-only, validated at construction):

``num_heads``  int
    Number of query heads. The mask is per *query* head; under grouped-query
    attention several query heads share one key head but may keep different blocks.
``q_offsets``  int64 ``[num_q_blocks + 1]``
    Query block boundaries ``[0, ..., q_len]``, strictly increasing. Block ``i``
    holds query tokens ``q_offsets[i] : q_offsets[i + 1]``. Uniform blocks with a
    short last block are the common case; any sizes are allowed (frame-sized,
    text-sized blocks).
``kv_offsets``  int64 ``[num_kv_blocks + 1]``
    Key/value block boundaries, same rules, ending at ``kv_len``.
``indptr``  int32 ``[num_heads, num_q_blocks + 1]``
    CSR row pointers into the one shared ``indices`` array: the list of (head ``h``,
    query block ``i``) is ``indices[indptr[h, i] : indptr[h, i + 1]]``. Heads are
    stored in order, so ``indptr[h + 1, 0] == indptr[h, -1]``, ``indptr[0, 0] == 0``
    and ``indptr[-1, -1] == len(indices)``.
``indices``  int32 ``[nnz]``
    Key block ids, each row sorted ascending and unique. An empty row is allowed:
    its query tokens attend to nothing, giving output 0 and LSE -inf.
``budgets``  float64 ``[num_heads]``
    The per-head budget the method asked for, as a fraction of key blocks per query
    block in [0, 1]. Kernels ignore it; it records intent (head-adaptive methods).
    Defaults to the fraction each head actually keeps.
``meta``  read-only JSON-able mapping
    Method name, layer, step, parameters. Kernels ignore it.

Semantics: query tokens of block ``i`` of head ``h`` attend, with softmax, to exactly
the key tokens of the blocks listed for ``(h, i)``. ``sparsecore.backends.reference``
is the executable definition.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import validation as v

TOKEN_MASK_LIMIT = 1 << 28  # elements of a bool[H, q_len, kv_len] token mask (256 MiB)


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Per-head block-sparse attention pattern in CSR form; see the module docstring."""

    num_heads: int
    q_offsets: np.ndarray
    kv_offsets: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    budgets: np.ndarray | None = None
    meta: Mapping[str, Any] = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: canonicalize fields once, here
        num_heads = v.check_int(self.num_heads, "num_heads", minimum=1)
        q_offsets = v.integer_array(self.q_offsets, "q_offsets", ndim=1, dtype=np.int64)
        kv_offsets = v.integer_array(self.kv_offsets, "kv_offsets", ndim=1, dtype=np.int64)
        indptr = v.integer_array(self.indptr, "indptr", ndim=2, dtype=np.int32)
        indices = v.integer_array(self.indices, "indices", ndim=1, dtype=np.int32)
        v.check_offsets(q_offsets, "q_offsets")
        v.check_offsets(kv_offsets, "kv_offsets")
        v.check_csr(indptr, indices, num_heads, len(q_offsets) - 1, len(kv_offsets) - 1, int(kv_offsets[-1]))
        set_(self, "num_heads", num_heads)
        set_(self, "q_offsets", q_offsets)
        set_(self, "kv_offsets", kv_offsets)
        set_(self, "indptr", indptr)
        set_(self, "indices", indices)
        if self.budgets is None:
            set_(self, "budgets", v.frozen(self._kept_block_fraction()))
        else:
            set_(self, "budgets", v.check_budgets(self.budgets, num_heads))
        set_(self, "meta", v.freeze_meta(self.meta))

    # ------------------------------------------------------------------ shape
    @property
    def q_len(self) -> int:
        return int(self.q_offsets[-1])

    @property
    def kv_len(self) -> int:
        return int(self.kv_offsets[-1])

    @property
    def num_q_blocks(self) -> int:
        return len(self.q_offsets) - 1

    @property
    def num_kv_blocks(self) -> int:
        return len(self.kv_offsets) - 1

    @property
    def nnz(self) -> int:
        return len(self.indices)

    @property
    def q_block_sizes(self) -> np.ndarray:
        return np.diff(self.q_offsets)

    @property
    def kv_block_sizes(self) -> np.ndarray:
        return np.diff(self.kv_offsets)

    @property
    def row_lengths(self) -> np.ndarray:
        """Number of key blocks per (head, query block), int64 ``[H, MB]``."""
        return np.diff(self.indptr.astype(np.int64), axis=1)

    def uniform_block_size(self, which: str) -> int | None:
        """The block size if every block but a shorter last one has it, else None.

        ``which`` is ``"q"`` or ``"kv"``.
        """
        sizes = {"q": self.q_block_sizes, "kv": self.kv_block_sizes}[which]
        size = int(sizes[0])
        if (sizes[:-1] == size).all() and sizes[-1] <= size:
            return size
        return None

    # ------------------------------------------------------------ constructors
    @staticmethod
    def uniform_offsets(length: int, block: int) -> np.ndarray:
        """Boundaries ``[0, block, 2*block, ..., length]``; the last block may be short."""
        length = v.check_int(length, "length", minimum=1)
        block = v.check_int(block, "block", minimum=1)
        return np.append(np.arange(0, length, block, dtype=np.int64), np.int64(length))

    @classmethod
    def from_dense(cls, mask: Any, q_len: int, kv_len: int, q_block: int, kv_block: int | None = None, *,
                   budgets: Any = None, meta: Mapping[str, Any] | None = None) -> "BlockMask":
        """Build from a boolean block map ``mask[H, MB, NB]`` over uniform blocks.

        ``kv_block`` defaults to ``q_block``; ``MB = ceil(q_len / q_block)`` and
        ``NB = ceil(kv_len / kv_block)`` must match the map's shape.
        """
        dense = v.as_numpy(mask, "mask")
        if dense.dtype != np.bool_:
            raise TypeError(f"mask: expected a bool array [H, MB, NB], got dtype {dense.dtype} "
                            f"(use mask.astype(bool) if 1 means keep)")
        if dense.ndim != 3:
            raise ValueError(f"mask: expected 3 dimensions [H, MB, NB], got shape {list(dense.shape)}")
        q_offsets = cls.uniform_offsets(q_len, q_block)
        kv_offsets = cls.uniform_offsets(kv_len, q_block if kv_block is None else kv_block)
        expected = (len(q_offsets) - 1, len(kv_offsets) - 1)
        if dense.shape[1:] != expected:
            raise ValueError(f"mask: expected shape [H, {expected[0]}, {expected[1]}] for q_len={q_len}, "
                             f"kv_len={kv_len} and these block sizes, got {list(dense.shape)}")
        counts = dense.sum(axis=2, dtype=np.int64).ravel()
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        indptr = _per_head_indptr(indptr, dense.shape[0], dense.shape[1])
        indices = np.nonzero(dense.reshape(-1, dense.shape[2]))[1]
        return cls(dense.shape[0], q_offsets, kv_offsets, indptr, indices, budgets, meta)

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[Iterable[int]]], q_offsets: Any, kv_offsets: Any, *,
                   budgets: Any = None, meta: Mapping[str, Any] | None = None) -> "BlockMask":
        """Build from ``lists[h][i]``: an iterable of key-block ids for head h, query block i.

        Rows are sorted here (their order carries no meaning); a repeated id raises.
        """
        q_offsets = v.as_numpy(q_offsets, "q_offsets")
        num_q_blocks = len(q_offsets) - 1
        rows: list[np.ndarray] = []
        for h, head in enumerate(lists):
            head = list(head)
            if len(head) != num_q_blocks:
                raise ValueError(f"lists[{h}]: expected one list per query block ({num_q_blocks}), got {len(head)}")
            for i, row in enumerate(head):
                ids = np.sort(v.as_numpy(list(row), f"lists[{h}][{i}]").astype(np.int64).ravel())
                if ids.size > 1 and (np.diff(ids) == 0).any():
                    raise ValueError(f"lists[{h}][{i}]: key block {ids[np.argmax(np.diff(ids) == 0)]} "
                                     f"is listed twice; each block may appear once per row")
                rows.append(ids)
        num_heads = len(rows) // num_q_blocks if num_q_blocks else 0
        counts = np.array([len(r) for r in rows], dtype=np.int64)
        indptr = _per_head_indptr(np.concatenate([[0], np.cumsum(counts)]), num_heads, num_q_blocks)
        indices = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return cls(num_heads, q_offsets, kv_offsets, indptr, indices, budgets, meta)

    @classmethod
    def full(cls, num_heads: int, q_len: int, kv_len: int, q_block: int, kv_block: int | None = None, *,
             meta: Mapping[str, Any] | None = None) -> "BlockMask":
        """The dense mask: every query block keeps every key block."""
        q_offsets = cls.uniform_offsets(q_len, q_block)
        kv_offsets = cls.uniform_offsets(kv_len, q_block if kv_block is None else kv_block)
        mb, nb = len(q_offsets) - 1, len(kv_offsets) - 1
        dense = np.ones((v.check_int(num_heads, "num_heads", minimum=1), mb, nb), dtype=bool)
        return cls.from_dense(dense, q_len, kv_len, q_block, kv_block, meta=meta)

    # ------------------------------------------------------------------ views
    def row(self, h: int, i: int) -> np.ndarray:
        """Key-block ids of head ``h``, query block ``i`` (read-only)."""
        if not 0 <= h < self.num_heads:
            raise IndexError(f"h={h}: expected 0..{self.num_heads - 1}")
        if not 0 <= i < self.num_q_blocks:
            raise IndexError(f"i={i}: expected 0..{self.num_q_blocks - 1}")
        return self.indices[self.indptr[h, i]:self.indptr[h, i + 1]]

    def to_dense(self) -> np.ndarray:
        """Boolean block map ``[H, MB, NB]``."""
        dense = np.zeros((self.num_heads, self.num_q_blocks, self.num_kv_blocks), dtype=bool)
        rows = np.repeat(np.arange(self.num_heads * self.num_q_blocks), self.row_lengths.ravel())
        dense.reshape(-1, self.num_kv_blocks)[rows, self.indices] = True
        return dense

    def token_mask(self, limit: int = TOKEN_MASK_LIMIT) -> np.ndarray:
        """Boolean token map ``[H, q_len, kv_len]`` (True = attend).

        Refuses when ``H * q_len * kv_len`` exceeds ``limit`` elements, since the
        point of the IR is to never build this for real sequence lengths.
        """
        size = self.num_heads * self.q_len * self.kv_len
        if size > limit:
            raise ValueError(f"token_mask: {self.num_heads}x{self.q_len}x{self.kv_len} = {size:,} elements exceeds "
                             f"the limit of {limit:,}; use to_dense() for the block map, select_heads() for fewer "
                             f"heads, or pass a larger limit")
        dense = self.to_dense()
        q_rep = np.repeat(np.arange(self.num_q_blocks), self.q_block_sizes)
        kv_rep = np.repeat(np.arange(self.num_kv_blocks), self.kv_block_sizes)
        return dense[:, q_rep][:, :, kv_rep]

    def _kept_pairs(self) -> np.ndarray:
        """Token pairs kept per head, int64 ``[H]``."""
        kv_tokens = np.concatenate([[0], np.cumsum(self.kv_block_sizes[self.indices])])
        per_row = kv_tokens[self.indptr[:, 1:]] - kv_tokens[self.indptr[:, :-1]]  # key tokens per row
        return (per_row * self.q_block_sizes[None, :]).sum(axis=1)

    def density(self, per_head: bool = False) -> float | np.ndarray:
        """Fraction of (query, key) token pairs kept: overall, or float64 ``[H]``."""
        kept = self._kept_pairs()
        if per_head:
            return kept / (self.q_len * self.kv_len)
        return float(kept.sum() / (self.num_heads * self.q_len * self.kv_len))

    def _kept_block_fraction(self) -> np.ndarray:
        """Mean fraction of key blocks kept per query block, per head (the default budget)."""
        return self.row_lengths.mean(axis=1) / self.num_kv_blocks

    def flops(self, head_dim: int) -> int:
        """Useful FLOPs of one batch element: 4 * kept pairs * head_dim (QK^T and PV)."""
        head_dim = v.check_int(head_dim, "head_dim", minimum=1)
        return int(4 * self._kept_pairs().sum() * head_dim)

    def dense_flops(self, head_dim: int) -> int:
        """FLOPs of dense attention over the same shape: 4 * H * q_len * kv_len * head_dim."""
        head_dim = v.check_int(head_dim, "head_dim", minimum=1)
        return 4 * self.num_heads * self.q_len * self.kv_len * head_dim

    def select_heads(self, heads: Any) -> "BlockMask":
        """A mask of the given query heads (ints, a slice or a bool array), in that order."""
        idx = np.arange(self.num_heads)[heads] if isinstance(heads, slice) else v.as_numpy(heads, "heads")
        if idx.dtype == np.bool_:
            if idx.shape != (self.num_heads,):
                raise ValueError(f"heads: a bool selector needs shape [{self.num_heads}], got {list(idx.shape)}")
            idx = np.nonzero(idx)[0]
        idx = np.atleast_1d(idx)
        if not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"heads: expected ints, a slice or a bool array, got dtype {idx.dtype}")
        if idx.size == 0 or ((idx < 0) | (idx >= self.num_heads)).any():
            raise ValueError(f"heads: expected a non-empty selection of 0..{self.num_heads - 1}, got {idx.tolist()}")
        rows = [[self.row(int(h), i) for i in range(self.num_q_blocks)] for h in idx]
        return BlockMask.from_lists(rows, self.q_offsets, self.kv_offsets, budgets=self.budgets[idx], meta=self.meta)

    # --------------------------------------------------------------- identity
    @cached_property
    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(b"sparsecore.BlockMask/1")
        digest.update(np.array(self.num_heads, "<i8").tobytes())
        for arr in (self.q_offsets, self.kv_offsets, self.indptr, self.indices):  # little-endian: same on any host
            digest.update(np.array(arr.size, "<i8").tobytes())
            digest.update(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        return digest.hexdigest()

    def fingerprint(self) -> str:
        """Stable SHA-256 hex digest of the structure (heads, offsets, lists).

        Budgets and meta do not enter it: they do not change what a kernel computes,
        so masks that differ only there share one compiled kernel.
        """
        return self._fingerprint

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockMask):
            return NotImplemented
        return (self._fingerprint == other._fingerprint and np.array_equal(self.budgets, other.budgets)
                and v.meta_to_json(self.meta) == v.meta_to_json(other.meta))

    def __repr__(self) -> str:
        method = f", method={self.meta['method']!r}" if "method" in self.meta else ""
        return (f"BlockMask(heads={self.num_heads}, q_len={self.q_len}, kv_len={self.kv_len}, "
                f"blocks={self.num_q_blocks}x{self.num_kv_blocks}, nnz={self.nnz}, "
                f"density={self.density():.4f}{method})")

    # --------------------------------------------------- pictures and files
    def to_string(self, max_blocks: int = 64) -> str:
        """Text picture of each head's block map (``#`` kept, ``.`` skipped)."""
        from .draw import block_map_text
        return block_map_text(self, max_blocks)

    def render(self, path: str | Path, heads: Sequence[int] | None = None) -> Path:
        """Write a PNG of the per-head block maps (needs matplotlib); returns the path."""
        from .draw import render_png
        return render_png(self, Path(path), heads)

    def save(self, path: str | Path) -> Path:
        """Write the mask as a safetensors file (no pickle); returns the path."""
        from .serialization import save
        return save(self, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> "BlockMask":
        """Read a mask written by :meth:`save`; any bad file raises ``ValueError``."""
        from .serialization import load
        return load(Path(path))


def _per_head_indptr(flat: np.ndarray, num_heads: int, num_q_blocks: int) -> np.ndarray:
    """Turn a flat row-pointer array over ``H * MB`` rows into the ``[H, MB + 1]`` form."""
    flat = np.asarray(flat, dtype=np.int64)
    rows = np.arange(num_heads)[:, None] * num_q_blocks + np.arange(num_q_blocks + 1)[None, :]
    return flat[rows]
