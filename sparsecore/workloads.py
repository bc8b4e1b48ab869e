"""Synthetic Q, K, V with the structure of video DiT attention (SYNTHETIC: not from a real model).

``video_qkv`` is what the demo, the method tests and the CPU fidelity tables feed the
sparsity methods, since real activations of a 1.3B+ video DiT are neither small nor
shippable. It reproduces the features the methods' papers build on, not the numbers
of any model:

- **3D rotary positions** (RoPE over ``(t, y, x)``, head dim split like Wan 2.1:
  ``t`` gets ``D - 4 * (D // 6)`` dims, ``y`` and ``x`` get ``2 * (D // 6)`` each,
  base 10000), applied to video tokens only; text tokens have no rotary position.
- **Locality of different kinds per head**: each head adds a constant vector to q
  and k before RoPE, so ``q . k`` gains ``sum_i |c_i|^2 cos(w_i * distance)`` per axis:
  a peak at distance 0 whose sharpness per axis is the head's kind
  (``"local"`` 3D-local, ``"spatial"`` same frame / broad in space, ``"temporal"``
  same patch position / broad in time, ``"global"`` content-driven, ``"sink"``).
- **Spatially and temporally smooth content**: a random field over ``(t, y, x)``
  drawn on a coarse grid and upsampled trilinearly; q and k are the same projection
  of it (content similarity), v another projection plus a little token noise.
- **Sink-like tokens**: ``sinks`` fixed video tokens (the first token of frame 0 and
  seeded random others) whose keys share a direction every query leans toward,
  strongest in ``"sink"`` heads.

All randomness comes from one seeded ``torch.Generator`` on the CPU, so a seed gives
the same tensors on every machine; they are moved to ``device`` at the end.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from sparsecore.ir.validation import check_index, check_int

from .geometry import VideoGeometry



@dataclass(frozen=True)
class HeadKind:
    """Amplitudes of one head kind (times ``sharpness``; ~10 logits per unit squared at any D).

    ``position``: (t, y, x) norms of the constant rotary vector (locality per axis);
    ``content``: weight of the smooth content similarity; ``rotary_content``: whether
    the content goes through RoPE (False: position-free semantic matching);
    ``sink``: pull of every query toward the sink tokens.
    """

    position: tuple[float, float, float]
    content: float
    rotary_content: bool
    sink: float


HEAD_KINDS: dict[str, HeadKind] = {
    "local": HeadKind((1.0, 1.0, 1.0), 0.6, True, 0.15),
    "spatial": HeadKind((2.2, 0.5, 0.5), 0.6, True, 0.2),
    "temporal": HeadKind((0.25, 1.8, 1.8), 0.5, True, 0.2),
    "global": HeadKind((0.2, 0.2, 0.2), 0.8, False, 0.3),
    "sink": HeadKind((0.8, 0.8, 0.8), 0.6, True, 0.9),
}
DEFAULT_KINDS = ("local", "spatial", "temporal", "global", "sink", "local")


def rope_dims(head_dim: int) -> tuple[int, int, int]:
    """Dims of the (t, y, x) rotary bands for ``head_dim`` (Wan 2.1's split: 44/42/42 at 128)."""
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def video_qkv(geometry: VideoGeometry, num_heads: int, head_dim: int, seed: int, *, num_kv_heads: int | None = None,
              batch: int = 1, kinds: Sequence[str] | None = None, sharpness: float = 1.0, sinks: int = 4,
              rope_theta: float = 10000.0, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic video-DiT-like attention inputs (see the module docstring).

    Args:
        geometry: the token layout (video frames, patches, text tokens).
        num_heads: query heads H; head ``h`` has the kind of its key head ``g = h // (H // H_kv)``:
            ``kinds[g % len(kinds)]``.
        head_dim: D, even and at least 6 (three rotary bands).
        seed: all randomness; the same seed gives the same tensors.
        num_kv_heads: key/value heads (GQA); must divide ``num_heads``. Default ``num_heads``.
        batch: B; batch elements share the head kinds and differ in content.
        kinds: head kinds cycled over the key heads (default ``DEFAULT_KINDS``).
        sharpness: multiplies every positional and content amplitude (higher: sparser attention).
        sinks: number of sink tokens (0 for none).

    Returns:
        q ``[B, H, L, D]``, k and v ``[B, H_kv, L, D]`` in ``dtype`` on ``device``.
    """
    if not isinstance(geometry, VideoGeometry):
        raise TypeError(f"geometry: expected a sparsecore.VideoGeometry, got {type(geometry).__name__}")
    num_heads = check_int(num_heads, "num_heads")
    seed = check_index(seed, "seed", 2 ** 64)                # torch's generator seeds are 64-bit
    head_dim = check_int(head_dim, "head_dim", 6)
    if head_dim % 2:
        raise ValueError(f"head_dim: expected an even number (rotary pairs), got {head_dim}")
    num_kv_heads = num_heads if num_kv_heads is None else check_int(num_kv_heads, "num_kv_heads")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: expected a divisor of num_heads={num_heads}, got {num_kv_heads}")
    batch = check_int(batch, "batch")
    sinks = check_int(sinks, "sinks", 0)
    kinds = tuple(DEFAULT_KINDS if kinds is None else kinds)
    unknown = [k for k in kinds if not isinstance(k, str) or k not in HEAD_KINDS]
    if not kinds or unknown:
        raise ValueError(f"kinds: expected a non-empty sequence of {sorted(HEAD_KINDS)}, got {list(kinds)}")
    for name, value in (("sharpness", sharpness), ("rope_theta", rope_theta)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
            raise ValueError(f"{name}: expected a positive finite float, got {value!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a torch floating dtype such as torch.float32, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {device!r} ({err})") from None
    module = getattr(torch, device.type, None)         # before the tensors are built: torch asserts at the move
    if device.type not in ("cpu", "meta") and not getattr(module, "is_available", lambda: False)():
        raise ValueError(f"device: {str(device)!r} is not available here (torch {torch.__version__}); pass 'cpu' or a "
                         f"device this machine has")

    with torch.device("cpu"):          # made on the host from a CPU generator, whatever torch's default device
        gen = torch.Generator().manual_seed(int(seed))
        length, video, group = geometry.tokens, geometry.video_slice, num_heads // num_kv_heads
        d = head_dim
        base = math.sqrt(10.0 * math.sqrt(d)) * sharpness   # amplitude^2 / sqrt(D) ~ 10 logits per unit
        cos, sin = _rope_tables(geometry, d, rope_theta)
        sink_ids = _sink_tokens(geometry, sinks, gen)

        q = torch.empty(batch, num_heads, length, d)
        k = torch.empty(batch, num_kv_heads, length, d)
        v = torch.empty(batch, num_kv_heads, length, d)
        for b in range(batch):
            field = _smooth_field(geometry, d, gen)                          # [video_tokens, D], unit variance
            text = torch.randn(geometry.text_tokens, d, generator=gen)
            for g in range(num_kv_heads):
                kind = HEAD_KINDS[kinds[g % len(kinds)]]
                project = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
                const = _band_vector(d, kind.position, gen) * base
                content = field @ project * (kind.content * base / math.sqrt(d))   # same projection for q and k
                rotary, plain = (content, 0.0) if kind.rotary_content else (0.0, content)
                noise = 0.3 * torch.randn(content.shape, generator=gen)
                k[b, g, video] = _rotate(rotary + const + noise, cos, sin) + plain
                value_projection = torch.randn(d, d, generator=gen) / math.sqrt(d)
                v[b, g, video] = field @ value_projection + 0.2 * torch.randn(content.shape, generator=gen)
                if geometry.text_tokens:
                    text_slice = geometry.text_slice
                    k[b, g, text_slice] = text @ project * (0.5 * base / math.sqrt(d))
                    v[b, g, text_slice] = text @ value_projection
                direction = torch.randn(d, generator=gen)
                direction = direction / direction.norm() * math.sqrt(kind.sink * 8.0 * math.sqrt(d)) * sharpness
                if len(sink_ids):
                    k[b, g, sink_ids] += direction
                for member in range(group):
                    h = g * group + member
                    jitter = 0.3 * torch.randn(content.shape, generator=gen)
                    q[b, h, video] = _rotate(rotary + const + jitter, cos, sin) + plain + direction
                    if geometry.text_tokens:
                        q[b, h, geometry.text_slice] = text @ project * (0.5 * base / math.sqrt(d)) + direction
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _rope_tables(geometry: VideoGeometry, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[video_tokens, D // 2]`` of the 3D rotary angles, bands in (t, y, x) order."""
    positions = torch.from_numpy(geometry.video_positions()).double()
    angles = []
    for axis, dims in enumerate(rope_dims(head_dim)):
        freqs = theta ** (-torch.arange(0, dims, 2, dtype=torch.float64) / dims)
        angles.append(positions[:, axis:axis + 1] * freqs[None, :])
    angle = torch.cat(angles, dim=1)
    return angle.cos().float(), angle.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE to ``x [N, D]``: pairs ``(2i, 2i + 1)`` rotated by the angle table."""
    even, odd = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2] = even * cos - odd * sin
    out[:, 1::2] = even * sin + odd * cos
    return out


def _band_vector(head_dim: int, amplitudes: tuple[float, float, float], gen: torch.Generator) -> torch.Tensor:
    """A random vector whose (t, y, x) rotary bands have the given norms."""
    parts = []
    for dims, amplitude in zip(rope_dims(head_dim), amplitudes):
        part = torch.randn(dims, generator=gen)
        parts.append(part / part.norm() * amplitude)
    return torch.cat(parts)


def _smooth_field(geometry: VideoGeometry, dim: int, gen: torch.Generator, static: float = 0.8) -> torch.Tensor:
    """Unit-variance random field ``[video_tokens, dim]``, smooth over (t, y, x).

    A static scene (smooth over y, x; the same in every frame) with weight ``static``
    plus a part that also changes smoothly over time (correlation ~4 frames).
    """
    size = (geometry.frames, geometry.height, geometry.width)
    coarse = [max(2, -(-n // 4)) for n in size]
    grid = torch.randn(1, dim, *coarse, generator=gen)
    moving = torch.nn.functional.interpolate(grid, size=size, mode="trilinear", align_corners=True)[0]
    scene = torch.randn(1, dim, 1, *coarse[1:], generator=gen).expand(1, dim, 2, *coarse[1:])
    still = torch.nn.functional.interpolate(scene, size=size, mode="trilinear", align_corners=True)[0]
    full = static * still / still.std() + math.sqrt(1 - static ** 2) * moving / moving.std()
    field = full.reshape(dim, -1).T
    return (field - field.mean(0)) / field.std(0, correction=0).clamp_min(1e-6)   # one token: no NaN


def _sink_tokens(geometry: VideoGeometry, count: int, gen: torch.Generator) -> torch.Tensor:
    """The first video token plus ``count - 1`` seeded random video tokens (sequence indices)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    others = torch.randperm(max(geometry.video_tokens - 1, 1), generator=gen)[:count - 1] + 1
    ids = np.unique(np.concatenate([[0], others.numpy()]))
    ids = ids[ids < geometry.video_tokens]
    return torch.from_numpy(geometry.video_start + ids).long()
