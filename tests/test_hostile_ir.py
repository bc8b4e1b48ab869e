"""Hostile input to the IR's constructors: refused with ValueError/TypeError naming the field, within bounds.

Every call runs under :func:`hostile.bounded` (1 GiB more address space, 20 s): values that
claim huge sizes must be refused before anything is built in proportion to them. Valid
masks of extreme but legal sizes must keep every promise (density of a full mask is 1).
"""

from __future__ import annotations

import numpy as np
import torch
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from hostile import bounded, refused

from sparsecore import BlockMask
from sparsecore.ir.slicing import slice_mask

Q_OFF = [0, 16, 32, 40]
KV_OFF = [0, 32, 64, 96, 100]
INDPTR = [[0, 2, 3, 3], [3, 4, 6, 8]]
INDICES = [0, 2, 1, 3, 0, 1, 2, 3]
ROWS = [[[0, 2], [1], []], [[3], [0, 1], [2, 3]]]          # the same mask as lists

NOT_INTS = st.one_of(st.booleans(), st.floats(allow_nan=True), st.text(max_size=3), st.none(),
                     st.lists(st.integers(0, 3), min_size=1, max_size=2).map(tuple), st.just({"a": 1}),
                     st.just(np.float32(1.0)), st.just(np.bool_(True)), st.just(1 + 2j))
HUGE = st.integers(2**63, 2**70) | st.integers(-(2**70), -(2**63) - 1)


def make(**changes):
    fields = dict(num_heads=2, q_offsets=Q_OFF, kv_offsets=KV_OFF, indptr=INDPTR, indices=INDICES)
    fields.update(changes)
    return BlockMask(**fields)


@st.composite
def hostile_offsets(draw):
    """Boundaries that are wrong in one way: element types, int64 overflow, order, start, shape, claimed size."""
    good = list(draw(st.sampled_from([Q_OFF, KV_OFF])))
    kind = draw(st.sampled_from(["element", "overflow", "order", "start", "scalar", "2d", "empty", "huge"]))
    if kind == "element":
        good[draw(st.integers(0, len(good) - 1))] = draw(st.one_of(st.floats(), st.text(max_size=2), st.none(),
                                                                 st.booleans()))
        return good
    if kind == "overflow":
        return [0, 2**63 - 1, -(2**63)] if draw(st.booleans()) else [0, draw(HUGE)]
    if kind == "order":
        i = draw(st.integers(1, len(good) - 2))
        good[i], good[i + 1] = good[i + 1], draw(st.sampled_from([good[i], good[i] - 1, -5]))
        return good
    if kind == "start":
        return [draw(st.integers(1, 10) | st.integers(-10, -1))] + good[1:]
    if kind == "scalar":
        return draw(st.integers(0, 2**40))
    if kind == "2d":
        return [good]
    if kind == "empty":
        return draw(st.sampled_from([[], [0]]))
    return [0, draw(st.integers(2**56, 2**63 - 1))]   # 2 heads x this x 100 >= 2**62 pairs: no input is this long


@given(value=NOT_INTS | st.integers(max_value=0) | HUGE.filter(lambda x: x < 0))
def test_num_heads(value):
    refused(lambda: make(num_heads=value), "num_heads")


@given(offsets=hostile_offsets(), side=st.sampled_from(["q_offsets", "kv_offsets"]))
@example(offsets=[0, True, 32, 40], side="q_offsets")        # NumPy reads a bool among ints as 1: it was accepted
def test_offsets_in_the_constructor_and_from_lists(offsets, side):
    fields = (side, "q_offsets, kv_offsets")
    refused(lambda: make(**{side: offsets}), fields)
    other = {"q_offsets": Q_OFF, "kv_offsets": KV_OFF}
    other[side] = offsets
    refused(lambda: BlockMask.from_lists(ROWS, other["q_offsets"], other["kv_offsets"]), fields)


def test_offsets_that_overflow_int64_when_subtracted():
    """The issue's case: [0, 2**63-1, -2**63] has positive int64 differences after wrap-around."""
    refused(lambda: BlockMask.from_lists([[[0], [0]]], [0, 2**63 - 1, -(2**63)], [0, 4]), "q_offsets")


@given(bad=st.one_of(NOT_INTS.filter(lambda x: not isinstance(x, (tuple, str))), st.integers(4, 2**40),
                     st.integers(max_value=-1), HUGE, st.just({1: "x"}), st.just([[0]]), st.just(b"\x01")),
       where=st.tuples(st.integers(0, 1), st.integers(0, 2)))
def test_from_lists_takes_only_int_ids_in_range(bad, where):
    """0.7 is not block 0, True is not block 1, "1" is not block 1, a dict is not its keys."""
    rows = [[list(r) for r in head] for head in ROWS]
    h, i = where
    rows[h][i] = rows[h][i] + [bad] if not isinstance(bad, dict) else bad
    refused(lambda: BlockMask.from_lists(rows, Q_OFF, KV_OFF), f"lists[{h}][{i}]")


@pytest.mark.parametrize("row", [np.array([-1, 2]), torch.tensor([2, -3])], ids=["numpy", "torch"])
def test_from_lists_names_the_row_of_a_negative_id_in_an_array(row):
    """An array row is checked as a list row is: a negative id is refused naming ``lists[h][i]`` (not later, as
    ``indices[k]`` of the built lists, which the caller never wrote)."""
    rows = [[list(r) for r in head] for head in ROWS]
    rows[1][2] = row
    assert "lists[1][2]: key block" in str(refused(lambda: BlockMask.from_lists(rows, Q_OFF, KV_OFF), "lists[1][2]"))


def test_meta_nests_at_most_32_levels():
    """Levels below the top dict are counted (``validation.META_DEPTH``): 32 below it are taken, 33 refused."""
    assert make(meta=_deep(32)).meta == _deep(32)
    assert "nested deeper than 32 levels" in str(refused(lambda: make(meta=_deep(33)), "meta"))


@given(lists=st.one_of(st.integers(), st.text(max_size=3), st.none(), st.just({0: [[0]]}), st.just([]),
                       st.just([5]), st.just(["abc"]), st.just([[[0]] * 2]), st.just([[{0: 1}, [0], [0]]])))
def test_from_lists_structure(lists):
    refused(lambda: BlockMask.from_lists(lists, Q_OFF, KV_OFF), "lists")


def test_from_lists_examples_from_the_issue():
    for row, got in (([0.7], "float 0.7"), ([True], "bool True"), (["1"], "str '1'"), ([None], "NoneType None")):
        message = str(refused(lambda: BlockMask.from_lists([[row]], [0, 4], [0, 4, 8]), "lists[0][0]"))
        assert got in message
    assert "dict" in str(refused(lambda: BlockMask.from_lists([[{1: "a"}]], [0, 4], [0, 4, 8]), "lists[0][0]"))


def test_from_lists_does_not_materialize_an_endless_row():
    import itertools
    refused(lambda: BlockMask.from_lists([[itertools.count()]], [0, 4], [0, 4, 8]), "lists[0][0]")
    refused(lambda: BlockMask.from_lists([[range(10**12)]], [0, 4], [0, 4, 8]), "lists[0][0]")
    endless_rows = [itertools.repeat(np.array([0]))]                    # a head of endless rows: read 2 + 1
    assert "got more" in str(refused(lambda: BlockMask.from_lists(endless_rows, [0, 4, 8], [0, 4]), "lists[0]"))
    refused(lambda: BlockMask.from_lists(range(10**12), [0, 4], [0, 4, 8]), "lists")     # its length, first
    refused(lambda: BlockMask.from_lists((h for h in range(10**12)), [0, 4], [0, 4, 8]), "lists[0]")   # as read


def test_from_lists_refuses_more_heads_than_row_pointers_can_hold(monkeypatch):
    from sparsecore.ir import validation
    monkeypatch.setattr(validation, "INDEX_LIMIT", 10)                  # 3 heads of 2 query blocks at most
    assert BlockMask.from_lists([[[0], [0]]] * 3, [0, 4, 8], [0, 4]).num_heads == 3
    for lists, got in (([[[0], [0]]] * 4, "got 4;"), ((h for h in [[[0], [0]]] * 4), "got more;")):
        message = str(refused(lambda: BlockMask.from_lists(lists, [0, 4, 8], [0, 4]), "lists"))
        assert "at most 3 heads of 2 query blocks" in message and got in message


def _deep(depth: int) -> dict:
    meta: dict = {}
    for _ in range(depth):
        meta = {"x": meta}
    return meta


@given(meta=st.one_of(
    st.dictionaries(st.integers() | st.booleans() | st.none() | st.tuples(st.text(max_size=2)), st.integers(),
                    min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=3), st.sampled_from([float("nan"), float("inf"), object(), {1, 2}, b"x",
                                                          np.int64(3), 1j]), min_size=1, max_size=2),
    st.just({"a": {"b": [1, {2: 3}]}}), st.just(_deep(100)), st.just([("a", 1)]), st.text(max_size=3)))
def test_meta(meta):
    """Keys are not converted (the issue: {1: 'x'} became {'1': 'x'}); values must be JSON."""
    refused(lambda: make(meta=meta), "meta")


@given(budgets=st.one_of(st.lists(st.floats(0, 1), min_size=3, max_size=3), st.just([0.5]),
                         st.tuples(st.floats(0, 1), st.sampled_from([float("nan"), -0.1, 1.5, float("inf")])),
                         st.just(["a", "b"]), st.just(0.5), st.just([[0.1, 0.2]]), st.just([True, False])))
def test_budgets(budgets):
    refused(lambda: make(budgets=list(budgets) if isinstance(budgets, tuple) else budgets), "budgets")


@given(position=st.integers(0, 7), value=st.one_of(st.integers(4, 2**31 - 1), st.integers(-(2**31), -1), HUGE))
def test_indices_out_of_range(position, value):
    indices = list(INDICES)
    indices[position] = value
    refused(lambda: make(indices=indices), "indices")


@given(data=st.data())
def test_indptr(data):
    indptr = [list(r) for r in INDPTR]
    h, i = data.draw(st.integers(0, 1)), data.draw(st.integers(0, 3))
    indptr[h][i] = data.draw(st.one_of(st.integers(9, 2**40), st.integers(max_value=-1), HUGE,
                                       st.sampled_from([1.5, None, "2"])).filter(lambda x: x != INDPTR[h][i]))
    refused(lambda: make(indptr=indptr), ("indptr", "indices"))


def test_pointers_whose_int32_differences_wrap_around():
    """[0, 2**31 - 1, -(2**31 - 1), 0] looked non-decreasing to int32 differences: accepted with density 4.8e8."""
    big = 2**31 - 1
    refused(lambda: BlockMask(1, [0, 4, 8, 12], [0, 4, 8, 12], np.array([[0, big, -big, 0]]), np.array([], np.int32),
                              budgets=[0.5]), "indptr")


def test_budgets_beside_torch_lists():
    """bf16 budgets out of range reached NumPy's missing bf16 (a raw TypeError); NumPy budgets are taken as a host
    mask takes them (they were refused, first said to be on 'cpu' when refused for being on cpu)."""
    ptr, idx = torch.tensor([[0, 1, 2]]), torch.tensor([0, 1])
    refused(lambda: BlockMask(1, [0, 4, 8], [0, 4, 8], ptr, idx, torch.tensor([2.0], dtype=torch.bfloat16)),
            "budgets[0]=2.0")
    refused(lambda: BlockMask(1, [0, 4, 8], [0, 4, 8], ptr, idx, np.array([1.3])), "budgets[0]=1.3")
    assert BlockMask(1, [0, 4, 8], [0, 4, 8], ptr, idx, np.array([0.3])).budgets.tolist() == [0.3]


SIZE = st.integers(1, 2**40)
SMALL = st.integers(1, 16)
FITTING = st.integers(1, 8).flatmap(lambda block: st.tuples(st.integers(block + 1, 2 * block),
                                                            st.integers(block + 1, 2 * block), st.just(block)))
HOSTILE_SIZES = st.tuples(SMALL | SIZE | NOT_INTS | st.integers(max_value=0), SMALL | SIZE,
                          st.integers(1, 8) | NOT_INTS)
SIZES = st.integers(0, 3).flatmap(lambda pick: FITTING if pick == 0 else HOSTILE_SIZES)


@given(sizes=SIZES, heads=st.integers(1, 4))
def test_from_dense_checks_sizes_before_building_offsets(sizes, heads):
    """The issue: from_dense(..., q_len=3e8) allocated 4.6 GB before the shape error. Sizes that two blocks each way
    cover (FITTING, about a quarter of the calls) build a 2 x 2 block mask; any other call is refused."""
    q_len, kv_len, q_block = sizes
    mask = np.ones((heads, 2, 2), dtype=bool)
    valid = isinstance(q_len, int) and not isinstance(q_len, bool) and 1 <= q_len and isinstance(q_block, int) \
        and not isinstance(q_block, bool) and -(-q_len // q_block) == 2 and -(-kv_len // q_block) == 2
    if valid:
        with bounded():
            built = BlockMask.from_dense(mask, q_len, kv_len, q_block)
            assert (built.num_q_blocks, built.num_kv_blocks, built.q_len, built.kv_len) == (2, 2, q_len, kv_len)
    else:
        refused(lambda: BlockMask.from_dense(mask, q_len, kv_len, q_block), ("mask", "q_len", "kv_len", "q_block"))


def test_from_dense_example_from_the_issue():
    refused(lambda: BlockMask.from_dense(np.ones((1, 2, 2), bool), 3 * 10**9, 8, 1), ("mask", "q_offsets"))


@given(heads=st.integers(1, 2**20), q_len=SIZE, kv_len=SIZE, block=st.integers(1, 2**20))
def test_full_is_refused_or_exact_within_bounds(heads, q_len, kv_len, block):
    """A full mask either builds (density exactly 1, whatever its size) or is refused before it is built."""
    blocks = heads * -(-q_len // block) * -(-kv_len // block)
    legal = blocks <= 2**31 - 1 and heads * q_len * kv_len < 2**62
    assume(blocks <= 1 << 22 or not legal)          # legal but large: building it is the caller's choice
    if legal:
        with bounded():
            mask = BlockMask.full(heads, q_len, kv_len, block)
            assert mask.density() == 1.0 and (mask.density(per_head=True) == 1.0).all()
            assert mask.flops(8) == mask.dense_flops(8) == 4 * heads * q_len * kv_len * 8
    else:
        refused(lambda: BlockMask.full(heads, q_len, kv_len, block), ("q_block, kv_block", "q_len, kv_len"))


def test_density_of_huge_blocks_is_exact_or_refused():
    """The issue: blocks of 2**40 tokens made density() of a full mask 0.0 (int64 overflow)."""
    refused(lambda: BlockMask.full(1, 2**40, 2**40, 2**40), "q_len, kv_len: num_heads x q_len x kv_len")
    mask = BlockMask.full(3, 2**30, 2**30, 2**29)                        # 3 * 2**60 pairs: legal
    assert mask.density() == 1.0 and mask.flops(1) == 4 * 3 * 2**60


@pytest.mark.parametrize("call, field", [
    (lambda: BlockMask.uniform_offsets(2**40, 0), "block"),
    (lambda: BlockMask.uniform_offsets(1.5, 1), "length"),
    (lambda: BlockMask.full(True, 4, 4, 4), "num_heads"),
    (lambda: BlockMask.from_dense(np.ones((0, 1, 1), bool), 4, 4, 4), "mask"),
    (lambda: BlockMask.from_dense([[["x"]]], 4, 4, 4), "mask"),
    (lambda: make().select_heads([5]), "heads"),
    (lambda: make().select_heads(["a"]), "heads"),
    (lambda: make().flops(0), "head_dim"),
    (lambda: make().token_mask(limit=10), "token_mask"),
    (lambda: make().render(5), "path"),
    (lambda: make().render("x.png", heads=[7]), "heads"),
    (lambda: make().render("x.png", heads="01"), "heads"),
    (lambda: make().render("picture"), "path"),                  # matplotlib would write picture.png
    (lambda: make().render("picture.pdf"), "path"),
    (lambda: make().select_heads([[0, 1]]), "heads"),
    (lambda: make().select_heads(slice(0, 2, 0)), "heads"),
    (lambda: make().uniform_block_size("x"), "which"),
    (lambda: make().largest_block_size("Q"), "which"),
    (lambda: make().row(True, 0), "h: expected an int"),
    (lambda: make().row(0, 0.5), "i: expected an int"),
])
def test_other_entry_points(call, field):
    refused(call, field)


def test_a_device_string_torch_does_not_know_gets_a_remedy():
    """``mask.to("gpu")`` gave torch's list cut at 120 characters, mid-word, and no remedy."""
    mask = BlockMask.from_dense(np.eye(3, dtype=bool)[None], 30, 30, 10)
    with pytest.raises(ValueError, match=r"device: 'gpu' is not a torch device; pass e.g. 'cpu', 'cuda'.* at start of "
                                         r"device string: gpu\)$"):
        mask.to("gpu")


# ------------------------------------------------------------------------- derived masks and calls (a review's)

@pytest.mark.parametrize("on_device", [False, True])
def test_selections_and_slices_past_the_int32_limit_are_refused_before_building(monkeypatch, on_device):
    """Repeated heads and cut blocks list more entries than the mask: past int32 the row pointers would wrap into a
    corrupt mask; the limit is lowered here (2**31 entries need ~60 GiB) to the 8 entries of the mask."""
    from sparsecore.ir import csr, validation
    mask = make() if not on_device else make().to("cpu")
    monkeypatch.setattr(csr, "INDEX_LIMIT", 8)
    monkeypatch.setattr(validation, "INDEX_LIMIT", 8)
    assert mask.select_heads([1, 0]).nnz == 8                     # at the limit: fine
    with pytest.raises(ValueError, match=r"heads: the selection lists 16 key blocks, more than the int32 index "
                                         r"limit 8; select fewer heads"):
        mask.select_heads([0, 1, 0, 1])
    assert slice_mask(mask, (0, 40), (0, 100)).nnz == 8
    with pytest.raises(ValueError, match=r"kv_range_sets: the slices would list 10 key blocks, more than the int32 "
                                         r"index limit 8; cut fewer blocks"):
        slice_mask(mask, (0, 40), ((0, 16), (24, 100)))              # key block 0 cut in two


def test_small_refusals_name_their_field():
    mask = make()
    with pytest.raises(ValueError, match=r"heads: expected a non-empty selection of 0\.\.1, got \[\]"):
        mask.select_heads([])                                      # [] reads as float64: named as empty, not dtype
    for limit in ("x", None, 1.5):
        with pytest.raises(TypeError, match="limit: expected an int"):
            mask.token_mask(limit=limit)
    device = mask.to("cpu")
    for field, change in (("budgets", dict(budgets=torch.full((2,), 0.5, device="meta"))),
                          ("indptr", dict(indptr=device.indptr.to("meta"), indices=device.indices.to("meta"))),
                          ("q_offsets", dict(q_offsets=torch.tensor(Q_OFF, device="meta")))):
        lists = dict(indptr=device.indptr, indices=device.indices) if field != "q_offsets" else {}
        with pytest.raises(ValueError, match=rf"{field}: expected a tensor with values, got one on the 'meta' device"):
            make(**{**lists, **change})


def test_a_device_index_past_the_machines_count_is_refused_by_name(monkeypatch):
    """As compile() refuses it; torch's own 'invalid device ordinal' came through mask.to before."""
    from sparsecore.ir import placement
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device: expected one of this machine's 1 cuda device\(s\), numbered from 0, "
                                         r"got 'cuda:5'"):
        placement.run_device("cuda:5")
    with pytest.raises(ValueError, match="got 'cuda:5'"):
        make().to("cuda:5")


def test_unchecked_masks_keep_checked_fields_and_read_only_host_lists():
    indptr, indices = np.array(INDPTR, dtype=np.int32), np.array(INDICES, dtype=np.int32)
    mask = BlockMask.unchecked(np.int64(2), np.array(Q_OFF), np.array(KV_OFF), indptr, indices, np.ones(2))
    assert type(mask.num_heads) is int
    assert not (mask.indptr.flags.writeable or mask.indices.flags.writeable or mask.budgets.flags.writeable)
    with pytest.raises(TypeError, match="unselected: expected a sparsecore.ir.Unselected, got str"):
        BlockMask.unchecked(2, Q_OFF, KV_OFF, indptr, indices, np.ones(2), unselected="drop")


@pytest.mark.parametrize("length, block", [(2**33, 1), (10**18, 1), (2**40, 64)])
def test_uniform_offsets_refuses_more_blocks_than_int32_ids_before_building_them(length, block):
    """``BlockMask.uniform_offsets`` built its ``length / block`` boundaries before any check: 2**33 one-token blocks
    asked for 64 GiB (a MemoryError under the bound), 10**20 for NumPy's bare "Maximum allowed size exceeded". Block
    ids and row pointers are int32, so no mask can have more blocks than int32 indexes."""
    message = str(refused(lambda: BlockMask.uniform_offsets(length, block), "length, block"))
    assert f"{-(-length // block):,} blocks" in message and "use larger blocks" in message
    assert BlockMask.uniform_offsets(10, 3).tolist() == [0, 3, 6, 9, 10]


def test_uniform_offsets_refuses_a_length_past_int64_by_name():
    """2**70 tokens in two blocks: NumPy's OverflowError ("Python int too large to convert to C long") before."""
    assert "length: expected fewer than 2**62 tokens" in str(refused(lambda: BlockMask.uniform_offsets(2**70, 2**69),
                                                                     "length"))


def test_from_lists_stops_reading_rows_once_their_ids_pass_the_int32_limit(monkeypatch):
    """The ids of all rows were counted against int32's limit only after every row was read into an array: lists of
    ``range`` rows (a sliding window written as ranges) claiming 2**31 ids in all built them all (16 GiB of int64
    ids) before the refusal. The limit is lowered to 10 ids here; rows are read only until their ids pass it."""
    from sparsecore.ir import validation
    monkeypatch.setattr(validation, "INDEX_LIMIT", 10)
    read = []

    class Row:                                            # a row of every key block, noting that it was read
        def __iter__(self):
            read.append(1)
            return iter(range(4))
    assert BlockMask.from_lists([[Row(), []], [[0], [1]]], [0, 4, 8], [0, 4, 8, 12, 16]).nnz == 6
    read.clear()
    message = str(refused(lambda: BlockMask.from_lists([[Row(), Row()]] * 3, [0, 4, 8], [0, 4, 8, 12, 16]), "lists"))
    assert "more than the int32 index limit 10" in message and "use larger blocks" in message
    assert len(read) == 3, f"read {len(read)} of 6 rows; 3 rows of 4 ids pass 10"
