"""What a lowering can take, as data.

The registry picks backends from these fields, named backends raise from them, and
the test suite derives its skips from them; no code anywhere asks "which backend is
this?". Each check returns the list of unmet capabilities as sentences (empty when
the backend can take the input), so callers can join them into one error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sparsecore.ir import BlockMask


@dataclass(frozen=True)
class Capabilities:
    """Static description of one lowering.

    Attributes:
        devices: device types the backend compiles for (``"cpu"``, ``"cuda"``, ...).
        array_type: ``"numpy"`` or ``"torch"``: what q, k, v must be.
        dtypes: element types accepted, by name (``"float32"``, ``"bfloat16"``, ...).
        head_dims: accepted head dims, or None for any.
        gqa: whether key heads may be fewer than query heads.
        lse: whether the kernel can return the log-sum-exp.
        uniform_q_blocks / uniform_kv_blocks: blocks must all have one size, except
            a shorter last block.
        kv_len_divisible: the key length must be a multiple of the key block size
            (no short last key block).
        min_q_block: smallest query block (in tokens) the backend computes correctly (with
            ``uniform_q_blocks``: the blocks' size; a shorter last one is padded to it).
        unselected: the treatments of unlisted key blocks it computes (``mask.unselected.kind``).
        unselected_head_dims: head dims at which it computes the approximating treatments (those other
            than ``"drop"``), or None for every head dim it takes.
        unselected_shared_memory: ``(kind, dtype, head dim, bytes)``: the shared memory a block (per GPU) it needs at
            least to approximate unlisted blocks of that kind at that dtype and head dim, where some device it runs on
            may allow less (``Backend.shared_memory``); unlisted combinations fit every such device.
        max_heads: most query heads one mask may have (None: any).
        max_rows: most (head, query block) rows one mask may have per batch element (None: any).
        max_call_rows: most (batch element, head, query block) rows one call may have (None: any).
        infinite_values_exact: a row that attends to a value of +-inf gets that infinity in its element, as dense
            attention (False: such a row may get NaN there, and in other elements, as the backend's docs say: still
            non-finite, and only in the rows that attend to it).
    """

    devices: tuple[str, ...]
    array_type: str
    dtypes: frozenset[str]
    head_dims: frozenset[int] | None = None
    gqa: bool = True
    lse: bool = True
    uniform_q_blocks: bool = False
    uniform_kv_blocks: bool = False
    kv_len_divisible: bool = False
    min_q_block: int = 1
    unselected: frozenset[str] = frozenset({"drop"})
    unselected_head_dims: frozenset[int] | None = None
    unselected_shared_memory: frozenset[tuple[str, str, int, int]] = frozenset()
    max_heads: int | None = None
    max_rows: int | None = None
    max_call_rows: int | None = None
    infinite_values_exact: bool = True

    def mask_problems(self, mask: "BlockMask") -> list[str]:
        """Unmet capabilities for ``mask`` (empty list: the backend can take it)."""
        problems = []
        if self.uniform_q_blocks and mask.uniform_block_size("q") is None:
            problems.append(f"uniform_q_blocks: needs query blocks of one size (a shorter last one is fine), "
                            f"got sizes {_sizes(mask.q_block_sizes)}")
        smallest = (mask.uniform_block_size("q") if self.uniform_q_blocks else None) or mask.q_block_sizes.min()
        if smallest < self.min_q_block:      # with uniform blocks a short last one is padded to the others' size
            problems.append(f"min_q_block: needs query blocks of at least {self.min_q_block} tokens, got one of "
                            f"{int(smallest)}")
        kv_block = mask.uniform_block_size("kv")
        if self.uniform_kv_blocks and kv_block is None:
            problems.append(f"uniform_kv_blocks: needs key blocks of one size (a shorter last one is fine), "
                            f"got sizes {_sizes(mask.kv_block_sizes)}")
        if self.kv_len_divisible and kv_block is not None and mask.kv_len % kv_block:
            problems.append(f"kv_len_divisible: needs kv_len to be a multiple of the key block size, got "
                            f"kv_len={mask.kv_len} with blocks of {kv_block} (last block {mask.kv_len % kv_block})")
        if self.max_heads is not None and mask.num_heads > self.max_heads:
            problems.append(f"max_heads: takes at most {self.max_heads} query heads, got a mask with "
                            f"{mask.num_heads}; split the heads (mask.select_heads) and compile each part")
        rows = mask.num_heads * mask.num_q_blocks
        if self.max_rows is not None and rows > self.max_rows:
            problems.append(f"max_rows: takes at most {self.max_rows:,} (head, query block) rows, got "
                            f"{mask.num_heads} x {mask.num_q_blocks} = {rows:,}; use larger query blocks or "
                            f"another backend")
        if mask.unselected.kind not in self.unselected:
            problems.append(f"unselected: computes {sorted(self.unselected)} for unlisted key blocks, got a mask "
                            f"asking for {str(mask.unselected)!r}")
        return problems

    def tensor_problems(self, dtype: str, head_dim: int, num_heads: int, num_kv_heads: int,
                        return_lse: bool, approximating: bool = False, call_rows: int = 0, unselected: str = "drop",
                        shared_memory: int | None = None) -> list[str]:
        """Unmet capabilities for tensors of this dtype and shape (``approximating``: the mask approximates
        unlisted blocks; ``call_rows``: batch x heads x the mask's query blocks; ``unselected``: the mask's kind;
        ``shared_memory``: the bytes a block may use on the tensors' device, None where not known or not limited)."""
        problems = []
        if self.max_call_rows is not None and call_rows > self.max_call_rows:
            problems.append(f"max_call_rows: takes at most {self.max_call_rows:,} (batch element, head, query "
                            f"block) rows a call, got {call_rows:,}; split the batch")
        if dtype not in self.dtypes:
            problems.append(f"dtypes: supports {sorted(self.dtypes)}, got {dtype}")
        if self.head_dims is not None and head_dim not in self.head_dims:
            problems.append(f"head_dims: supports {sorted(self.head_dims)}, got {head_dim}")
        elif approximating and self.unselected_head_dims is not None and head_dim not in self.unselected_head_dims:
            problems.append(f"unselected_head_dims: approximates unlisted blocks at head dims "
                            f"{sorted(self.unselected_head_dims)}, got {head_dim}")
        needed = [n for kind, name, dim, n in self.unselected_shared_memory
                  if (kind, name, dim) == (unselected, dtype, head_dim)]
        if shared_memory is not None and needed and max(needed) > shared_memory:
            problems.append(f"unselected_shared_memory: approximating unlisted blocks ({unselected!r}) in {dtype} at "
                            f"head dim {head_dim} needs {max(needed):,} bytes of shared memory a block, the device "
                            f"allows {shared_memory:,}; cast q, k, v to bfloat16, or run another backend (backend=None "
                            f"falls back to one that takes them), or a device with more shared memory")
        if not self.gqa and num_kv_heads != num_heads:
            problems.append(f"gqa: needs as many key heads as query heads, got {num_heads} query and "
                            f"{num_kv_heads} key heads")
        if return_lse and not self.lse:
            problems.append("lse: cannot return the log-sum-exp; call with return_lse=False")
        return problems


def _sizes(sizes: Any) -> str:
    distinct = sorted({int(s) for s in sizes})
    return str(distinct[:8])[:-1] + (", ...]" if len(distinct) > 8 else "]")
