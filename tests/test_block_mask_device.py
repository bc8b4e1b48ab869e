"""Masks whose lists live in torch tensors: same validation, same views, explicit conversions.

CI has no GPU: torch CPU tensors take the device code paths (every torch op, the one
host read of the validation flags), which are device-agnostic by construction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecore import BlockMask
from sparsecore.ir import Unselected, csr

from test_block_mask_validation import INDICES, INDPTR, KV_OFF, Q_OFF
from test_block_mask_validation import test_invalid_fields_raise_naming_the_field as _host_cases

LIST_FIELDS = ("indptr", "indices", "budgets")
DEVICE_CASES = [p for p in _host_cases.pytestmark[0].args[1]
                if set(p[0]) <= set(LIST_FIELDS) and np.asarray(next(iter(p[0].values()))).dtype.kind in "iuf"]


def device_fields(**changes):
    fields = dict(indptr=INDPTR, indices=INDICES, budgets=np.array([0.5, 0.25]))
    fields.update(changes)
    return {name: torch.tensor(np.asarray(value)) for name, value in fields.items()}    # copies


@pytest.mark.parametrize("changes, error, message", DEVICE_CASES)
def test_device_lists_are_checked_with_the_host_messages(changes, error, message):
    with pytest.raises(error, match=message):
        BlockMask(2, Q_OFF, KV_OFF, **device_fields(**changes))


def test_mixed_host_and_device_lists_are_refused():
    with pytest.raises(TypeError, match="indices: expected a torch tensor like the other lists"):
        BlockMask(2, Q_OFF, KV_OFF, torch.as_tensor(INDPTR), INDICES)


def test_device_mask_owns_copies_of_its_tensors():
    fields = device_fields()
    mask = BlockMask(2, Q_OFF, KV_OFF, **fields)
    fields["indices"][0] = 3
    assert mask.indices[0] == 0 and mask.indices.dtype == torch.int32 and mask.budgets.dtype == torch.float64
    assert mask.device == torch.device("cpu") and not mask.on_host


BUDGET_CASES = [p for p in _host_cases.pytestmark[0].args[1] if set(p[0]) == {"budgets"}]


@pytest.mark.parametrize("budgets", [
    [0.5, 1], (1, 0), np.array([1, 0], dtype=np.uint8), np.array([0.5, 0.25], dtype=np.float32),
    torch.tensor([1, 0]), torch.tensor([0.5, 0.25], dtype=torch.float16), torch.tensor([0.5, 1], dtype=torch.bfloat16),
    torch.tensor([0.5, 0.25], dtype=torch.float64)], ids=repr)
def test_device_lists_take_budgets_as_host_lists_do(budgets):
    """Budgets that a host mask takes (integers, other floats, a Python sequence) a device mask takes too, as the same
    float64 values on its device (it refused all but float tensors on its device)."""
    host = BlockMask(2, Q_OFF, KV_OFF, INDPTR, INDICES, budgets=budgets)
    device = BlockMask(2, Q_OFF, KV_OFF, torch.tensor(INDPTR), torch.tensor(INDICES), budgets=budgets)
    assert device.budgets.dtype == torch.float64 and device.budgets.device == device.device
    if torch.is_tensor(budgets):
        budgets[0] = 0                                       # the caller's tensor: the mask holds its own copy
    np.testing.assert_array_equal(device.budgets.numpy(), host.budgets)


def test_from_dense_of_a_torch_map_takes_a_budget_list():
    dense = BlockMask.from_dense(torch.ones(1, 1, 1, dtype=torch.bool), 4, 4, 4, budgets=[0.5])
    assert dense.budgets.tolist() == [0.5] and not dense.on_host
    assert dense == BlockMask.from_dense(np.ones((1, 1, 1), dtype=bool), 4, 4, 4, budgets=[0.5])


@pytest.mark.parametrize("changes, error, message", BUDGET_CASES + [
    (dict(budgets=torch.tensor([True, False])), TypeError, "budgets: expected a float array, got dtype bool"),
    (dict(budgets=torch.zeros((), dtype=torch.int8).expand(2**40)), ValueError, "budgets: expected shape")])
def test_budgets_of_device_lists_are_checked_with_the_host_messages(changes, error, message):
    """Host budgets are checked as a host mask's; tensors of a wrong dtype or shape before any copy."""
    with pytest.raises(error, match=message):
        BlockMask(2, Q_OFF, KV_OFF, torch.tensor(INDPTR), torch.tensor(INDICES), **changes)


@st.composite
def host_masks(draw):
    heads = draw(st.integers(1, 4))
    q_len, kv_len = draw(st.integers(1, 200)), draw(st.integers(1, 200))
    q_block, kv_block = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    shape = (heads, -(-q_len // q_block), -(-kv_len // kv_block))
    dense = rng.random(shape) < draw(st.sampled_from([0.0, 0.2, 0.7, 1.0]))
    if draw(st.booleans()):      # arbitrary key boundaries: the O(kept blocks) token count
        cuts = np.unique(rng.integers(1, kv_len, size=min(kv_len - 1, 6))) if kv_len > 1 else np.array([], int)
        kv_offsets = np.concatenate([[0], cuts, [kv_len]])
        dense = rng.random((heads, shape[1], len(kv_offsets) - 1)) < 0.5
        lists = [[np.nonzero(r)[0] for r in head] for head in dense]
        return BlockMask.from_lists(lists, BlockMask.uniform_offsets(q_len, q_block), kv_offsets)
    return BlockMask.from_dense(dense, q_len, kv_len, q_block, kv_block, meta={"method": "test"})


@settings(max_examples=60)
@given(mask=host_masks(), data=st.data())
def test_device_views_equal_host_views(mask, data):
    device = mask.to("cpu")
    assert not device.on_host and device.device == torch.device("cpu")
    assert device == mask and device.fingerprint() == mask.fingerprint()
    np.testing.assert_array_equal(device.to_dense().numpy(), mask.to_dense())
    np.testing.assert_array_equal(device.row_lengths.numpy(), mask.row_lengths)
    np.testing.assert_array_equal(device.kept_pairs().numpy(), mask.kept_pairs())
    q_sizes, kv_sizes = np.diff(mask.q_offsets), np.diff(mask.kv_offsets)       # by definition, entry by entry
    assert device.kept_pairs().tolist() == [
        sum(int(q_sizes[i] * kv_sizes[j]) for i in range(mask.num_q_blocks)
            for j in mask.indices[mask.indptr[h, i]:mask.indptr[h, i + 1]]) for h in range(mask.num_heads)]
    assert device.density() == mask.density() and device.flops(8) == mask.flops(8)
    heads = data.draw(st.lists(st.integers(0, mask.num_heads - 1), min_size=1, max_size=5), label="heads")
    assert device.select_heads(heads) == mask.select_heads(heads)
    assert mask.select_heads(heads) == BlockMask.from_lists(
        [[mask.row(h, i) for i in range(mask.num_q_blocks)] for h in heads], mask.q_offsets, mask.kv_offsets,
        budgets=mask.budgets[heads], meta=mask.meta)
    longer = max(mask.q_len, mask.kv_len) + 5
    assert device.with_padding(longer) == mask.with_padding(longer)


@settings(max_examples=40)
@given(mask=host_masks())
def test_block_bits_unpack_to_the_block_map(mask):
    """The packed map (PASA's approximation pass reads it) holds bit j % 32 of word j // 32 for listed block j."""
    device = mask.to("cpu")
    want = mask.to_dense()
    for packed in (csr.to_block_bits(mask.indptr, mask.indices, mask.num_kv_blocks),
                   csr.to_block_bits(device.indptr, device.indices, device.num_kv_blocks).numpy()):
        assert packed.dtype == np.int32 and packed.shape == (*want.shape[:2], -(-mask.num_kv_blocks // 32))
        bits = (packed.astype(np.int64)[..., None] & 0xFFFFFFFF) >> np.arange(32) & 1
        unpacked = bits.reshape(*want.shape[:2], -1).astype(bool)
        np.testing.assert_array_equal(unpacked[..., :mask.num_kv_blocks], want)
        assert not unpacked[..., mask.num_kv_blocks:].any()


@pytest.mark.parametrize("num_kv_blocks", [31, 32, 33, 64])
def test_block_bits_have_one_word_per_32_blocks(num_kv_blocks):
    """``ceil(NB / 32)`` words a row, also where NB is a multiple of 32 (no spare word): each word's bits written
    out here one block at a time, host and device lists alike."""
    dense = np.random.default_rng(num_kv_blocks).random((2, 3, num_kv_blocks)) < 0.5
    mask = BlockMask.from_dense(dense, 12, 4 * num_kv_blocks, 4)
    words = (num_kv_blocks + 31) // 32
    expected = np.zeros((2, 3, words), dtype=np.int64)
    for j in range(num_kv_blocks):
        expected[:, :, j // 32] |= dense[:, :, j].astype(np.int64) << (j % 32)
    device = mask.to("cpu")
    for packed in (csr.to_block_bits(mask.indptr, mask.indices, num_kv_blocks),
                   csr.to_block_bits(device.indptr, device.indices, num_kv_blocks).numpy()):
        assert packed.shape == (2, 3, words)
        np.testing.assert_array_equal(packed.astype(np.int64) & 0xFFFFFFFF, expected)


def test_scatter_rows_writes_only_the_counted_slots_of_the_given_rows():
    """Row ``rows[r]`` gets ``padded[h, r, :counts[h, r]]``; the padding beyond a row's count goes to the spare slot,
    never into the next row's first entry (a row left out of ``rows`` keeps what it held)."""
    counts = torch.tensor([[2, 3, 1], [1, 2, 2]])                      # 2 heads x 3 rows, 11 entries
    indptr = csr.indptr_from_counts(counts)
    indices = torch.full((int(counts.sum()) + 1,), -1, dtype=torch.int32)
    rows = torch.tensor([0, 2])
    padded = torch.arange(100, 112).reshape(2, 2, 3)                     # [H, R, K]: K = 3 > every written count
    csr.scatter_rows(indices, indptr, rows, padded, counts[:, rows])
    expected = np.full(int(counts.sum()), -1)
    for h in range(2):
        for r, row in enumerate(rows.tolist()):
            start = int(indptr[h, row])
            expected[start:start + int(counts[h, row])] = padded[h, r, :int(counts[h, row])].numpy()
    np.testing.assert_array_equal(indices[:-1].numpy(), expected)


def test_a_device_mask_on_the_host_keeps_what_it_does_with_unlisted_blocks():
    mask = BlockMask.from_dense(np.eye(4, dtype=bool)[None], 16, 16, 4)
    approx = BlockMask.unchecked(1, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices, mask.budgets, None,
                                 Unselected("zeroth"))
    assert approx.to("cpu").to_host().unselected == Unselected("zeroth")


SELECTORS = [np.array([2, 2, 1], dtype=dt) for dt in (np.int8, np.int16, np.int32, np.uint8, np.uint16, np.uint32,
                                                      np.uint64)] + [
    slice(None, None, -1), slice(2, None, -2), np.arange(3)[::-1], np.array([0, 1, 2])[::2],
    np.array([True, False, True]), torch.tensor([False, True, True]), torch.tensor([2, 0], dtype=torch.uint8)]


@pytest.mark.parametrize("heads", SELECTORS, ids=lambda s: repr(s)[:40])
def test_device_select_heads_equals_the_hosts_for_every_selector(heads):
    """Head ids of any integer dtype and stride, slices with negative steps and bool masks pick the same heads on a
    device mask as on the host (torch read uint8 ids as a bool mask and refused other small ints and negative
    strides). Heads differ in density, so a wrong pick shows in the blocks and budgets."""
    mask = BlockMask.from_lists([[[0], []], [[0, 1], [1]], [[0, 1], [0, 1]]], [0, 4, 8], [0, 4, 8])
    picked = np.arange(3)[heads] if isinstance(heads, slice) else np.asarray(heads)
    picked = np.nonzero(picked)[0] if picked.dtype == np.bool_ else picked.astype(np.int64)
    host, device = mask.select_heads(heads), mask.to("cpu").select_heads(heads)
    assert host.num_heads == device.num_heads == len(picked) == device.indptr.shape[0]
    np.testing.assert_array_equal(host.to_dense(), mask.to_dense()[picked])
    np.testing.assert_array_equal(device.to_host().to_dense(), mask.to_dense()[picked])
    np.testing.assert_array_equal(device.budgets.numpy(), mask.budgets[picked])
    assert device == host


def test_kept_pairs_counts_tokens_by_definition():
    mask = BlockMask.from_lists([[[0, 2], [2], []]], [0, 4, 8, 9], [0, 5, 10, 13])
    expected = 4 * (5 + 3) + 4 * 3                         # rows of 4, 4 and 1 tokens; blocks of 5, 5, 3
    assert mask.kept_pairs().tolist() == [expected] == mask.to("cpu").kept_pairs().tolist()


@pytest.mark.parametrize("on_device", [False, True])
def test_kept_pairs_are_counted_once_per_host_mask_and_anew_for_a_device_one(monkeypatch, on_device):
    """A planner counts a mask at every layer that runs it (LVSA's one host mask a step); on other blocks that walks
    every entry (85 ms on the host at CogVideoX 1.5's 2x joint mask), so a host count is kept, read-only. A device
    count is queued anew on the caller's stream: a kept tensor could be read on another stream before it is
    written, or edited in place by a caller."""
    mask = BlockMask.from_lists([[[0, 2], [2], []]], [0, 4, 8, 9], [0, 5, 10, 13])
    mask = mask.to("cpu") if on_device else mask
    counted = []
    original = csr.kept_key_tokens
    monkeypatch.setattr(csr, "kept_key_tokens", lambda *args: counted.append(1) or original(*args))
    first, second = mask.kept_pairs(), mask.kept_pairs()
    assert first.tolist() == second.tolist() == [4 * (5 + 3) + 4 * 3]
    assert mask.density() == first.tolist()[0] / (9 * 13)
    if on_device:
        assert len(counted) == 3 and second is not first
        first -= 1                                   # the caller's own tensor
        assert mask.kept_pairs().tolist() == [4 * (5 + 3) + 4 * 3]
    else:
        assert len(counted) == 1 and second is first
        with pytest.raises(ValueError, match="read-only"):
            first[0] = 0


def test_conversions_are_explicit_and_memoized(tmp_path):
    mask = BlockMask.from_dense(np.eye(4, dtype=bool)[None], 16, 16, 4)
    device = mask.to("cpu")
    assert mask.to("cpu") is device and device.to("cpu") is device and device.to_host() == mask
    assert isinstance(device.indices, torch.Tensor) and isinstance(device.to_host().indices, np.ndarray)
    assert BlockMask.load(device.save(tmp_path / "m.safetensors")) == mask


def test_copies_to_a_device_are_owned_by_the_caller():
    """``copy_to`` (sessions keeping masks in host memory) is not memoized, moves only torch lists, and round-trips
    between the host and a GPU into pinned memory where one is present."""
    square = BlockMask.from_dense(np.eye(4, dtype=bool)[None], 16, 16, 4)
    mask = BlockMask(1, square.q_offsets, square.kv_offsets, square.indptr, square.indices,
                     unselected=Unselected("zeroth"))
    on_cpu = mask.to("cpu")
    assert on_cpu.copy_to("cpu") is on_cpu
    with pytest.raises(ValueError, match="copy_to moves the torch lists of a device mask"):
        mask.copy_to("cpu")
    if torch.cuda.is_available():
        on_gpu = on_cpu.copy_to("cuda")
        back = on_gpu.copy_to("cpu")
        assert on_gpu.device.type == "cuda" and "cuda:0" not in on_cpu.derived and back.indices.is_pinned()
        assert back.to_host() == mask and on_gpu.to_host() == mask and back.unselected == mask.unselected


def test_unselected_enters_the_structure_and_the_file(tmp_path):
    mask = BlockMask.from_dense(np.eye(4, dtype=bool)[None], 16, 16, 4)
    grouped = BlockMask(1, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices,
                        unselected=Unselected("grouped-first-order", 2))
    assert grouped != mask and grouped.fingerprint() != mask.fingerprint()
    loaded = BlockMask.load(grouped.save(tmp_path / "g.safetensors"))
    assert loaded.unselected == Unselected.parse("grouped-first-order:2") and loaded == grouped
    with pytest.raises(ValueError, match="unselected.kind: expected one of"):
        Unselected("linear")
    with pytest.raises(ValueError, match="only the 'grouped-first-order' kind takes a group size"):
        Unselected("zeroth", 4)


def test_unchecked_takes_lists_as_they_are():
    mask = BlockMask.from_dense(np.eye(3, dtype=bool)[None], 6, 6, 2).to("cpu")
    rebuilt = BlockMask.unchecked(1, mask.q_offsets, mask.kv_offsets, mask.indptr, mask.indices, mask.budgets,
                                  {"method": "x"})
    assert rebuilt.indices is mask.indices and rebuilt == BlockMask.from_dense(np.eye(3, dtype=bool)[None], 6, 6, 2,
                                                                               meta={"method": "x"})


def test_queued_uploads_are_copies_the_caller_owns():
    """``queued`` (per-call small arrays) gives a new tensor at every call, never an alias of the host array; the
    HostPack holds tensors of any dtype and shape in one buffer and gives new ones at every call."""
    from sparsecore.ir.uploads import HostPack, queued
    values = np.arange(5, dtype=np.int64)
    first, second = queued(values, "cpu"), queued(values, "cpu")
    values[0] = 7
    assert first.tolist() == [0, 1, 2, 3, 4] and first.data_ptr() != second.data_ptr()
    tensors = {"ids": torch.arange(7, dtype=torch.int32), "flags": torch.tensor([[True, False], [False, True]]),
               "wide": torch.arange(6, dtype=torch.int64).view(2, 3)}
    pack = HostPack(tensors)
    got, again = pack.to(torch.device("cpu")), pack.to(torch.device("cpu"))
    for name, tensor in tensors.items():
        assert torch.equal(got[name], tensor) and got[name].dtype == tensor.dtype
        start = got[name].data_ptr() - got["ids"].data_ptr()                  # "ids" starts the buffer
        assert start % HostPack.ALIGN == 0 and got[name].data_ptr() != again[name].data_ptr()


def test_host_side_tensors_stay_on_the_host_under_a_default_device():
    """``torch.device(...)`` / ``torch.set_default_device`` (a GPU, here "meta") does not move what is host memory by
    design: a HostPack's buffer (on a GPU default its pinned buffer would be refused) and a mixed text batch's row
    index (made on the host, then sent)."""
    from sparsecore.integrations.diffusers.text_groups import batch_rows
    from sparsecore.ir.uploads import HostPack
    tensors = {"ids": torch.arange(7, dtype=torch.int32), "wide": torch.arange(6, dtype=torch.int64).view(2, 3)}
    with torch.device("meta"):
        pack = HostPack(tensors)
        index = batch_rows([0, 2], torch.device("cpu"))
    got = pack.to(torch.device("cpu"))
    assert all(torch.equal(got[name], tensor) for name, tensor in tensors.items())
    assert index.device.type == "cpu" and index.tolist() == [0, 2]


def test_per_call_copies_refuse_a_cuda_graph_capture(monkeypatch):
    """A CUDA graph captured around ``queued`` would replay the copy from its freed pinned source: it raises, naming
    the capture, before it copies anything (so a capture is seen here without a GPU); outside one it copies."""
    from sparsecore.ir.uploads import moved, queued
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture.*out of the captured region"):
        queued(np.arange(3), "cuda")
    with pytest.raises(RuntimeError, match="held in host memory back to the device inside a CUDA graph capture"):
        moved(torch.arange(3), torch.device("cuda"))
    assert queued(np.arange(3), "cpu").tolist() == [0, 1, 2]           # no capture on the host


def test_per_call_copies_refuse_an_npu_graph_capture(monkeypatch):
    """The same under an NPU graph capture, asked through ``torch.npu`` (what torch_npu installs) on the device's own
    stream, with a remedy that names no CUDA mode. Faked here: without torch_npu, torch cannot name an "npu" device."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from sparsecore.ir.uploads import refuse_capture
    state = {"current": 0, "capturing": {1}}                             # device 1's stream captures

    @contextmanager
    def on(device):
        before, state["current"] = state["current"], device.index
        yield
        state["current"] = before

    npu = SimpleNamespace(is_current_stream_capturing=lambda: state["current"] in state["capturing"],
                          current_device=lambda: state["current"], device=on)
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    monkeypatch.setattr(torch, "device", lambda name: SimpleNamespace(type="npu", index=int(name[-1])))
    with pytest.raises(RuntimeError, match=r"a plan's copy inside an NPU graph \(aclgraph\) capture: "
                                           r"because\. Keep sparsecore's calls out of the captured region[^.]*$"):
        refuse_capture("npu:1", "a plan's copy", "because")
    refuse_capture("npu:0", "a plan's copy")                             # device 0 does not capture
    state["capturing"] = {0}
    with pytest.raises(RuntimeError, match="replays would reuse this call's host-side plan"):
        refuse_capture("npu:0", "a plan's copy")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available: HostCounts copies from CUDA only")
def test_counts_go_back_to_pinned_host_memory_without_staying_on_the_gpu(monkeypatch):
    """``HostCounts``: CUDA counts' pinned host copies, readable after a synchronize, in chunks of slots (a new
    chunk when one is full, the earlier slots kept by their holders, freed with them)."""
    from sparsecore.ir.uploads import HostCounts
    monkeypatch.setattr(HostCounts, "CHUNK", 2)
    counts = HostCounts()
    slots = [counts.add(torch.arange(n, device="cuda").sum()) for n in (10, 100, 1000)]
    torch.cuda.synchronize()
    assert [int(s) for s in slots] == [45, 4950, 499_500]
    assert all(s.device.type == "cpu" and s.is_pinned() for s in slots)
    assert slots[0].untyped_storage().data_ptr() == slots[1].untyped_storage().data_ptr() != \
        slots[2].untyped_storage().data_ptr() == counts._chunk.untyped_storage().data_ptr()
    held = [v for v in vars(counts).values() if isinstance(v, torch.Tensor)]    # the full chunk is the slots' alone
    assert len(held) == 1 and not isinstance(getattr(counts, "_chunks", None), list)


def test_counts_elsewhere_stay_where_they_are():
    from sparsecore.ir.uploads import HostCounts
    count = torch.tensor(3)
    assert HostCounts().add(count) is count


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available: the budgets' division on CUDA")
def test_default_budgets_on_cuda_equal_the_hosts():
    """CUDA divides by a host scalar as a product with its reciprocal: budgets one ulp off the host's (0.6 against
    0.6000000000000001 for 3 of 5 key blocks), so a device mask and its host copy compared unequal."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        keep = rng.random((2, int(rng.integers(1, 9)), int(rng.integers(1, 40)))) < 0.5
        host = BlockMask.from_dense(keep, keep.shape[1] * 4, keep.shape[2] * 4, 4)
        device = BlockMask(2, host.q_offsets, host.kv_offsets, torch.as_tensor(host.indptr, device="cuda"),
                           torch.as_tensor(host.indices, device="cuda"))
        assert np.array_equal(device.budgets.cpu().numpy(), host.budgets) and device == host


@pytest.mark.parametrize("device", ["meta", "mps", "xpu", "cuda", "cuda:0"])
def test_moving_a_mask_to_a_device_this_machine_lacks_names_it(device):
    """``mask.to("mps")`` raised AttributeError on every machine (torch.mps has no current_device), "meta" another,
    and "cuda" without CUDA torch's AssertionError."""
    kind = torch.device(device).type
    if kind != "meta" and getattr(torch, kind).is_available():
        pytest.skip(f"torch.{kind}.is_available() is True here: the mask moves")
    mask = BlockMask.full(2, 256, 256, 64)
    for move in (mask.to, mask.to("cpu").copy_to):
        with pytest.raises(ValueError, match=rf"device: expected a device this machine has, got '{device}'"):
            move(device)


def test_a_device_without_an_index_is_the_current_one(monkeypatch):
    """``mask.to("xpu")`` uploads to the current device: on a machine of two whose current one is 1, ``xpu:1``."""
    from sparsecore.ir.placement import run_device
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "current_device", lambda: 1)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 2)
    assert run_device("xpu") == torch.device("xpu", 1) and run_device("xpu:0") == torch.device("xpu", 0)
