"""sparsecore inside torch.compile: compiled transformers equal eager ones, with no graph break or recompile.

Tiny random Wan (and Wan VACE), HunyuanVideo 1.5 and 1.0, CogVideoX, Kandinsky 5 (in NABLA's tiled token order) and
Cosmos models with sparsecore applied run five
denoising steps eagerly, then compiled as diffusers recommends (``compile_repeated_blocks(fullgraph=True)``)
or whole (``torch.compile(transformer)``). The attention is one custom op
(``torch.ops.sparsecore.diffusers_attention``): the compiled outputs equal the eager ones in
fp32, Dynamo records no graph break, and after the first step nothing is compiled again
(``error_on_recompile``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from test_integration_diffusers import (cogvideox_inputs, cosmos_inputs, forward, hunyuan_10_inputs, hunyuan_inputs,
                                       kandinsky_inputs, random_mask, tiny_cogvideox, tiny_cosmos, tiny_hunyuan,
                                       tiny_hunyuan_10, tiny_kandinsky, tiny_wan, tiny_wan_vace, wan_inputs,
                                       wan_vace_inputs)

import sparsecore.integrations.diffusers as sparse

TIMESTEPS = (999.0, 800.0, 600.0, 400.0, 200.0)
METHODS = {
    "lvsa": {"reference_frames": 4, "window": 1},
    "adaspa": {"warmup_steps": 1, "search_steps": (1, 3), "sparsity": 0.6, "block_size": 32},
    "pasa": {"dense_fraction": 0.2, "density": 0.3, "block_size": 32},
    "callable": {},
}
MODELS = {"wan": (tiny_wan, lambda: wan_inputs(batch=2)),
          "hunyuan": (tiny_hunyuan, lambda: hunyuan_inputs(batch=2, text="ragged")),
          "hunyuan-1.0": (tiny_hunyuan_10, lambda: hunyuan_10_inputs(batch=2, text="ragged")),
          "cogvideox": (tiny_cogvideox, lambda: cogvideox_inputs(batch=2)),
          "wan-vace": (tiny_wan_vace, lambda: wan_vace_inputs(batch=2)),
          "kandinsky-5": (tiny_kandinsky, lambda: kandinsky_inputs(batch=2, fractal=True)),
          "cosmos": (tiny_cosmos, lambda: cosmos_inputs(batch=2))}


def run(model, inputs, method: str, compile_as: str | None, backend: str = "aot_eager") -> tuple[list, list]:
    """Outputs of the five steps and the handle's stats; compiled before the first step if asked."""
    handle = sparse.apply(model, method=random_mask if method == "callable" else method, device="cpu",
                          num_steps=len(TIMESTEPS), **METHODS[method])
    call = model
    if compile_as == "blocks" and model._repeated_blocks:
        model.compile_repeated_blocks(fullgraph=True, backend=backend)
    elif compile_as == "blocks":      # diffusers 0.42 declares no repeated blocks for CogVideoX, Cosmos: each block
        for block in model.transformer_blocks:
            block.compile(fullgraph=True, backend=backend)
    elif compile_as == "whole":
        call = torch.compile(model, backend=backend)
    outputs = []
    try:
        for step, t in enumerate(TIMESTEPS):
            if step == 1:
                compiled_graphs = counters["stats"]["unique_graphs"]
            with torch._dynamo.config.patch(error_on_recompile=step > 0 and compile_as is not None):
                outputs.append(forward(call, inputs, t))
        if compile_as is not None:
            assert counters["stats"]["unique_graphs"] == compiled_graphs, "compiled again after the first step"
    finally:
        handle.remove()
    return outputs, handle.stats()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_regional_fullgraph_compile_equals_eager_with_no_break_or_recompile(name, method):
    build, inputs = MODELS[name]
    model, data = build(), inputs()
    eager, eager_stats = run(model, data, method, None)
    compiled, stats = run(model, data, method, "blocks")
    for step, (got, want) in enumerate(zip(compiled, eager)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    assert [(s["step"], s["backend"]) for s in stats] == [(s["step"], s["backend"]) for s in eager_stats]
    assert {s["backend"] for s in stats} - {"dense"}, "no sparse step ran: the test would not see the kernel"


def test_whole_model_compile_equals_eager():
    model, data = tiny_wan(), wan_inputs(batch=2)
    eager, _ = run(model, data, "pasa", None)
    compiled, _ = run(model, data, "pasa", "whole")
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_inductor_compile_equals_eager():
    model, data = tiny_wan(), wan_inputs(batch=1)
    eager, _ = run(model, data, "adaspa", None)
    compiled, _ = run(model, data, "adaspa", "blocks", backend="inductor")
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)       # inductor's fused fp32 kernels


def test_remove_after_compile_restores_the_dense_model():
    model, data = tiny_wan(), wan_inputs(batch=1)
    dense = [forward(model, data, t) for t in TIMESTEPS[:2]]
    run(model, data, "lvsa", "blocks")                                      # applied, compiled, removed
    again = [forward(model, data, t) for t in TIMESTEPS[:2]]
    for got, want in zip(again, dense):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compile_as", [None, "blocks"])
def test_the_op_gets_head_major_inputs_when_compiled(monkeypatch, compile_as):
    """Compiled, the processors hand the op q, k, v in the kernels' head-major memory (inductor writes RoPE's output
    there, so the op copies nothing: the copy put PASA 0.15 GiB above dense at Wan 6x); eager, the model's own
    token-major tensors (a dense step would pay for a copy)."""
    from sparsecore.integrations.diffusers.handle import SparseAttentionHandle
    seen = []
    attend = SparseAttentionHandle.attend

    def recording(self, layer, query, key, value, text_mask):   # inside the op: real tensors in both modes
        seen.append(tuple(t.transpose(1, 2).is_contiguous() for t in (query, key, value)))
        return attend(self, layer, query, key, value, text_mask)

    monkeypatch.setattr(SparseAttentionHandle, "attend", recording)
    model, data = tiny_wan(), wan_inputs(batch=1)
    run(model, data, "pasa", compile_as, backend="inductor")
    assert set(seen) == ({(True, True, True)} if compile_as else {(False, False, False)}), set(seen)


def test_the_ops_output_has_the_strides_its_fake_declares(monkeypatch):
    """The op returns ``[B, S, H, D]`` in head-major memory on dense and sparse steps alike, the strides its fake
    implementation gives inductor (a mismatch would mislead compiled code that reads the output)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from sparsecore.integrations.diffusers import models
    strides = []
    wan_output = models.wan_output

    def recording(attn, out, query):
        strides.append((out.shape, out.stride()))
        return wan_output(attn, out, query)

    monkeypatch.setattr(models, "wan_output", recording)
    model, data = tiny_wan(), wan_inputs(batch=1)
    run(model, data, "pasa", None)                               # dense steps, then sparse ones
    shape = strides[0][0]
    with FakeTensorMode():
        q = torch.empty(shape)
        fake = torch.ops.sparsecore.diffusers_attention(q, q, q, None, torch.tensor(0), torch.tensor(0))
    assert len(strides) == 2 * len(TIMESTEPS) and {s for _, s in strides} == {fake.stride()}, (strides, fake.stride())


def test_inductor_keeps_the_op_out_of_cuda_graphs():
    """The op decides per call on the host, so a CUDA graph replaying it would repeat one call's step and mask:
    inductor's own check (the one behind mode="reduce-overhead" and "max-autotune") must find it cudagraph-unsafe
    in a traced graph."""
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip(f"torch {torch.__version__} has no cudagraph_unsafe tag (the op's capture check stands in)")
    from torch._inductor.utils import get_first_incompatible_cudagraph_node
    from torch.fx.experimental.proxy_tensor import make_fx

    def layer(q):
        return torch.ops.sparsecore.diffusers_attention(q * 2, q, q, None, torch.tensor(0), torch.tensor(0)) + 1

    assert torch.Tag.cudagraph_unsafe in torch.ops.sparsecore.diffusers_attention.default.tags
    graph = make_fx(layer, tracing_mode="fake")(torch.empty(1, 16, 2, 8))
    with torch._inductor.config.patch(graph_partition=False):       # the whole-graph check (partitions: the tag)
        found = get_first_incompatible_cudagraph_node(graph)
    assert found is not None and found.target is torch.ops.sparsecore.diffusers_attention.default, found


def test_a_forward_and_the_op_refuse_a_cuda_graph_capture(monkeypatch):
    """Under ``torch.cuda.graph`` the transformer's pre-hook (which reads the timestep) and the op itself raise,
    naming the capture, before anything is recorded. The check is asked for the inputs' device; the tiny model
    runs on the CPU, so the check is recorded here and its CUDA branch is tested with the copies."""
    from sparsecore.integrations.diffusers import handle as handle_module, op as op_module
    asked = []
    for module in (handle_module, op_module):
        monkeypatch.setattr(module, "refuse_capture", lambda device, what: asked.append((str(device), what)))
    model, data = tiny_wan(), wan_inputs(batch=1)
    run(model, data, "pasa", None)
    assert {what for _, what in asked} == {"a transformer forward with sparsecore applied",
                                           "a diffusers layer's attention"}, asked
    assert {device for device, _ in asked} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available: CUDA graphs capture CUDA work only")
@pytest.mark.parametrize("partition", [False, True])
def test_reduce_overhead_compile_equals_eager_on_cuda(partition):
    """``torch.compile(mode="reduce-overhead")`` around a model with sparsecore applied: the steps equal eager ones,
    sparse steps included. Without graph partitioning inductor skips CUDA graphs for graphs holding the op; with
    it, it cuts them around the op and skips none."""
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip(f"torch {torch.__version__} has no cudagraph_unsafe tag: reduce-overhead raises at recording")
    model, data = tiny_wan().cuda(), {name: t.cuda() for name, t in wan_inputs(batch=1).items()}
    outputs, stats = {}, []
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        counters.clear()
        handle = sparse.apply(model, method="pasa", device="cuda", num_steps=len(TIMESTEPS), **METHODS["pasa"])
        call = model if mode is None else torch.compile(model, mode=mode)
        try:
            with torch._inductor.config.patch(graph_partition=partition):
                outputs[mode] = [forward(call, data, t).clone() for t in TIMESTEPS]
        finally:
            handle.remove()
        stats = handle.stats()
    for step, (got, want) in enumerate(zip(outputs["reduce-overhead"], outputs[None])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"step {step}")
    skips = counters["inductor"]["cudagraph_skips"]
    assert (skips == 0) if partition else (skips >= 1), dict(counters["inductor"])
    assert {s["backend"] for s in stats} - {"dense"}, "no sparse step ran: the test would not see the kernel"


def test_models_of_one_class_share_the_compiled_block_code():
    """A reloaded model, or Wan 2.2's second expert, runs the block code another model of its class compiled: the
    model's slot is a graph input, not a constant (an int slot was guarded on: every model compiled again, and under
    ``fullgraph=True`` the ninth hit the recompile limit)."""
    data, graphs, models = wan_inputs(batch=1), [], []
    for _ in range(3):
        model = tiny_wan()
        models.append(model)                                    # alive: each model has its own slot
        handle = sparse.apply(model, method="pasa", device="cpu", num_steps=2, **METHODS["pasa"])
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        try:
            before = counters["stats"]["unique_graphs"]
            for t in TIMESTEPS[:2]:
                forward(model, data, t)
            graphs.append(counters["stats"]["unique_graphs"] - before)
        finally:
            handle.remove()
    assert graphs[0] >= 1 and graphs[1:] == [0, 0], graphs


def test_models_applied_from_two_threads_get_their_own_slots(monkeypatch):
    """One model a device, each applied in its own thread (a serving pattern): each handle gets its own slot. The
    slot was ``max(slots) + 1`` read and set unlocked, so two threads could both take 0 and the op sent one model's
    layers to the other model's handle ('called outside a forward of the transformer'). The reading of the slots is
    slowed here so that the two threads meet in it."""
    import threading
    import time
    import weakref

    from sparsecore.integrations.diffusers import op

    class SlowSlots(weakref.WeakKeyDictionary):
        def values(self):
            found = list(super().values())
            time.sleep(0.1)                              # the other thread reads the slots meanwhile
            return iter(found)

    monkeypatch.setattr(op, "_SLOTS", SlowSlots())
    models, handles = [tiny_wan(), tiny_wan()], [None, None]

    def apply(index: int) -> None:
        handles[index] = sparse.apply(models[index], method="lvsa", device="cpu", num_steps=2, **METHODS["lvsa"])

    threads = [threading.Thread(target=apply, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert int(handles[0].id) != int(handles[1].id)
        data = wan_inputs(batch=1)
        for model in models:
            forward(model, data, TIMESTEPS[0])
    finally:
        for handle in handles:
            handle.remove()
