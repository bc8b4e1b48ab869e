"""Hostile arguments to ``sparsecore.compile`` and to compiled kernels: named errors, bounded work.

``compile`` checks the mask, the device string (type, known kind, ``kind:N`` form), the
backend name and the options before anything else; a kernel call checks q, k, v (type,
rank, sizes against the mask, dtypes, devices), ``scale`` and ``return_lse`` before any
lowering. A mask that claims sizes no input has (a 476-byte file with one block of 2**28
tokens) compiles in microseconds and refuses mismatched inputs without planning; a mask
mixing tiny and huge blocks is planned in memory bounded by what its rows keep, not by the
largest block times the number of blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hostile import bounded, refused, run_bounded

import sparsecore
from sparsecore import BlockMask, UnsupportedError


def mask() -> BlockMask:
    return BlockMask.from_dense(np.random.default_rng(1).random((4, 3, 2)) < 0.6, 40, 30, 16)


def tensors(dtype=torch.float32, heads=4, kv_heads=2, q_len=40, kv_len=30, dim=8, batch=1):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, q_len, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g).to(dtype)
    return q, k, torch.randn(batch, kv_heads, kv_len, dim, generator=g).to(dtype)


AVAILABLE = {d for d in sparsecore.known_devices()
             if any(d in b.capabilities.devices and b.unavailable_reason(d) is None
                    for b in sparsecore.registered_backends().values())}


@given(device=st.one_of(st.integers(), st.none(), st.floats(), st.lists(st.just("cpu"), min_size=1, max_size=2),
                        st.binary(max_size=3)))
def test_device_of_the_wrong_type(device):
    """The issue: device=["cpu"] blamed "options". (A torch.device is taken as its string:
    tests/test_compile_api.py.)"""
    refused(lambda: sparsecore.compile(mask(), device=device), "device")


@given(device=st.one_of(
    st.text(max_size=8).filter(lambda s: s.partition(":")[0] not in sparsecore.known_devices()),
    st.sampled_from(sparsecore.known_devices()).flatmap(
        lambda kind: st.sampled_from([":", ":abc", ":-1", ":1.5", ":0:1", ": 0", ":\u0661", ":99999999"]).map(
            lambda tail: kind + tail))))
def test_device_strings_that_name_no_device(device):
    """The issue: device="cpu:abc" raised torch's RuntimeError."""
    refused(lambda: sparsecore.compile(mask(), device=device), "device")


@pytest.mark.parametrize("device", ["cpu:1", "reference:1", "cpu:7"])
def test_a_device_index_on_a_host_device_is_refused_at_compile_and_check(device):
    """The host is one device: "cpu:1" or "reference:1" was taken by compile, check and apply (a kernel "for"
    cpu:1 that ran on the one CPU), where torch has no such device (apply: tests/test_hostile_apply.py)."""
    from sparsecore.check import device_problem
    error = refused(lambda: sparsecore.compile(mask(), device=device), "device")
    assert f"pass {device.split(':')[0]!r}" in str(error), str(error)
    assert device_problem(device) is not None and "device" in device_problem(device)
    sparsecore.compile(mask(), device=device.split(":")[0] + ":0")        # index 0 names the one device


@pytest.mark.parametrize("device", sorted(set(sparsecore.known_devices()) - AVAILABLE - {"reference"}))
def test_a_device_that_cannot_run_here_says_so_at_compile(device):
    refused(lambda: sparsecore.compile(mask(), device=device), f"device {device!r}", types=(RuntimeError,))


@given(backend=st.one_of(st.integers(), st.lists(st.text(max_size=2), max_size=2), st.just(b"portable"),
                         st.text(max_size=8).filter(lambda s: s not in sparsecore.registered_backends()),
                         st.sampled_from(sorted(set(sparsecore.registered_backends()) - {"portable"}))))
def test_backend_names(backend):
    refused(lambda: sparsecore.compile(mask(), device="cpu", backend=backend), "backend",
            types=(ValueError, TypeError, UnsupportedError))


@given(options=st.one_of(
    st.dictionaries(st.sampled_from(["tile", "block_m", "chunk", "x"]), st.integers(), min_size=1, max_size=2),
    st.builds(dict, chunk_elements=st.one_of(st.integers(max_value=0), st.booleans(), st.floats(), st.text(max_size=2),
                                             st.none())),
    st.builds(dict, chunk_elements=st.lists(st.integers(), max_size=2))))
def test_options(options):
    fields = tuple(options) + ("compile(): options",)
    refused(lambda: sparsecore.compile(mask(), device="cpu", **options), fields)


@given(mask_=st.one_of(st.none(), st.integers(), st.just(np.ones((1, 2, 2), bool)), st.text(max_size=3)))
def test_mask_argument(mask_):
    refused(lambda: sparsecore.compile(mask_, device="cpu"), "mask")


# ------------------------------------------------------------------------------------- calls
@st.composite
def bad_call(draw):
    """Kernel-call arguments wrong in one way, with the field names an error must mention."""
    q, k, v = tensors()
    kind = draw(st.sampled_from(["type", "rank", "batch0", "dim0", "heads", "length", "kv_len", "kv_mismatch", "gqa",
                                 "dtype", "mixed_dtype", "scale", "lse", "numpy"]))
    kwargs: dict = {}
    fields: tuple = ()
    if kind == "type":
        which = draw(st.sampled_from("qkv"))
        bad = draw(st.sampled_from([None, 3, "q", [[1.0]]]))
        q, k, v = (bad if n == which else t for n, t in zip("qkv", (q, k, v)))
        fields = (which,)
    elif kind == "numpy":
        q = q.numpy()
        fields = ("q",)
    elif kind == "rank":
        q = q[0]
        fields = ("q",)
    elif kind == "batch0":
        q, k, v = tensors(batch=0)
        fields = ("q",)
    elif kind == "dim0":
        q, k, v = tensors(dim=0)
        fields = ("q", "head_dim")
    elif kind == "heads":
        q, _, _ = tensors(heads=draw(st.sampled_from([1, 3, 5, 8])))
        fields = ("q",)
    elif kind == "length":
        q, _, _ = tensors(q_len=draw(st.sampled_from([1, 39, 41, 4000])))
        fields = ("q",)
    elif kind == "kv_len":
        _, k, v = tensors(kv_len=draw(st.sampled_from([1, 29, 31])))
        fields = ("k",)
    elif kind == "kv_mismatch":
        v = v[:, :, :-1]
        fields = ("k, v",)
    elif kind == "gqa":
        _, k, v = tensors(kv_heads=3)
        fields = ("k",)
    elif kind == "dtype":
        dtype = draw(st.sampled_from([torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8]))
        q, k, v = (t.to(dtype) for t in (q, k, v))
        fields = ("dtype",)
    elif kind == "mixed_dtype":
        k = k.double()
        fields = ("q, k, v",)
    elif kind == "scale":
        kwargs["scale"] = draw(st.sampled_from([float("nan"), float("inf"), "0.5", True, 1j, [0.5], torch.tensor(1.0)]))
        fields = ("scale",)
    else:
        kwargs["return_lse"] = draw(st.sampled_from(["no", 1, None, np.bool_(True), "True"]))
        fields = ("return_lse",)
    return q, k, v, kwargs, fields


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_a_missing_tensor_is_named(which):
    """None for any of q, k, v (v=None once reached the kernel, which failed on None.reshape)."""
    q, k, v = tensors()
    args = [None if name == which else t for name, t in zip("qkv", (q, k, v))]
    kernel = sparsecore.compile(mask(), device="cpu")
    refused(lambda: kernel(*args), (which,), types=(TypeError,))


@given(call=bad_call())
def test_kernel_calls(call):
    q, k, v, kwargs, fields = call
    kernel = sparsecore.compile(mask(), device="cpu")
    refused(lambda: kernel(q, k, v, **kwargs), fields, types=(ValueError, TypeError, UnsupportedError))


def test_the_issue_call_examples():
    kernel = sparsecore.compile(mask(), device="cpu")
    refused(lambda: kernel(*tensors(dim=0)), "head_dim")                       # was ZeroDivisionError
    refused(lambda: kernel(*tensors(batch=0)), "q")                            # was a mask planned from nothing
    refused(lambda: kernel(*tensors(), return_lse="no"), "return_lse")


@pytest.mark.parametrize("flag", [np.bool_(True), np.array(True), torch.tensor(True)], ids=["numpy", "0-d", "torch"])
def test_a_non_python_bool_flag_is_named_by_its_type_with_a_remedy(flag):
    """``return_lse=np.True_`` read 'expected a bool, got bool True' (NumPy's type is also named bool)."""
    kernel = sparsecore.compile(mask(), device="cpu")
    with pytest.raises(TypeError, match=r"return_lse: expected a bool \(True or False\), got (numpy|torch)\.\w+ .*; "
                                        r"pass bool\(return_lse\)"):
        kernel(*tensors(), return_lse=flag)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_a_nested_tensor_is_named_with_a_remedy(which, layout):
    """A ``torch.nested`` tensor (variable-length batches) as q, k or v: reading its shape raised torch's
    "Internal error: NestedTensorImpl doesn't support sizes. Please file an issue." (strided layout), or, for q of the
    jagged layout, a shape mismatch against the mask naming a symbolic length."""
    q, k, v = tensors(batch=2)
    given = {"q": q, "k": k, "v": v}
    given[which] = torch.nested.nested_tensor(list(given[which].unbind(0)), layout=layout)
    kernel = sparsecore.compile(mask(), device="cpu")
    message = str(refused(lambda: kernel(given["q"], given["k"], given["v"]), (which,), types=(TypeError,)))
    assert message.startswith(f"{which}: expected dense values, got a nested tensor") and "unbind" in message


# ------------------------------------------------------------------------------- claimed sizes
def test_a_small_file_claiming_a_huge_block_compiles_and_refuses_small_inputs_in_a_bounded_process(tmp_path):
    """The issue: a 476-byte mask file with one block of 2**28 tokens made compile(device="cpu") take 25 s and
    reach 11 GB. Run in a fresh process under a hard 1 GiB address-space limit (and 60 s)."""
    path = BlockMask.from_lists([[[0]]], [0, 2**28], [0, 2**28]).save(tmp_path / "claim.safetensors")
    assert path.stat().st_size < 600
    result = run_bounded(f"""
        import time, torch, sparsecore
        from sparsecore import BlockMask
        began = time.monotonic()
        mask = BlockMask.load({str(path)!r})
        for device in ("cpu", "reference"):
            kernel = sparsecore.compile(mask, device=device)
            q = torch.randn(1, 1, 16, 8)
            if device == "reference":
                q = q.numpy()
            try:
                kernel(q, q, q)
            except ValueError as err:
                assert str(err).startswith("q: expected [B, 1, 268435456, D]"), err
            else:
                raise AssertionError("accepted")
        print(mask.density(), mask.flops(64), round(time.monotonic() - began, 1))
        """, memory=1 << 30, seconds=60)
    assert result.returncode == 0, result.stderr[-3000:]
    density, flops, seconds = result.stdout.split()
    assert float(density) == 1.0 and int(flops) == 4 * 2**56 * 64 and float(seconds) < 10


def test_portable_padding_follows_what_rows_keep_not_the_largest_block():
    """A row keeping 1000 one-token blocks and one of 100,000 tokens: padding every block to the largest would
    gather 1001 x 100,000 key tokens (12.8 GB of keys at D=16); bounded to 512 MiB here."""
    kv_offsets = np.concatenate([np.arange(0, 1001), [1000 + 100_000]])
    wide = BlockMask.from_lists([[list(range(1001)), [0, 1000]]], [0, 4, 8], kv_offsets)
    q, k, v = tensors(heads=1, kv_heads=1, q_len=8, kv_len=101_000, dim=16)
    with bounded(headroom=512 << 20):
        out, lse = sparsecore.compile(wide, device="cpu")(q, k, v, return_lse=True)
    dense = torch.softmax(q[:, :, :4] @ k.transpose(-1, -2) / 4, dim=-1) @ v
    assert torch.allclose(out[:, :, :4], dense, atol=1e-5)
    keep = torch.cat([k[:, :, :1], k[:, :, 1000:]], dim=2), torch.cat([v[:, :, :1], v[:, :, 1000:]], dim=2)
    two = torch.softmax(q[:, :, 4:] @ keep[0].transpose(-1, -2) / 4, dim=-1) @ keep[1]
    assert torch.allclose(out[:, :, 4:], two, atol=1e-5) and torch.isfinite(lse).all()


def test_portable_cuts_a_row_whose_scores_exceed_the_chunk_budget():
    """One 8192-token block keeping 8192 keys: 67M scores (268 MB in float32, several copies with the LSE) in
    one piece (about 780 MB of address space at its peak); cut into query pieces of chunk_elements / 8192 rows
    (about 200 MB), it runs within 512 MiB."""
    one = BlockMask.from_lists([[[0]]], [0, 8192], [0, 8192])
    q, k, v = tensors(heads=1, kv_heads=1, q_len=8192, kv_len=8192, dim=16)
    with bounded(headroom=512 << 20):
        out, lse = sparsecore.compile(one, device="cpu")(q, k, v, return_lse=True)
    rows = slice(4000, 4100)
    scores = q[0, 0, rows] @ k[0, 0].T / 4
    assert torch.allclose(out[0, 0, rows], torch.softmax(scores, -1) @ v[0, 0], atol=1e-5)
    assert torch.allclose(lse[0, 0, rows], torch.logsumexp(scores, -1), atol=1e-4)


@pytest.mark.parametrize("scale, error", [("x", TypeError), (True, TypeError), ([0.1], TypeError),
                                          (float("nan"), ValueError), (float("inf"), ValueError)])
def test_block_mass_scale(scale, error):
    from sparsecore.search import block_mass
    q = torch.randn(1, 2, 64, 16, generator=torch.Generator().manual_seed(0))
    offsets = np.array([0, 32, 64])
    refused(lambda: block_mass(q, q, offsets, offsets, scale=scale), "scale", types=(error,))
