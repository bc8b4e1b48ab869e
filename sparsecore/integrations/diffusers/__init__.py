"""Sparse self-attention for diffusers 0.42 video DiTs: Wan 2.1/2.2 (VACE, Animate), HunyuanVideo 1.5 and 1.0,
CogVideoX, SkyReels-V2, Mochi 1, LTX-Video, LTX-2, Kandinsky 5, Cosmos, one call.

    import sparsecore.integrations.diffusers as sparse
    handle = sparse.apply(pipe.transformer, method="lvsa", device="cuda", num_steps=50)
    video = pipe(prompt, num_frames=481, num_inference_steps=50).frames   # the same call as before
    handle.stats()                        # per (layer, step): density, kernel, calls, time if asked
    handle.remove()                       # the original processors, exactly

Modules, one job each (data flows one way: processor -> planner -> kernel):

- :mod:`.models`: the supported models, where their self-attention lives, how they make q, k, v.
- :mod:`.ltx`: LTX-Video's and LTX-2's packed tokens (the grid a forward names, checked) and q, k, v.
- :mod:`.kandinsky`: Kandinsky 5's q, k, v and output.
- :mod:`.processors`: the attention processors put in place of diffusers' own.
- :mod:`.steps`: which denoising step and run a forward belongs to.
- :mod:`.planner`: the method's decision per (layer, step), masks, kernels.
- :mod:`.parallel`: context-parallel layouts, diffusers' Ulysses routing, the HunyuanVideo 1.5, Mochi 1 and
  Wan VACE plans and :func:`enable_parallelism`.
- :mod:`.sharded`: ring and unified context parallelism (and HunyuanVideo 1.5, Mochi 1 under Ulysses):
  planning on whole sequences, running this rank's rows.
- :mod:`.ring`: ring attention over a block-sparse mask (P2P shards, LSE merge).
- :mod:`.op`: the custom op ``torch.ops.sparsecore.diffusers_attention`` (compiled models).
- :mod:`.stats`: per (layer, step) records and timing.
- :mod:`.audit`: chosen layers' and steps' masks measured against dense attention (``handle.audit``).
- :mod:`.window_search`: Sliding Tile Attention's window search on the running model (``handle.search_windows``).
- :mod:`.head_groups`: a mask of a few per-head patterns run as one kernel per pattern (STA's strategies).
- :mod:`.callable_session`: a callable method as a session; :mod:`.text`: valid text tokens from the models' masks.
- :mod:`.attach`: ``apply()``: the checks, the self-attention modules found and their processors replaced.
- :mod:`.handle`: the handle (hooks, step control, stats, ``remove()``).

Plug-in point: the processors replace diffusers' ``WanAttnProcessor`` /
``HunyuanVideo15AttnProcessor2_0`` / ``HunyuanVideoAttnProcessor2_0`` / ``CogVideoXAttnProcessor2_0`` /
``SkyReelsV2AttnProcessor`` / ``MochiAttnProcessor2_0`` / ``LTXVideoAttnProcessor`` /
``LTX2AudioVideoAttnProcessor`` and ``LTX2PerturbedAttnProcessor`` / ``Kandinsky5AttnProcessor`` /
``CosmosAttnProcessor2_0`` (``attn.set_processor``; Mochi's module has no
setter: its ``processor`` attribute). We did not register a backend in diffusers' attention
registry: in 0.42 it is keyed by the closed enum ``AttentionBackendName``, the dispatch call carries no (layer,
step), and HunyuanVideo 1.5's processor builds the dense ``[B, 1, S, S]`` padding mask before dispatching even where
the IR needs none.

Text (HunyuanVideo 1.5): video then text on the sequence axis. The model orders each
sample's text as valid tokens first, then padding; a row's valid tokens must come first (else
``ValueError``); the method plans on the valid prefix (LVSA keeps text dense both ways, AdaSpa
and PASA use a text sink), and the kernel runs the mask extended by padding blocks that no
row attends to: exactly the model's masking (masks that approximate unkept blocks run on the
valid prefix instead, padding rows set to 0). Samples of a batch with different valid counts
run as separate groups, each with its own geometry. LVSA's ``reference_frames`` defaults to 33
(the HunyuanVideo 1.5 horizon) for this model unless given. HunyuanVideo 1.0 runs the same way, its
double-stream then single-stream blocks as layers (its key mask ``[B, 1, 1, S]`` gives the text counts).
CogVideoX attends over text then video; its processor builds the sequence video first
(:func:`.models.joint_qkv`), the same attention, so the same path runs it (no padding; LVSA's horizon 13
token frames, 11 for CogVideoX 1.5). Wan VACE runs its ``vace_blocks`` then its ``blocks`` as layers, Wan
Animate its ``blocks``; SkyReels-V2 runs as Wan (horizon 25 latent frames), and with diffusion forcing's causal
blocks every mask and dense step keeps to them (a frame-causal geometry, :mod:`sparsecore.methods.causal`).
Mochi 1 runs as HunyuanVideo 1.0 (video then each sample's valid text from its ``[B, text]`` mask; horizon 28).
LTX-Video and LTX-2 take packed tokens ``[B, S, C]``: the grid comes from the forward's ``num_frames``, ``height``,
``width`` (horizons 21 and 16 latent frames, their pipelines' defaults); LTX-2's ``video_coords`` must be the grid's.

Limits: inference only (the sparse kernels have no backward); context parallelism: Ulysses, ring and unified
on Wan, HunyuanVideo 1.5, Mochi 1, Wan VACE, SkyReels-V2 and LTX-Video (the last five through
:func:`enable_parallelism`'s plans; HunyuanVideo 1.5 and Mochi 1 only while sparsecore is applied), not HunyuanVideo
1.0, CogVideoX or Wan Animate (no plan for them) nor LTX-2 (its processor raises); even shards only; no
approximating masks under a ring; processors replaced after ``apply`` are overwritten by ``remove()``.
"""

from __future__ import annotations

try:
    import diffusers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without diffusers
    raise ImportError(f"sparsecore.integrations.diffusers needs diffusers 0.42 ({err}); install it with "
                      f"pip install 'diffusers==0.42.1' (tested version)") from err

from .attach import apply
from .callable_session import MethodProvider
from .handle import SparseAttentionHandle
from .models import SUPPORTED_MODELS, ModelSpec
from .parallel import HUNYUAN_VIDEO_15_CP_PLAN, LTX_VIDEO_CP_PLAN, MOCHI_CP_PLAN, WAN_VACE_CP_PLAN, enable_parallelism
from .processors import (CogVideoXSparseAttnProcessor, HunyuanVideo15SparseAttnProcessor,
                         HunyuanVideoSparseAttnProcessor, LTX2SparseAttnProcessor, LTXVideoSparseAttnProcessor,
                         MochiSparseAttnProcessor, SkyReelsV2SparseAttnProcessor, WanSparseAttnProcessor)
from .window_search import WindowSearch

__all__ = ["HUNYUAN_VIDEO_15_CP_PLAN", "LTX_VIDEO_CP_PLAN", "MOCHI_CP_PLAN", "SUPPORTED_MODELS", "WAN_VACE_CP_PLAN",
           "CogVideoXSparseAttnProcessor", "HunyuanVideo15SparseAttnProcessor", "HunyuanVideoSparseAttnProcessor",
           "LTX2SparseAttnProcessor", "LTXVideoSparseAttnProcessor", "MethodProvider", "MochiSparseAttnProcessor",
           "ModelSpec", "SkyReelsV2SparseAttnProcessor", "SparseAttentionHandle", "WanSparseAttnProcessor",
           "WindowSearch", "apply", "enable_parallelism"]
