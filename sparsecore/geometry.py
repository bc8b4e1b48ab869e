"""Token layout of a video DiT sequence after patchify: frame-major video tokens, then text.

A latent video of ``frames x height x width`` patches (after the VAE and the patch
embedding) becomes ``frames * height * width`` tokens in frame-major, then row-major
order: token ``t * P + y * width + x`` (``P = height * width``) is patch ``(t, y, x)``.
Joint-attention models (HunyuanVideo, SD3-style MM-DiT) append the text tokens to
the same sequence, after the video by default (``text_position="end"``) or before it
(``"start"``); cross-attention models (Wan) have ``text_tokens=0``.

Frame-causal models (SkyReels-V2's diffusion forcing with causal blocks; autoregressive
video DiTs) let a token see only the frames of its own and earlier *causal blocks* of
``causal_frames`` consecutive latent frames (``causal_frames=0``: every token sees every
token). Such a geometry cuts its blocks at every causal-block boundary, so that what a
token may see is a property of its block (:meth:`VideoGeometry.causal_groups`).

Shapes used in the acceptance tests (480x832 video, VAE 8x spatial + 2x2 patches or
16x spatial + 1x1 patches, 4x temporal): Wan 2.1 1x = 21x30x52 (81 video frames),
Wan 2.1 6x = 121x30x52, HunyuanVideo 1.5 1x = 33x30x52 (129 video frames) + text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsecore.ir.validation import check_int

TEXT_POSITIONS = ("start", "end")
MAX_TOKENS = 2**31 - 1      # a sequence one mask can describe: H x q_len x kv_len below 2**62 (PAIR_LIMIT) at one head


@dataclass(frozen=True)
class VideoGeometry:
    """The token layout of one DiT attention sequence.

    Args:
        frames: latent frames T (after temporal VAE compression).
        height, width: patches per frame along y and x (``P = height * width`` tokens per frame).
        text_tokens: text tokens in the same sequence (joint attention), 0 for none.
        text_position: ``"end"`` (after the video, HunyuanVideo / MM-DiT) or ``"start"``.
        causal_frames: latent frames per causal block (frame-causal attention), 0 for none.
    """

    frames: int
    height: int
    width: int
    text_tokens: int = 0
    text_position: str = "end"
    causal_frames: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "frames", check_int(self.frames, "frames"))
        set_(self, "height", check_int(self.height, "height"))
        set_(self, "width", check_int(self.width, "width"))
        set_(self, "text_tokens", check_int(self.text_tokens, "text_tokens", minimum=0))
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"text_position: expected one of {TEXT_POSITIONS}, got {self.text_position!r}")
        set_(self, "causal_frames", check_int(self.causal_frames, "causal_frames", minimum=0))
        if self.tokens > MAX_TOKENS:              # Python ints: its offsets and token ids are int64 arrays
            raise ValueError(f"frames, height, width, text_tokens: {self.frames} x {self.height} x {self.width} + "
                             f"{self.text_tokens} = {self.tokens:,} tokens, more than a mask describes "
                             f"({MAX_TOKENS:,}: one head's token pairs below 2**62); check the latent shape")
        if self.causal_frames and self.text_tokens:
            raise ValueError(f"causal_frames: frame-causal attention is defined over video tokens only, got "
                             f"causal_frames={self.causal_frames} with text_tokens={self.text_tokens}; pass "
                             f"causal_frames=0, or model the text separately")

    # ------------------------------------------------------------ sizes
    @property
    def frame_tokens(self) -> int:
        """P: tokens per latent frame."""
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        return self.frames * self.frame_tokens

    @property
    def tokens(self) -> int:
        """L: the sequence length (video + text)."""
        return self.video_tokens + self.text_tokens

    @property
    def video_start(self) -> int:
        """Sequence index of the first video token."""
        return self.text_tokens if self.text_position == "start" else 0

    @property
    def video_slice(self) -> slice:
        return slice(self.video_start, self.video_start + self.video_tokens)

    @property
    def text_slice(self) -> slice:
        start = 0 if self.text_position == "start" else self.video_tokens
        return slice(start, start + self.text_tokens)

    @property
    def visible_pairs(self) -> int:
        """Token pairs (query, key) of one head that attention computes: L^2, or under ``causal_frames`` the pairs
        whose key lies in the query's own or an earlier causal block (a short last causal block counted as it is)."""
        if not self.causal_frames:
            return self.tokens * self.tokens
        group = self.causal_frames * self.frame_tokens
        full, rest = divmod(self.video_tokens, group)
        seen = group * group * full * (full + 1) // 2                 # block i's rows see i + 1 whole blocks
        return seen + rest * self.video_tokens

    def __str__(self) -> str:
        text = f" + {self.text_tokens} text ({self.text_position})" if self.text_tokens else ""
        causal = f", causal blocks of {self.causal_frames} frames" if self.causal_frames else ""
        return f"{self.frames}x{self.height}x{self.width}{text} = {self.tokens} tokens{causal}"

    # ------------------------------------------------------------ blocks
    def frame_offsets(self) -> np.ndarray:
        """Sequence boundaries of the latent frames, int64 ``[frames + 1]``."""
        return self.video_start + np.arange(self.frames + 1, dtype=np.int64) * self.frame_tokens

    def block_offsets(self, block_size: int | None = None, *, split_text: bool = True,
                      text_block: int | None = None) -> np.ndarray:
        """Block boundaries over the whole sequence, int64 ``[num_blocks + 1]`` (an IR offset array).

        Args:
            block_size: None for one block per latent frame (``P`` tokens); an int for
                fixed-size blocks over the video tokens (the last video block may be short; with
                ``causal_frames``, blocks restart at every causal block, whose last block may be short).
            split_text: keep text and video in separate blocks (a block boundary at the
                modality boundary). False cuts the whole sequence into uniform
                ``block_size`` blocks, which some kernels need; a block may then hold
                both video and text tokens.
            text_block: size of the text blocks (default: ``block_size``, or ``P`` for
                frame blocks); the last text block may be short. Refused under ``split_text=False``.
        """
        if block_size is not None:
            block_size = check_int(block_size, "block_size")
        if text_block is not None:
            text_block = check_int(text_block, "text_block")
        if not split_text:
            if block_size is None:
                raise ValueError("block_size: split_text=False needs a fixed block size, got None "
                                 "(frame blocks always end at the modality boundary)")
            if text_block is not None:
                raise ValueError(f"text_block: split_text=False cuts the whole sequence into {block_size}-token "
                                 f"blocks, text included, got text_block={text_block}; pass text_block=None, or "
                                 f"split_text=True for text blocks of their own size")
            if self.causal_frames:
                raise ValueError(f"split_text: uniform blocks over the whole sequence would cross the causal blocks "
                                 f"of {self.causal_frames} frames; pass split_text=True")
            return _uniform(self.tokens, block_size)
        video = self.frame_offsets() - self.video_start if block_size is None else self._video_blocks(block_size)
        parts = [("video", video)]
        if self.text_tokens:
            size = text_block if text_block is not None else (block_size or self.frame_tokens)
            text = _uniform(self.text_tokens, size)
            parts.append(("text", text))
            if self.text_position == "start":
                parts.reverse()
        offsets, start = [np.zeros(1, dtype=np.int64)], 0
        for _, part in parts:
            offsets.append(start + part[1:])
            start += int(part[-1])
        return np.concatenate(offsets)

    def video_block_count(self, block_size: int) -> int:
        """How many ``block_size``-token blocks :meth:`block_offsets` cuts the video into (without building them)."""
        block_size = check_int(block_size, "block_size")
        if not self.causal_frames:
            return -(-self.video_tokens // block_size)
        full, rest = divmod(self.frames, self.causal_frames)
        per_group = -(-self.causal_frames * self.frame_tokens // block_size)
        return full * per_group + -(-rest * self.frame_tokens // block_size)

    def _video_blocks(self, block_size: int) -> np.ndarray:
        """Fixed-size block boundaries over the video tokens, restarting at every causal block."""
        if not self.causal_frames:
            return _uniform(self.video_tokens, block_size)
        group = self.causal_frames * self.frame_tokens
        starts = np.arange(0, self.video_tokens, group, dtype=np.int64)
        sizes = np.minimum(group, self.video_tokens - starts)
        return np.concatenate([start + _uniform(int(size), block_size)[:-1] for start, size in zip(starts, sizes)]
                              + [np.array([self.video_tokens], dtype=np.int64)])

    def causal_groups(self, offsets: np.ndarray) -> np.ndarray:
        """The causal block of each block, int64 ``[num_blocks]`` (all 0 without ``causal_frames``): block i may
        see block j exactly where ``groups[j] <= groups[i]``.

        Raises ``ValueError`` where a block crosses a causal-block boundary (no block-level rule is exact there).
        """
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != self.tokens:
            raise ValueError(f"offsets: expected block boundaries [0, ..., {self.tokens}] of this geometry "
                             f"({self}), got {len(offsets)} values")
        if not self.causal_frames:
            return np.zeros(len(offsets) - 1, dtype=np.int64)
        first = self.frame_of(offsets[:-1]) // self.causal_frames
        last = self.frame_of(offsets[1:] - 1) // self.causal_frames
        crossing = np.flatnonzero(first != last)
        if len(crossing):
            i = int(crossing[0])
            raise ValueError(f"offsets: block {i} (tokens {offsets[i]}..{offsets[i + 1]}) crosses a boundary of the "
                             f"causal blocks of {self.causal_frames} frames ({self.causal_frames * self.frame_tokens}"
                             f" tokens); build the blocks with geometry.block_offsets(), which cuts them there")
        return first

    def block_frames(self, offsets: np.ndarray) -> np.ndarray:
        """Latent frame of each block's first token, int64 ``[num_blocks]`` (-1 for a text block)."""
        return self.frame_of(np.asarray(offsets)[:-1])

    def text_blocks(self, offsets: np.ndarray) -> np.ndarray:
        """bool ``[num_blocks]``: True where a block holds any text token."""
        offsets = np.asarray(offsets, dtype=np.int64)
        t0, t1 = self.text_slice.start, self.text_slice.stop
        return (offsets[:-1] < t1) & (offsets[1:] > t0) if self.text_tokens else np.zeros(len(offsets) - 1, bool)

    # ------------------------------------------------------------ token <-> (t, y, x)
    def is_text(self, tokens: np.ndarray | int) -> np.ndarray:
        tokens = self._check_tokens(tokens)
        return (tokens >= self.text_slice.start) & (tokens < self.text_slice.stop)

    def frame_of(self, tokens: np.ndarray | int) -> np.ndarray:
        """Latent frame of each token, int64 (-1 for text tokens)."""
        tokens = self._check_tokens(tokens)
        local = tokens - self.video_start
        return np.where(self.is_text(tokens), -1, local // self.frame_tokens)

    def position(self, tokens: np.ndarray | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(t, y, x)`` of each token, int64 arrays; ``(-1, -1, -1)`` for text tokens."""
        tokens = self._check_tokens(tokens)
        text = self.is_text(tokens)
        local = np.where(text, 0, tokens - self.video_start)
        t, rest = np.divmod(local, self.frame_tokens)
        y, x = np.divmod(rest, self.width)
        return tuple(np.where(text, -1, a) for a in (t, y, x))  # type: ignore[return-value]

    def token(self, t: np.ndarray | int, y: np.ndarray | int, x: np.ndarray | int) -> np.ndarray:
        """Sequence index of patch ``(t, y, x)`` (inverse of :meth:`position`)."""
        coordinates = {name: np.asarray(a) for name, a in (("t", t), ("y", y), ("x", x))}
        for name, a in coordinates.items():
            if not np.issubdtype(a.dtype, np.integer):                  # 1.9 would truncate to 1, True count as 1
                raise TypeError(f"{name}: expected integer coordinates, got dtype {a.dtype}")
        t, y, x = (a.astype(np.int64) for a in coordinates.values())
        for name, a, n in (("t", t, self.frames), ("y", y, self.height), ("x", x, self.width)):
            if a.size and (a.min() < 0 or a.max() >= n):
                raise ValueError(f"{name}: expected values in [0, {n}), got range [{a.min()}, {a.max()}]")
        return self.video_start + t * self.frame_tokens + y * self.width + x

    def video_positions(self) -> np.ndarray:
        """``(t, y, x)`` of every video token in sequence order, int64 ``[video_tokens, 3]``."""
        t, y, x = np.meshgrid(np.arange(self.frames), np.arange(self.height), np.arange(self.width), indexing="ij")
        return np.stack([t.ravel(), y.ravel(), x.ravel()], axis=1).astype(np.int64)

    def _check_tokens(self, tokens: np.ndarray | int) -> np.ndarray:
        tokens = np.asarray(tokens)
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"tokens: expected integer token indices, got dtype {tokens.dtype}")
        tokens = tokens.astype(np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.tokens):
            raise ValueError(f"tokens: expected indices in [0, {self.tokens}), got range [{tokens.min()}, "
                             f"{tokens.max()}]")
        return tokens


def _uniform(length: int, block: int) -> np.ndarray:
    return np.append(np.arange(0, length, block, dtype=np.int64), np.int64(length))
