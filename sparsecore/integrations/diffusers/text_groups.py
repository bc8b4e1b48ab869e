"""A batch's samples grouped by their valid text length, each group attended apart.

Models with a text padding mask (HunyuanVideo 1.0 and 1.5, Mochi) may pass samples whose prompts fill different
numbers of text slots in one batch; each length is its own geometry with its own masks. Mochi's pipeline, for one,
runs classifier-free guidance as one batch of two (``MochiPipeline``: the negative prompt's sample first, its
empty prompt zeroed when ``force_zeros_for_empty_prompt`` is set). A group whose samples are consecutive rows (each
half of such a batch) is taken as a view of the batch, not gathered. On Mochi's guidance batch at 163 frames that
took AdaSpa's reuse step on fa4 from 0.582-0.593 s to 0.549-0.552 s for 6 of its 48 layers (H200, 2026-12-04, one
call), about twice batch 1's 0.272-0.275 s: the gathers and the host wait of each index sent to the GPU had cost it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GroupAttention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def text_groups(counts: list[int], per_sample: bool) -> dict[tuple[int, int], list[int]]:
    """The batch rows of each group, in order of first appearance: keyed by (valid text tokens, the group's first
    row where masks are per sample (each sample a group of its own), else 0)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for row, count in enumerate(counts):
        groups.setdefault((int(count), row if per_sample else 0), []).append(row)
    return groups


def batch_rows(rows: list[int], device: torch.device) -> slice | torch.Tensor:
    """``rows`` as an index of the batch dimension: a slice (a view) where they are consecutive, else an int64
    tensor on ``device`` (on CUDA sent from pinned memory, without a host wait)."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    index = torch.tensor(rows, dtype=torch.long, device="cpu")     # host, whatever the default device
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


def attend_in_groups(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     groups: dict[tuple[int, int], list[int]], attend: GroupAttention) -> torch.Tensor:
    """``[B, S, h, D]`` in and out: ``attend(valid_text, q, k, v)`` of each group's rows of ``query``, ``key`` and
    ``value`` (the whole batch where there is one group), written to the rows it came from. The output is in the
    query's dtype, as the op declares it, with head-major memory (``[B, h, S, D]``), as the kernels write theirs and
    the op returns it (:func:`.op.head_major`)."""
    if len(groups) == 1:
        return attend(next(iter(groups))[0], query, key, value).to(query.dtype)
    batch, seq_len, heads, _ = query.shape
    out = query.new_empty(batch, heads, seq_len, value.shape[3]).transpose(1, 2)   # the groups cover every row
    for (count, _), rows in groups.items():
        take = batch_rows(rows, query.device)
        found = attend(count, query[take], key[take], value[take])
        if found.shape[0] != len(rows):
            raise RuntimeError(f"sparsecore: the attention of {len(rows)} samples with {count} valid text tokens "
                               f"returned {found.shape[0]}; this is a bug, please report it")
        out[take] = found.to(out.dtype)                  # indexed assignment takes no other dtype
    return out
