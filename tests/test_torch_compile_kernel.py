"""A compiled kernel called inside ``torch.compile``d code (CPU, the ``aot_eager`` backend: fake tensors, no C++).

Before :mod:`sparsecore.compiled_call`, Dynamo traced into the kernel's call: a first call stopped on NumPy's
``setflags``, and ``fullgraph=True`` failed on a data-dependent guard even after an eager call. Now the call is one
opaque op: ``fullgraph=True`` compiles at the first call, new masks and batch sizes give float64-oracle results, and
inputs needing gradients raise (inference only).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

import sparsecore
from sparsecore import BlockMask
from sparsecore.ir import Unselected

from oracle import dense_attention, expand_to_tokens


def masked_kernel(seed: int, empty_row: bool = False):
    keep = np.random.default_rng(seed).random((4, 3, 4)) < 0.5
    keep[:, 0, 0] = True
    if empty_row:
        keep[1, 2] = False
    mask = BlockMask.from_dense(keep, q_len=45, kv_len=50, q_block=16, kv_block=13)
    return mask, sparsecore.compile(mask, device="cpu")


def inputs(batch: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 4, 45, 8, generator=gen, dtype=dtype)
    k, v = (torch.randn(batch, 2, 50, 8, generator=gen, dtype=dtype) for _ in range(2))     # GQA: 2 key heads
    return q, k, v


def expected(mask, q, k, v, scale):
    return dense_attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), expand_to_tokens(mask), scale)


@pytest.mark.parametrize("return_lse", [False, True])
def test_fullgraph_compile_at_the_first_call_matches_the_oracle(return_lse):
    torch._dynamo.reset()
    mask, kernel = masked_kernel(0, empty_row=True)

    def layer(q, k, v):
        return kernel(q, k, v, scale=0.3, return_lse=return_lse)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for batch, seed in ((1, 1), (3, 2)):                 # a new batch size: the op's fake shapes follow
        q, k, v = inputs(batch, seed)
        got = compiled(q, k, v)
        out, lse = got if return_lse else (got, None)
        want_out, want_lse = expected(mask, q, k, v, 0.3)
        np.testing.assert_allclose(out.double().numpy(), want_out, atol=2e-5)
        assert out.shape == (batch, 4, 45, 8) and out.dtype == torch.float32
        if return_lse:
            assert lse.dtype == torch.float32
            np.testing.assert_allclose(lse.double().numpy(), want_lse, atol=2e-5)   # -inf on the empty row


def test_a_kernel_compiled_under_a_default_device_keeps_its_slot_on_the_cpu():
    """A kernel made inside ``torch.device(...)`` (or after ``torch.set_default_device``) runs compiled as eagerly:
    its slot, the op's argument, stays a CPU tensor (under "meta" the op ran its fake and gave garbage; on a GPU
    every call would read it back)."""
    torch._dynamo.reset()
    keep = np.random.default_rng(4).random((4, 3, 4)) < 0.5
    keep[:, 0, 0] = True
    mask = BlockMask.from_dense(keep, q_len=45, kv_len=50, q_block=16, kv_block=13)
    with torch.device("meta"):
        kernel = sparsecore.compile(mask, device="cpu")
    q, k, v = inputs(2, 5)
    got = torch.compile(lambda q, k, v: kernel(q, k, v), fullgraph=True, backend="aot_eager")(q, k, v)
    np.testing.assert_allclose(got.double().numpy(), expected(mask, q, k, v, 8 ** -0.5)[0], atol=2e-5)


CUDA_REASON = "torch.cuda.is_available() is False: the CUDA lowerings under torch.compile need a GPU"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_REASON)
@pytest.mark.parametrize("backend", [None, "triton"])
def test_fullgraph_compile_on_cuda_matches_the_oracle(backend):
    """The default CUDA lowering (fa4 on SM90) and Triton inside a compiled region, bf16, inductor."""
    torch._dynamo.reset()
    keep = np.random.default_rng(10).random((4, 3, 4)) < 0.5
    keep[:, :, 0] = True
    mask = BlockMask.from_dense(keep, q_len=300, kv_len=333, q_block=128, kv_block=97)
    kernel = sparsecore.compile(mask, device="cuda", backend=backend)
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 300, 64, generator=gen)
    k, v = (torch.randn(2, 2, 333, 64, generator=gen) for _ in range(2))
    out, lse = torch.compile(lambda q, k, v: kernel(q, k, v, return_lse=True), fullgraph=True)(
        *(t.to("cuda", torch.bfloat16) for t in (q, k, v)))
    want_out, want_lse = dense_attention(*(t.bfloat16().double().numpy() for t in (q, k, v)), expand_to_tokens(mask),
                                         64 ** -0.5)
    np.testing.assert_allclose(out.double().cpu().numpy(), want_out, atol=2e-2)
    np.testing.assert_allclose(lse.double().cpu().numpy(), want_lse, atol=2e-2)


def test_two_kernels_in_one_graph_and_traced_ops_around_them():
    torch._dynamo.reset()
    (mask_a, kernel_a), (mask_b, kernel_b) = masked_kernel(3), masked_kernel(4)

    def block(q, k, v):
        first = kernel_a(q * 2, k, v)
        return kernel_b(first + q, k, v) - 1
    q, k, v = inputs(2, 5)
    got = torch.compile(block, fullgraph=True, backend="aot_eager")(q, k, v)
    scale = 8 ** -0.5
    first = torch.from_numpy(expected(mask_a, q * 2, k, v, scale)[0])
    want = expected(mask_b, first + q.double(), k, v, scale)[0] - 1
    np.testing.assert_allclose(got.double().numpy(), want, atol=5e-5)


def test_gradients_through_a_differentiable_backend_under_compile_match_eager():
    """``portable`` keeps autograd's graph on drop masks: under torch.compile its call runs outside the graph (a
    graph break) so the gradients are kept; the op, whose backward raises, had made AOTAutograd fail."""
    torch._dynamo.reset()
    _, kernel = masked_kernel(6)
    q, k, v = inputs(1, 7)
    q.requires_grad_(True)
    torch.compile(lambda q, k, v: kernel(q, k, v), backend="aot_eager")(q, k, v).square().sum().backward()
    compiled, q.grad = q.grad, None
    kernel(q, k, v).square().sum().backward()
    assert torch.allclose(compiled, q.grad, atol=1e-6) and compiled.abs().sum() > 0


def test_a_triton_call_on_inputs_needing_gradients_runs_outside_the_graph_as_eagerly(triton_device):
    """``portable`` is a fallback on CUDA and the backend is chosen at the call: a drop mask's call on inputs needing
    gradients leaves the graph whichever backend runs it (as the docs now say); Triton's forward matches the oracle
    and its backward raises, as eagerly."""
    torch._dynamo.reset()
    keep = np.random.default_rng(14).random((2, 2, 2)) < 0.7
    keep[:, :, 0] = True
    mask = BlockMask.from_dense(keep, q_len=64, kv_len=64, q_block=32)
    kernel = sparsecore.compile(mask, device="cuda", warmup="wait")
    gen = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen).to(triton_device).requires_grad_() for _ in range(3))
    out = torch.compile(lambda q, k, v: kernel(q, k, v), backend="aot_eager")(q, k, v)
    assert kernel.backend.name == "triton"
    want, _ = expected(mask, *(t.detach().cpu() for t in (q, k, v)), 16 ** -0.5)
    np.testing.assert_allclose(out.detach().double().cpu().numpy(), want, atol=1e-3)
    with pytest.raises(NotImplementedError, match="backend 'triton' has no backward"):
        out.sum().backward()
    with pytest.raises(Exception, match="torch.no_grad"):
        torch.compile(lambda q, k, v: kernel(q, k, v), backend="aot_eager", fullgraph=True)(q, k, v)


def test_inputs_needing_gradients_raise_under_compile_where_no_backend_keeps_them():
    """An approximating mask has no differentiable backend: the op's backward raises when AOTAutograd traces it."""
    torch._dynamo.reset()
    mask, _ = masked_kernel(6)
    approximating = BlockMask(mask.num_heads, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices,
                              unselected=Unselected.parse("zeroth"))
    kernel = sparsecore.compile(approximating, device="cpu")
    q, k, v = inputs(1, 7)
    q.requires_grad_(True)
    with pytest.raises((NotImplementedError, torch._dynamo.exc.BackendCompilerFailed), match="inference-only"):
        torch.compile(lambda q, k, v: kernel(q, k, v), backend="aot_eager")(q, k, v).sum().backward()
    with torch.no_grad():                                  # inference: no backward, nothing raises
        torch.compile(lambda q, k, v: kernel(q, k, v), backend="aot_eager")(q, k, v)


@pytest.mark.parametrize("scales", [(0.1, 0.2, 0.3, 0.4), (1, 2, 3)])
def test_a_scale_that_changes_between_calls_compiles_under_fullgraph(scales):
    """No graph break (``fullgraph=True``) for a scale argument that changes between calls; Dynamo specializes the
    op's float argument, so each value compiles a graph of its own, up to its recompile limit. Checking the value in
    traced code broke the graph: math.isfinite on a symbolic float, and on an int, which Dynamo makes symbolic once
    it changes ("torch.* op returned non-Tensor")."""
    torch._dynamo.reset()
    mask, kernel = masked_kernel(12)
    q, k, v = inputs(1, 13)
    compiled = torch.compile(lambda q, k, v, s: kernel(q, k, v, scale=s), fullgraph=True, backend="aot_eager")
    for scale in scales:
        np.testing.assert_allclose(compiled(q, k, v, scale).double().numpy(), expected(mask, q, k, v, scale)[0],
                                   atol=2e-5)


@pytest.mark.parametrize("scale", [np.float64(0.3), Fraction(3, 10)])
def test_a_numpy_or_fraction_scale_runs_in_one_graph(scale):
    """``1 / np.sqrt(D)`` is a NumPy float64, which Dynamo traces as an array: the op's type check raised inside the
    trace (a graph break; under fullgraph=True an error saying "got ndarray")."""
    if isinstance(scale, Fraction) and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13):
        pytest.skip(f"torch {torch.__version__}'s Dynamo does not trace float() of a Fraction (2.13's does)")
    torch._dynamo.reset()
    mask, kernel = masked_kernel(12)
    q, k, v = inputs(1, 13)
    compiled = torch.compile(lambda q, k, v: kernel(q, k, v, scale=scale), fullgraph=True, backend="aot_eager")
    np.testing.assert_allclose(compiled(q, k, v).double().numpy(), expected(mask, q, k, v, float(scale))[0], atol=2e-5)


NUMPY_SCALES = [np.float64(0.3), np.float32(0.1), np.float16(0.5), np.int64(2)]


@pytest.mark.parametrize("as_argument", [False, True])
@pytest.mark.parametrize("scale", NUMPY_SCALES, ids=repr)
def test_a_numpy_scalar_scale_of_any_real_dtype_runs_in_one_graph(scale, as_argument):
    """Dynamo traces a NumPy scalar as a 0-d array: ``float()`` of it was a data-dependent value, which the op's float
    argument could not take (fullgraph=True: TorchRuntimeError, "Expected a value of type 'Optional[float]' for
    argument 'scale' but instead found type 'SymFloat'"). A value that changes between calls is a graph input: each
    call gets its own, one graph."""
    torch._dynamo.reset()
    mask, kernel = masked_kernel(12)
    q, k, v = inputs(1, 13)
    if as_argument:
        graphs = []

        def counting_backend(graph, example_inputs):
            graphs.append(graph)
            return graph.forward
        compiled = torch.compile(lambda q, k, v, s: kernel(q, k, v, scale=s), fullgraph=True, backend=counting_backend)
        for value in (scale, scale * 3):
            np.testing.assert_allclose(compiled(q, k, v, value).double().numpy(),
                                       expected(mask, q, k, v, float(value))[0], rtol=1e-5, atol=2e-5)
        assert len(graphs) == 1
    else:
        compiled = torch.compile(lambda q, k, v: kernel(q, k, v, scale=scale), fullgraph=True, backend="aot_eager")
        np.testing.assert_allclose(compiled(q, k, v).double().numpy(), expected(mask, q, k, v, float(scale))[0],
                                   rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("scale", [float("nan"), np.float64("nan"), np.float32("nan"), np.float64("inf"),
                                   np.float32(-3e38), np.True_], ids=repr)
def test_a_refused_scale_raises_the_eager_error_under_compile(scale, fullgraph):
    """The eager call's own error, type and message: a NaN NumPy scale under fullgraph=True arrived as Dynamo's
    TorchRuntimeError (its fake run met the data-dependent float), not the named ValueError."""
    torch._dynamo.reset()
    _, kernel = masked_kernel(8)
    q, k, v = inputs(1, 9)
    with pytest.raises((ValueError, TypeError)) as eager:
        kernel(q, k, v, scale=scale)
    compiled = torch.compile(lambda q, k, v: kernel(q, k, v, scale=scale), fullgraph=fullgraph, backend="aot_eager")
    with pytest.raises(type(eager.value)) as traced:
        compiled(q, k, v)
    assert str(traced.value) == str(eager.value)


@pytest.mark.parametrize("return_lse", [np.True_, 1, torch.tensor(True)], ids=repr)
def test_fullgraph_names_a_return_lse_that_is_not_a_bool(return_lse):
    """return_lse decides what the call returns, so it is checked while tracing: under fullgraph=True Dynamo's error
    holds the TypeError's message. Its making (the type's module, the value's repr) did not trace, and Dynamo said
    only "Dynamo does not know how to trace method `split` of class `str`" (or "repr() on tensor")."""
    torch._dynamo.reset()
    _, kernel = masked_kernel(8)
    q, k, v = inputs(1, 9)
    compiled = torch.compile(lambda q, k, v: kernel(q, k, v, return_lse=return_lse), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(Exception, match=r"return_lse: expected a bool \(True or False\), got .*pass bool\(return_lse\)"):
        compiled(q, k, v)
    with pytest.raises(TypeError) as eager:
        kernel(q, k, v, return_lse=return_lse)
    with pytest.raises(TypeError) as traced:                                  # without fullgraph: the eager error
        torch.compile(lambda q, k, v: kernel(q, k, v, return_lse=return_lse), backend="aot_eager")(q, k, v)
    assert str(traced.value) == str(eager.value)


def test_bad_arguments_are_named_under_compile():
    torch._dynamo.reset()
    _, kernel = masked_kernel(8)
    q, k, v = inputs(1, 9)
    for arguments, field in (({"scale": "0.1"}, "scale"), ({"return_lse": 1}, "return_lse")):
        with pytest.raises(Exception, match=field):
            torch.compile(lambda q, k, v: kernel(q, k, v, **arguments), backend="aot_eager")(q, k, v)
    # an int past float's range: the eager ValueError, not the fake tensor call's TorchRuntimeError
    with pytest.raises(ValueError, match="scale: expected a finite float"):
        torch.compile(lambda q, k, v: kernel(q, k, v, scale=10 ** 400), backend="aot_eager")(q, k, v)


@pytest.mark.parametrize("name", ["k", "v"])
@pytest.mark.parametrize("kind", ["ndarray", "list"])
def test_keys_or_values_that_are_not_tensors_are_named_under_compile(name, kind):
    """The eager call's TypeError. Reading ``requires_grad`` of each raised AttributeError, or Dynamo, which traces
    a NumPy array as a tensor, ran the call on it."""
    torch._dynamo.reset()
    _, kernel = masked_kernel(8)
    q, k, v = inputs(1, 9)
    bad = k.numpy() if kind == "ndarray" else [1.0]

    def call(q, k, v, bad):
        return kernel(q, bad, v) if name == "k" else kernel(q, k, bad)
    with pytest.raises(TypeError, match=f"{name}: backend 'portable' takes torch arrays, got {kind}"):
        torch.compile(call, backend="aot_eager")(q, k, v, bad)


def test_a_numpy_backends_traced_call_names_what_it_takes():
    """The traced check of k and v is the torch backends': a kernel of NumPy arrays (reference) given a tensor q
    says that it takes NumPy arrays, as eagerly (the traced check said 'takes torch arrays' of its NumPy k)."""
    from sparsecore.compiled_call import traced_call
    kernel = sparsecore.compile(BlockMask.full(1, 16, 16, 8), device="reference")
    array = np.zeros((1, 1, 16, 8), dtype=np.float32)
    with pytest.raises(TypeError, match="q: backend 'reference' takes numpy arrays, got Tensor"):
        traced_call(kernel, torch.from_numpy(array), array, array, None, False)


def test_a_layer_holding_a_new_kernel_each_step_runs_one_graph():
    """A method's new mask each step, held by the layer: the op finds the kernel through a tensor slot, so nothing a
    guard watches changes (an int slot was a constant: one recompile per mask, and the 9th failed under
    ``fullgraph=True``)."""
    class Attention(torch.nn.Module):
        kernel = None

        def forward(self, q, k, v):
            return self.kernel(q, k, v)

    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    layer = Attention()
    compiled = torch.compile(layer, fullgraph=True, backend=counting_backend)
    q, k, v = inputs(1, 5)
    for step in range(12):
        mask, layer.kernel = masked_kernel(100 + step)
        want, _ = expected(mask, q, k, v, 8 ** -0.5)
        np.testing.assert_allclose(compiled(q, k, v).double().numpy(), want, rtol=1e-5, atol=1e-6)
    assert len(graphs) == 1


@pytest.mark.parametrize("fresh", [False, True])
def test_fullgraph_names_the_remedies_where_gradients_would_leave_the_graph(fresh, monkeypatch):
    """``fresh``: as in a new process, where no earlier compiled call made the graph-break wrapper (it is made at first
    use). Dynamo traced its making, ``torch.compiler.disable``, and under fullgraph=True raised "Attempted to call
    function marked as skipped", naming neither sparsecore nor a remedy (the README promises both)."""
    torch._dynamo.reset()
    if fresh:
        monkeypatch.setattr(sparsecore.compiled_call, "_OUTSIDE_GRAPH", [])
    mask, kernel = masked_kernel(7)
    q, k, v = (t.requires_grad_() for t in inputs(1, 7))
    compiled = torch.compile(lambda q, k, v: kernel(q, k, v), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="torch.no_grad"):
        compiled(q, k, v)
    with torch.no_grad():
        want, _ = expected(mask, q, k, v, 8 ** -0.5)
        np.testing.assert_allclose(compiled(q, k, v).double().numpy(), want, rtol=1e-5, atol=1e-6)


def test_fullgraph_names_the_remedy_for_sparsecore_compile_in_a_fresh_process(monkeypatch):
    """The first thing compiled with ``fullgraph=True`` calls ``sparsecore.compile`` (no earlier graph break made its
    wrapper): the error names the remedy, not Dynamo's "Attempted to call function marked as skipped"."""
    torch._dynamo.reset()
    monkeypatch.setattr(sparsecore.compiled_call, "_COMPILE_OUTSIDE_GRAPH", [])
    mask, _ = masked_kernel(3)
    with pytest.raises(Exception, match="compile the mask outside the compiled region"):
        torch.compile(lambda q, k, v: sparsecore.compile(mask, device="cpu")(q, k, v), backend="aot_eager",
                      fullgraph=True)(*inputs(1, 3))
    torch._dynamo.reset()
    q, k, v = inputs(1, 3)
    got = torch.compile(lambda q, k, v: sparsecore.compile(mask, device="cpu")(q, k, v), backend="aot_eager")(q, k, v)
    np.testing.assert_allclose(got.double().numpy(), expected(mask, q, k, v, 8 ** -0.5)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("on_device", [False, True])
def test_sparsecore_compile_called_inside_compiled_code_runs_eagerly_and_matches_the_oracle(on_device):
    """A layer that compiles each step's mask in its forward (the per-layer, per-step path the cache serves), under
    ``torch.compile``: ``sparsecore.compile`` runs outside the graph (a graph break), the kernel's call is the op.
    Traced by Dynamo, compile stopped on the mask's fingerprint (TorchRuntimeError "data type '<i8' not
    understood"), and with ``fullgraph=True`` on ``str.split``, naming nothing of sparsecore's."""
    torch._dynamo.reset()

    class Attention(torch.nn.Module):
        mask = None

        def forward(self, q, k, v):
            return sparsecore.compile(self.mask, device="cpu")(q, k, v)

    layer = Attention()
    compiled = torch.compile(layer, backend="aot_eager")
    q, k, v = inputs(1, 21)
    for step in range(3):                                  # masks compile has not seen (nor fingerprinted)
        keep = np.random.default_rng(200 + step).random((4, 3, 4)) < 0.5
        mask = BlockMask.from_dense(keep, q_len=45, kv_len=50, q_block=16, kv_block=13)
        layer.mask = mask.to("cpu") if on_device else mask
        want, _ = expected(mask, q, k, v, 8 ** -0.5)
        np.testing.assert_allclose(compiled(q, k, v).double().numpy(), want, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="compile the mask outside the compiled region"):
        torch.compile(layer, backend="aot_eager", fullgraph=True)(q, k, v)
