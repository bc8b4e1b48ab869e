"""Host side of the Triton lowering: pick the tile config and the pipeline depth that fits the GPU, schedule the tiles
once per config, launch."""

from __future__ import annotations

from dataclasses import replace

import torch

from sparsecore.ir import BlockMask

from . import interpreter, shared_memory
from .tiling import TileSchedule, schedule_tiles
from .triton_config import TritonConfig, TritonOptions, default_config, dot_precision
from .triton_kernel import LOG2E, block_sparse_attention_fwd

# (config, dtype, the launch's constants, the device's shared memory) -> the stages that fit
# (:func:`.shared_memory.fitting_stages`): decided once for all masks, so a mask compiled at every call (AdaSpa's held
# ones) pays a dict lookup
_STAGES: dict[tuple, int] = {}


class TritonLaunch:
    """The run function of one compiled mask: ``(q, k, v, scale, return_lse) -> (out, lse)``."""

    def __init__(self, mask: BlockMask, options: TritonOptions) -> None:
        self.mask = mask
        self.options = options
        self._schedules: dict[tuple, TileSchedule] = {}
        self.last_compiled = None  # Triton's compiled kernel of the last launch: n_regs, n_spills, metadata.shared
        self.approximation = None  # masks that approximate unlisted blocks: a second pass merges it in place
        if mask.unselected.kind != "drop":
            from .approximation_launch import ApproximationLaunch
            self.approximation = ApproximationLaunch(mask)

    def config(self, q: torch.Tensor) -> TritonConfig:
        config = default_config(q.shape[-1], q.element_size(), q.device, self.mask.largest_block_size("q"),
                                self.mask.largest_block_size("kv"))
        overrides = {k: v for k, v in vars(self.options).items() if v is not None}
        return replace(config, **overrides)

    def schedule(self, config: TritonConfig) -> TileSchedule:
        """The tile schedule for this config (built on the mask's device on first use, then cached)."""
        key = (config.block_m, config.block_n)
        if key not in self._schedules:
            self._schedules[key] = schedule_tiles(self.mask, config.block_m, config.block_n)
        return self._schedules[key]

    def prepare(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> None:
        """Build the tile schedule (and the approximation's plan) a call with ``q`` would use (at any scale)."""
        self.schedule(self.config(q))
        if self.approximation is not None:
            self.approximation.plan(q.device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = (t.contiguous() for t in (q, k, v))
        batch, num_heads, q_len, _ = q.shape
        config = self.config(q)
        tiles = self.schedule(config)
        out = torch.empty_like(q)
        want_lse = return_lse or self.approximation is not None
        lse = torch.empty((batch, num_heads, q_len), dtype=torch.float32, device=q.device) if want_lse else out
        self._exact(q, k, v, out, lse, scale, want_lse, config, tiles)   # one program per (head, query tile) at least
        if self.approximation is not None:
            self.approximation(q, k, v, out, lse, scale)
        return out, (lse if return_lse else None)

    def _exact(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
               scale: float, return_lse: bool, config: TritonConfig, tiles: TileSchedule) -> None:
        """The block-sparse kernel over the listed blocks (``lse`` written when ``return_lse``)."""
        batch, num_heads, q_len, head_dim = q.shape
        num_kv_heads, kv_len = k.shape[1], k.shape[2]
        descs = _descriptors(q, k, v, config) if config.use_tma else (q, k, v)
        grid = (tiles.num_programs, batch)
        args = (q, k, v, out, lse, *descs, tiles.programs, tiles.full_start, tiles.partial_start, tiles.partial_end,
                q.stride(0), q.stride(1), q.stride(2),
                k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                out.stride(0), out.stride(1), out.stride(2),
                lse.stride(0) if return_lse else 0, lse.stride(1) if return_lse else 0,
                num_heads, num_kv_heads, q_len, kv_len, scale * LOG2E)
        params = dict(GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=config.block_m,
                      BLOCK_N=config.block_n, WRITE_LSE=return_lse, USE_TMA=config.use_tma, SCALE_POSITIVE=scale > 0,
                      DOT_PRECISION=dot_precision(q.dtype), WARP_SPECIALIZE=config.warp_specialize,
                      FULL_IN_BLOCKS=tiles.full_in_blocks, num_warps=config.num_warps)
        aligned = tuple(t.data_ptr() % 16 == 0 for t in (q, k, v, out))   # Triton pipelines aligned loads only
        stages = self.stages(config, q, (params, aligned), lambda n: block_sparse_attention_fwd.warmup(
            *args, grid=grid, **params, num_stages=n))
        self.last_compiled = block_sparse_attention_fwd[grid](*args, **params, num_stages=stages)

    def stages(self, config: TritonConfig, q: torch.Tensor, launch: tuple[dict, tuple], compile_at) -> int:
        """The config's stages, or fewer where the GPU's shared memory does not hold them (an RTX 4090 at head dim
        128: :mod:`.shared_memory`); the user's ``num_stages`` as given. Under the interpreter: the config's.

        ``launch``: the launch's constants and which of q, k, v, out are 16-byte aligned (an unaligned load is not
        pipelined: 98,328 bytes at three stages where aligned ones need 163,840 on an RTX 4090)."""
        if interpreter.interpreting() or self.options.num_stages is not None:
            return config.num_stages
        params, aligned = launch
        key = (config, q.dtype, tuple(sorted(params.items())), aligned, torch.cuda.get_device_capability(q.device),
               shared_memory.shared_memory_limit())
        if key not in _STAGES:
            tiles = f"{config.block_m} x {config.block_n} tiles"
            what = f"triton lowering ({q.dtype}, head dim {params['HEAD_DIM']}, {tiles})"
            stages = shared_memory.fitting_stages(compile_at, config.num_stages, what)
            if stages is None:                        # Triton gave no compiled kernel to read: decide next time
                return config.num_stages
            _STAGES[key] = stages
        return _STAGES[key]


def _descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: TritonConfig):
    """Host TMA descriptors over the [rows, D] views of contiguous q, k, v."""
    return describe(q, config.block_m), describe(k, config.block_n), describe(v, config.block_n)


def describe(t: torch.Tensor, rows: int):
    """A host TMA descriptor over the ``[rows of all heads, D]`` view of contiguous ``t``, in tiles of ``rows``.

    TMA needs a 16-byte aligned base (Triton asserts it): a contiguous tensor that starts inside a row of a larger
    buffer is copied to one that is (the descriptor keeps the copy alive; the kernel reads the same values)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    flat = (t if t.data_ptr() % 16 == 0 else t.clone()).view(-1, t.shape[-1])
    return TensorDescriptor(flat, shape=list(flat.shape), strides=list(flat.stride()), block_shape=[rows, t.shape[-1]])
