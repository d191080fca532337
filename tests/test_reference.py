"""The NumPy oracle (``pydeepep.reference``) on small cases checked by hand: HT dispatch and combine, the FP8 cast
and its numerics, UE8M0 packing, LL dispatch and combine. Every expected value below is written out or derived in
the test from the definitions in DESIGN.md section 3, never by calling the function under test."""

import numpy as np
import pytest

from pydeepep import reference

f32 = np.float32


def rows(*values, hidden=4):
    """[len(values), hidden] float32, row i filled with values[i]."""
    return np.array([[v] * hidden for v in values], dtype=np.float32).reshape(len(values), hidden)


# ---------------------------------------------------------------------------------------------------------------
# A two-rank routing used by several HT tests. E = 4, E_loc = 2: experts 0, 1 on rank 0; experts 2, 3 on rank 1.
#   rank 0: token 0 -> experts 0, 2 (both ranks); token 1 -> expert 3 (rank 1); token 2 -> experts 1, 0 (rank 0 only)
#   rank 1: token 0 -> experts 2, 1 (both ranks); token 1 -> nowhere
TOPK = [np.array([[0, 2], [3, -1], [1, 0]]), np.array([[2, 1], [-1, -1]])]
WEIGHTS = [np.array([[0.5, 0.25], [0.75, 0.125], [1.0, 2.0]], f32), np.array([[3.0, 4.0], [5.0, 6.0]], f32)]
XS = [rows(1, 2, 3), rows(10, 20)]


def test_dispatch_orders_rows_by_source_rank_then_source_token():
    (x0, _, _, _, src0), (x1, _, _, _, src1) = reference.dispatch(XS, TOPK, WEIGHTS, 4)
    assert src0.tolist() == [[0, 0], [0, 2], [1, 0]]
    assert src1.tolist() == [[0, 0], [0, 1], [1, 0]]
    assert x0[:, 0].tolist() == [1, 3, 10] and x1[:, 0].tolist() == [1, 2, 10]
    assert src0.dtype == np.int64 and x0.dtype == np.float32 and x0.shape == (3, 4)


def test_dispatch_sends_a_token_once_to_a_rank_holding_two_of_its_experts():
    (_, idx0, _, _, src0), _ = reference.dispatch(XS, TOPK, WEIGHTS, 4)
    # token 2 of rank 0 names experts 1 and 0, both on rank 0: one row carrying both local ids
    assert src0.tolist().count([0, 2]) == 1
    assert idx0[1].tolist() == [1, 0]


def test_dispatch_rebases_expert_ids_and_marks_experts_elsewhere():
    (_, idx0, _, _, _), (_, idx1, _, _, _) = reference.dispatch(XS, TOPK, WEIGHTS, 4)
    assert idx0.tolist() == [[0, -1], [1, 0], [-1, 1]]  # rows: r0t0 [0, 2], r0t2 [1, 0], r1t0 [2, 1]
    assert idx1.tolist() == [[-1, 0], [1, -1], [0, -1]]  # rows: r0t0 [0, 2], r0t1 [3, -1], r1t0 [2, 1]
    assert idx0.dtype == np.int64


def test_dispatch_zeroes_weights_of_experts_elsewhere_and_of_empty_slots():
    (_, _, w0, _, _), (_, _, w1, _, _) = reference.dispatch(XS, TOPK, WEIGHTS, 4)
    assert w0.tolist() == [[0.5, 0.0], [1.0, 2.0], [0.0, 4.0]]
    assert w1.tolist() == [[0.0, 0.25], [0.75, 0.0], [3.0, 0.0]]  # the -1 slot's 0.125 is dropped too
    assert w0.dtype == np.float32


def test_dispatch_counts_received_tokens_per_local_expert():
    (_, _, _, n0, _), (_, _, _, n1, _) = reference.dispatch(XS, TOPK, WEIGHTS, 4)
    # expert 0: r0t0, r0t2; expert 1: r0t2, r1t0; expert 2: r0t0, r1t0; expert 3: r0t1
    assert n0.tolist() == [2, 2] and n1.tolist() == [2, 1]
    assert n0.dtype == np.int32


@pytest.mark.parametrize(
    "alignment, want0, want1",
    [(1, [2, 2], [2, 1]), (2, [2, 2], [2, 2]), (3, [3, 3], [3, 3]), (128, [128, 128], [128, 128])],
)
def test_dispatch_rounds_counts_up_to_the_expert_alignment(alignment, want0, want1):
    (_, _, _, n0, _), (_, _, _, n1, _) = reference.dispatch(XS, TOPK, None, 4, expert_alignment=alignment)
    assert n0.tolist() == want0 and n1.tolist() == want1


def test_dispatch_alignment_keeps_an_idle_expert_at_zero():
    [(_, _, _, counts, _)] = reference.dispatch([rows(1)], [np.array([[1]])], None, 4, expert_alignment=8)
    assert counts.tolist() == [0, 8, 0, 0]  # one rank, four local experts, only expert 1 used


def test_dispatch_without_weights_returns_none_for_them():
    results = reference.dispatch(XS, TOPK, None, 4)
    assert [r[2] for r in results] == [None, None]


def test_dispatch_takes_a_rank_with_no_tokens():
    xs = [np.zeros((0, 4), f32), rows(7, 8)]
    topk = [np.zeros((0, 2), np.int64), np.array([[0, 3], [2, -1]])]
    (x0, idx0, _, n0, src0), (_, idx1, _, n1, src1) = reference.dispatch(xs, topk, None, 4)
    assert src0.tolist() == [[1, 0]] and x0[:, 0].tolist() == [7] and idx0.tolist() == [[0, -1]]
    assert src1.tolist() == [[1, 0], [1, 1]] and idx1.tolist() == [[-1, 1], [0, -1]]
    assert n0.tolist() == [1, 0] and n1.tolist() == [1, 1]


def test_dispatch_every_token_to_one_rank_leaves_the_others_empty():
    # R = 3, E = 6: experts 4, 5 live on rank 2
    xs = [rows(1, 2), rows(3), rows(4, 5, 6)]
    topk = [np.array([[4, 5], [5, -1]]), np.array([[4, 4]]), np.array([[5, 4], [-1, 4], [4, -1]])]
    results = reference.dispatch(xs, topk, None, 6)
    for rank in (0, 1):
        x, idx, _, n, src = results[rank]
        assert x.shape == (0, 4) and idx.shape == (0, 2) and src.shape == (0, 2) and n.tolist() == [0, 0]
    x, idx, _, n, src = results[2]
    assert src.tolist() == [[0, 0], [0, 1], [1, 0], [2, 0], [2, 1], [2, 2]]
    assert x[:, 0].tolist() == [1, 2, 3, 4, 5, 6]
    assert idx.tolist() == [[0, 1], [1, -1], [0, 0], [1, 0], [-1, 0], [0, -1]]
    assert n.tolist() == [6, 3]  # (token, slot) pairs: expert 4 six times (r1t0 twice), expert 5 three times


def test_dispatch_with_one_expert_per_token():
    xs = [rows(1, 2, 3), rows(4)]
    topk = [np.array([[1], [-1], [0]]), np.array([[1]])]  # E = 2, one expert per rank
    (_, idx0, _, n0, src0), (x1, _, _, n1, src1) = reference.dispatch(xs, topk, None, 2)
    assert src0.tolist() == [[0, 2]] and idx0.tolist() == [[0]] and n0.tolist() == [1]
    assert src1.tolist() == [[0, 0], [1, 0]] and x1[:, 0].tolist() == [1, 4] and n1.tolist() == [2]


def test_dispatch_with_thirty_two_experts_per_token():
    # E = 64 on 2 ranks (E_loc = 32); the token picks the even experts 0, 2, ..., 62: 16 on each rank
    topk = [np.arange(0, 64, 2)[None, :]]
    weights = [np.arange(1, 33, dtype=f32)[None, :]]
    (_, idx0, w0, n0, _), (_, idx1, w1, n1, _) = reference.dispatch(
        [rows(1), np.zeros((0, 4), f32)], topk + [np.zeros((0, 32), np.int64)], weights + [np.zeros((0, 32), f32)], 64
    )
    want0 = [2 * k if k < 16 else -1 for k in range(32)]
    want1 = [-1 if k < 16 else 2 * k - 32 for k in range(32)]
    assert idx0.tolist() == [want0] and idx1.tolist() == [want1]
    assert w0.tolist() == [[k + 1 if k < 16 else 0 for k in range(32)]]
    assert w1.tolist() == [[0 if k < 16 else k + 1 for k in range(32)]]
    assert n0.tolist() == [1, 0] * 16 and n1.tolist() == [1, 0] * 16


def test_dispatch_passes_other_dtypes_through_unchanged():
    xs = [np.array([[1, 2], [3, 4]], np.int16), np.array([[5, 6]], np.int16)]
    (x0, *_), (x1, *_) = reference.dispatch(xs, [np.array([[1], [0]]), np.array([[0]])], None, 2)
    # E = 2, one expert per rank: rank 0 gets r0t1 and r1t0; rank 1 gets r0t0
    assert x0.dtype == np.int16 and x0.tolist() == [[3, 4], [5, 6]] and x1.tolist() == [[1, 2]]


def test_dispatch_carries_fp8_pairs_row_by_row():
    q = [rows(1, 2, 3, hidden=256), rows(4, hidden=256)]
    scales = [np.array([[0.5, 1], [2, 4], [8, 16]], f32), np.array([[32, 64]], f32)]
    xs = [(q[0], scales[0]), (q[1], scales[1])]
    (recv0, *_), (recv1, *_) = reference.dispatch(xs, TOPK[:1] + [np.array([[3, 0]])], None, 4)
    assert isinstance(recv0, tuple) and len(recv0) == 2
    assert recv0[0][:, 0].tolist() == [1, 3, 4] and recv0[1].tolist() == [[0.5, 1], [8, 16], [32, 64]]
    assert recv1[0][:, 0].tolist() == [1, 2, 4] and recv1[1].tolist() == [[0.5, 1], [2, 4], [32, 64]]


def test_dispatch_carries_ue8m0_packed_scales_unchanged():
    # UE8M0-packed scales are int32 words [N, ceil(H / 512)]: they travel with their rows, bits unchanged.
    q = [rows(1, 2, hidden=512), rows(3, hidden=512)]
    packed = [np.array([[0x7F7E7D7C], [-1]], np.int32), np.array([[0x01020304]], np.int32)]
    xs = [(q[0], packed[0]), (q[1], packed[1])]
    # E = 2, one expert per rank: rank 0 gets r0t1 and r1t0; rank 1 gets r0t0
    (recv0, *_), (recv1, *_) = reference.dispatch(xs, [np.array([[1], [0]]), np.array([[0]])], None, 2)
    assert recv0[1].dtype == np.int32 and recv0[1].tolist() == [[-1], [0x01020304]]
    assert recv1[1].tolist() == [[0x7F7E7D7C]] and recv0[0][:, 0].tolist() == [2, 3]


def test_dispatch_refuses_mismatched_rows_and_bad_arguments():
    with pytest.raises(ValueError, match="rows"):
        reference.dispatch([rows(1, 2)], [np.array([[0]])], None, 2)
    with pytest.raises(ValueError, match="multiple"):
        reference.dispatch(XS, TOPK, None, 3)
    for alignment in (0, True, 2**31):  # True is no count; 2**31 leaves the int32 the counts are reported in
        with pytest.raises(ValueError, match="expert_alignment"):
            reference.dispatch(XS, TOPK, None, 4, expert_alignment=alignment)
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        reference.dispatch(XS, [TOPK[0], np.array([[4, 0], [0, 0]])], None, 4)


@pytest.mark.parametrize("index_dtype", [np.int64, np.int32])
def test_dispatch_layout_on_a_routing_checked_by_hand(index_dtype):
    # E = 4 on 2 ranks (experts 0, 1 on rank 0; 2, 3 on rank 1). Token 0 names experts 0 and 1 (rank 0, counted once
    # there), token 1 nothing, token 2 expert 3 twice (rank 1 once; the expert count counts both slots).
    topk = np.array([[0, 1], [-1, -1], [3, 3]], index_dtype)
    per_rank, per_expert, in_rank = reference.dispatch_layout(topk, 4, 2)
    assert per_rank.dtype == np.int32 and per_rank.tolist() == [1, 1]
    assert per_expert.dtype == np.int32 and per_expert.tolist() == [1, 1, 0, 2]
    assert in_rank.dtype == np.bool_ and in_rank.tolist() == [[True, False], [False, False], [False, True]]


def test_dispatch_counts_agree_with_the_layout():
    rng = np.random.default_rng(3)
    topk = [np.where(rng.random((9, 3)) < 0.2, -1, rng.integers(0, 8, (9, 3))) for _ in range(4)]
    xs = [np.zeros((9, 2), f32)] * 4
    results = reference.dispatch(xs, topk, None, 8)
    layouts = reference.dispatch_layout(topk, 8, 4)
    per_expert = sum(layout[1] for layout in layouts)
    per_rank = sum(layout[0] for layout in layouts)
    for rank, (_, _, _, counts, src) in enumerate(results):
        assert counts.tolist() == per_expert[2 * rank : 2 * rank + 2].tolist()
        assert src.shape[0] == per_rank[rank]


# ---------------------------------------------------------------------------------------------------------------
# HT combine.


def test_combine_sums_what_each_rank_sends_back():
    # rank 0 received r0t0, r0t2, r1t0; rank 1 received r0t0, r0t1, r1t0 (the routing above)
    srcs = [np.array([[0, 0], [0, 2], [1, 0]]), np.array([[0, 0], [0, 1], [1, 0]])]
    ys = [rows(1, 2, 4), rows(8, 16, 32)]
    out0, out1 = reference.combine(ys, srcs, [3, 2])
    assert out0[:, 0].tolist() == [1 + 8, 16, 2]
    assert out1[:, 0].tolist() == [4 + 32, 0]  # token 1 of rank 1 went nowhere: 0
    assert out0.dtype == np.float32 and out0.shape == (3, 4) and out1.shape == (2, 4)


def test_combine_inverts_dispatch_for_bf16_values():
    # Dispatch, send every row straight back: each token comes back times the number of ranks it reached. With two
    # ranks the doubling is exact in BF16, so the result is bitwise x, 2x or 0.
    rng = np.random.default_rng(7)
    hidden, num_experts = 256, 8
    mantissa = rng.integers(128, 256, (2, 5, hidden)).astype(f32)  # 8 significant bits: BF16-representable
    sign = np.where(rng.random((2, 5, hidden)) < 0.5, f32(-1), f32(1))
    xs = [
        sign[r] * mantissa[r] * f32(2.0**-7) * f32(2.0) ** rng.integers(-20, 20, (5, 1)).astype(f32) for r in range(2)
    ]
    topk = [np.array([[0, 5], [1, 2], [-1, 6], [3, 0], [-1, -1]]), np.array([[7, 4], [0, -1], [2, 1], [6, 6], [5, 3]])]
    reached = [np.array([2, 1, 1, 1, 0]), np.array([1, 1, 1, 1, 2])]  # E_loc = 4: ranks reached, by hand
    results = reference.dispatch(xs, topk, None, num_experts)
    outs = reference.combine([r[0] for r in results], [r[4] for r in results], [5, 5])
    for rank in range(2):
        assert np.array_equal(outs[rank], xs[rank] * reached[rank][:, None].astype(f32))


def test_combine_inverts_dispatch_over_four_ranks_for_small_integers():
    xs = [rows(1, -3), rows(64, 5), rows(-7), rows(0, 9)]
    topk = [np.array([[0, 7], [2, 4]]), np.array([[1, 3], [6, 0]]), np.array([[1, 2]]), np.array([[-1, 5], [7, 6]])]
    reached = [[2, 2], [2, 2], [2], [1, 1]]  # E = 8, E_loc = 2: expert e on rank e // 2
    results = reference.dispatch(xs, topk, None, 8)
    outs = reference.combine([r[0] for r in results], [r[4] for r in results], [2, 2, 1, 2])
    for rank in range(4):
        assert np.array_equal(outs[rank][:, 0], xs[rank][:, 0] * np.array(reached[rank], f32))


def test_combine_adds_ranks_in_ascending_order_in_float32():
    # Token 0 of rank 0 comes back from ranks 0, 1, 2 with 2^20, -2^20, 2^-10. Ascending: (2^20 - 2^20) + 2^-10 =
    # 2^-10. Descending would give (2^-10 - 2^20) + 2^20 = -2^20 + 2^20 = 0 in float32.
    srcs = [np.array([[0, 0]])] * 3
    ys = [rows(2.0**20, hidden=2), rows(-(2.0**20), hidden=2), rows(2.0**-10, hidden=2)]
    out = reference.combine(ys, srcs, [1, 0, 0])[0]
    assert out.tolist() == [[2.0**-10] * 2]


def test_combine_adds_bias0_then_bias1_after_the_ranks():
    # y = 2^-10, bias0 = 2^20, bias1 = -2^20: (y + b0) + b1 = 2^20 + (-2^20) = 0 in float32 (2^-10 is lost in the
    # first add). Adding the biases first, or bias1 before bias0, would give 2^-10 or a different value.
    ys = [rows(2.0**-10, hidden=2)]
    biases = [(rows(2.0**20, hidden=2), rows(-(2.0**20), hidden=2))]
    assert reference.combine(ys, [np.array([[0, 0]])], [1], biases=biases)[0].tolist() == [[0.0, 0.0]]
    # and the order inside: y = 2^20, bias0 = -2^20, bias1 = 2^-10 gives 2^-10 (bias1 first would give 0)
    ys = [rows(2.0**20, hidden=2)]
    biases = [(rows(-(2.0**20), hidden=2), rows(2.0**-10, hidden=2))]
    assert reference.combine(ys, [np.array([[0, 0]])], [1], biases=biases)[0].tolist() == [[2.0**-10] * 2]


def test_combine_gives_tokens_that_went_nowhere_their_biases():
    biases = [(rows(1.5, 2.5, hidden=2),), None]
    out0, out1 = reference.combine([np.zeros((0, 2), f32)] * 2, [np.zeros((0, 2), np.int64)] * 2, [2, 1], biases=biases)
    assert out0.tolist() == [[1.5, 1.5], [2.5, 2.5]] and out1.tolist() == [[0.0, 0.0]]


def test_combine_rounds_once_to_bf16_at_the_end():
    # 1 + 2^-8 + 2^-8 = 1 + 2^-7, exact in float32 and in BF16. Rounding after each add would give
    # bf16(1 + 2^-8) = 1 (a tie, to even), then 1 again.
    srcs = [np.array([[0, 0]])] * 3
    ys = [rows(1.0, hidden=2), rows(2.0**-8, hidden=2), rows(2.0**-8, hidden=2)]
    assert reference.combine(ys, srcs, [1, 0, 0])[0].tolist() == [[1 + 2.0**-7] * 2]
    # A bias that lands the sum on a BF16 tie: 1 + 2^-8 rounds to 1 (even); 1 + 3 * 2^-8 rounds up to 1 + 2^-6.
    ys = [rows(1.0, 1.0, hidden=2)]
    biases = [(rows(2.0**-8, 3 * 2.0**-8, hidden=2),)]
    out = reference.combine(ys, [np.array([[0, 0], [0, 1]])], [2], biases=biases)[0]
    assert out[:, 0].tolist() == [1.0, 1 + 2.0**-6]


def test_combine_sums_topk_weights_in_float32_without_rounding():
    srcs = [np.array([[0, 0], [0, 1]]), np.array([[0, 0]])]
    ys = [rows(1, 2, hidden=2), rows(3, hidden=2)]
    weights = [np.array([[0.5, 1 + 2.0**-20], [0.25, 0.0]], f32), np.array([[0.125, 2.0**-20]], f32)]
    (out, w), (_, w1) = reference.combine(ys, srcs, [2, 0], topk_weights=weights)
    assert w.tolist() == [[0.625, 1 + 2.0**-19], [0.25, 0.0]]  # 1 + 2^-19 is no BF16 value: kept as float32
    assert w.dtype == np.float32 and w1.shape == (0, 2) and out[:, 0].tolist() == [4, 2]


def test_combine_sums_topk_weights_in_ascending_rank_order():
    # As for the rows: 2^20, -2^20, 2^-10 from ranks 0, 1, 2 sum to 2^-10 in ascending order, to 0 in descending.
    srcs = [np.array([[0, 0]])] * 3
    ys = [rows(0.0, hidden=2)] * 3
    weights = [np.array([[w]], f32) for w in (2.0**20, -(2.0**20), 2.0**-10)]
    (_, w), *_ = reference.combine(ys, srcs, [1, 0, 0], topk_weights=weights)
    assert w.tolist() == [[2.0**-10]]


def test_combine_refuses_a_token_twice_from_one_rank_and_foreign_tokens():
    with pytest.raises(ValueError, match="twice"):
        reference.combine([rows(1, 2)], [np.array([[0, 1], [0, 1]])], [2])
    with pytest.raises(ValueError, match="outside"):
        reference.combine([rows(1)], [np.array([[0, 2]])], [2])
    with pytest.raises(ValueError, match="at most 2"):
        reference.combine([rows(1)], [np.array([[0, 0]])], [1], biases=[(rows(0),) * 3])


# ---------------------------------------------------------------------------------------------------------------
# Numerics: BF16 rounding, the e4m3 grid, the FP8 cast, UE8M0 packing.


@pytest.mark.parametrize(
    "value, want",
    [
        (1.0, 1.0),
        (1 + 2.0**-7, 1 + 2.0**-7),  # representable
        (1 + 2.0**-8, 1.0),  # tie between 1 and 1 + 2^-7: to even (1)
        (1 + 3 * 2.0**-8, 1 + 2.0**-6),  # tie between 1 + 2^-7 and 1 + 2^-6: to even (1 + 2^-6)
        (1 + 2.0**-8 + 2.0**-23, 1 + 2.0**-7),  # just past the tie: up
        (-(1 + 2.0**-8 + 2.0**-23), -(1 + 2.0**-7)),
        (3.4028234663852886e38, np.inf),  # the largest float32 lies past the last BF16 tie
        (0.0, 0.0),
    ],
)
def test_bf16_round_is_round_to_nearest_even(value, want):
    got = reference.bf16_round(np.array([value], f32))
    assert got.dtype == np.float32 and got.tolist() == [want]


def test_bf16_round_keeps_nan_and_signed_zero():
    got = reference.bf16_round(np.array([np.nan, -0.0], f32))
    assert np.isnan(got[0]) and got[1] == 0 and np.signbit(got[1])


@pytest.mark.parametrize(
    "value, want",
    [
        (1.0, 1.0),
        (1.125, 1.125),
        (448.0, 448.0),
        (240.0, 240.0),  # grid values
        (2.0**-6, 2.0**-6),  # smallest normal
        (7 * 2.0**-9, 7 * 2.0**-9),
        (2.0**-9, 2.0**-9),  # largest and smallest subnormal
        (1.0625, 1.0),  # tie between 1 (mantissa 000) and 1.125 (001): to 1
        (1.1875, 1.25),  # tie between 1.125 (001) and 1.25 (010): to 1.25
        (17.0, 16.0),
        (19.0, 20.0),  # ties in [16, 32), step 2
        (432.0, 448.0),  # tie between 416 (101) and 448 (110)
        (1.07, 1.125),
        (1.05, 1.0),  # plain nearest
        (449.0, 448.0),
        (464.0, 448.0),
        (1e6, 448.0),
        (np.inf, 448.0),  # saturate
        (1.5 * 2.0**-9, 2.0**-8),  # subnormal tie between 1 and 2 steps of 2^-9: to 2 (even)
        (2.5 * 2.0**-9, 2.0**-8),  # subnormal tie between 2 and 3 steps: to 2
        (0.6 * 2.0**-9, 2.0**-9),
        (7.5 * 2.0**-9, 2.0**-6),  # tie between the largest subnormal and the smallest normal: to 2^-6
        (2.0**-10, 0.0),  # half the smallest subnormal: tie, to 0
        (1e-40, 0.0),  # a float32 subnormal
    ],
)
def test_e4m3_round_on_hand_picked_values(value, want):
    got = reference.e4m3_round(np.array([value, -value], f32))
    assert got.dtype == np.float32 and got.tolist() == [want, -want]


def test_e4m3_round_keeps_the_sign_of_underflow_and_nan():
    got = reference.e4m3_round(np.array([-(2.0**-11), 2.0**-11, np.nan], f32))
    assert got[0] == 0 and np.signbit(got[0]) and not np.signbit(got[1]) and np.isnan(got[2])


def test_e4m3_round_leaves_every_grid_value_alone():
    subnormals = [m * 2.0**-9 for m in range(8)]
    normals = [(1 + m / 8) * 2.0**e for e in range(-6, 9) for m in range(8) if (1 + m / 8) * 2.0**e <= 448]
    grid = np.array(subnormals + normals, f32)
    assert len(normals) == 15 * 8 - 1  # 2^8 * 1.875 = 480 is NaN in e4m3fn
    assert np.array_equal(reference.e4m3_round(grid), grid)
    # and every midpoint between neighbours goes to the neighbour with the even mantissa (even index on this grid)
    mids = (grid[1:] + grid[:-1]) / f32(2)
    want = np.where(np.arange(len(grid) - 1) % 2 == 0, grid[:-1], grid[1:])
    assert np.array_equal(reference.e4m3_round(mids), want)


def test_fp8_cast_scales_each_block_by_its_amax():
    x = np.zeros((2, 256), f32)
    x[0, :128] = 1.0
    x[0, 5] = 896.0  # block (0, 0): amax 896, scale 2; 1 / 2 = 0.5, 896 / 2 = 448
    x[0, 128] = -3.0  # block (0, 1): amax 3, scale 3 / 448; -3 / scale = -448
    x[1, 200] = 2.125  # block (1, 1): amax 2.125; row 1 block 0 is zero: amax floored to 1e-4
    q, scales = reference.fp8_cast(x)
    assert scales.dtype == np.float32 and scales.shape == (2, 2)
    assert scales.tolist() == [[2.0, f32(3.0) / f32(448.0)], [f32(1e-4) / f32(448.0), f32(2.125) / f32(448.0)]]
    assert q.dtype == np.float32 and q.shape == (2, 256)
    assert q[0, 0] == 0.5 and q[0, 5] == 448 and q[0, 128] == -448 and q[0, 129] == 0
    assert q[1, 200] == 448 and not q[1, :200].any() and not q[1, 201:].any()


def test_fp8_cast_divides_in_float32_and_rounds_ties_to_even():
    x = np.zeros((1, 128), f32)
    x[0, :3] = [896.0, 2.125, 2.375]  # scale 2: 1.0625 (tie -> 1.0) and 1.1875 (tie -> 1.25)
    q, scales = reference.fp8_cast(x)
    assert scales.tolist() == [[2.0]] and q[0, :3].tolist() == [448.0, 1.0, 1.25]


def test_fp8_cast_divides_rather_than_multiplying_by_the_reciprocal():
    # amax 164.27046 gives scale f32(amax / 448) = 0.36667514. For x = 0.38959235, f32(x / scale) is 1.0625 exactly,
    # the tie between e4m3 1.0 and 1.125, which goes to even (1.0); x * f32(1 / scale) is 1.0625001 and would give
    # 1.125.
    amax, x = f32(164.2704620361328), f32(0.38959234952926636)
    scale = f32(amax / f32(448.0))
    assert f32(x / scale) == f32(1.0625) and x * (f32(1.0) / scale) > f32(1.0625)  # the case tells them apart
    block = np.zeros((1, 128), f32)
    block[0, :2] = [amax, x]
    q, scales = reference.fp8_cast(block)
    assert scales.tolist() == [[scale]] and q[0, :2].tolist() == [448.0, 1.0]


@pytest.mark.parametrize(
    "amax, want_scale, want_q",
    [
        (448.0 * 3, 4.0, 320.0),  # scale 3 -> 4; 1344 / 4 = 336, a tie between 320 (010) and 352 (011): 320
        (448.0 * 4, 4.0, 448.0),  # scale exactly 4 stays 4
        (448.0 * 0.75, 1.0, 320.0),  # scale 0.75 -> 1; 336 again
        (448.0 * 2.0**-10, 2.0**-10, 448.0),
        (0.0, 2.0**-22, 0.0),  # 1e-4 / 448 = 2.23e-7 lies in (2^-23, 2^-22]
    ],
)
def test_fp8_cast_round_scale_gives_the_next_power_of_two(amax, want_scale, want_q):
    x = np.zeros((1, 128), f32)
    x[0, 0] = amax
    q, scales = reference.fp8_cast(x, round_scale=True)
    assert scales.tolist() == [[want_scale]] and q[0, 0] == want_q


def test_fp8_cast_refuses_a_hidden_size_not_multiple_of_128():
    with pytest.raises(ValueError, match="128"):
        reference.fp8_cast(np.zeros((1, 192), f32))


def test_ue8m0_pack_puts_block_4j_plus_i_in_bits_8i():
    scales = np.array([[1.0, 2.0, 0.5, 256.0, 4.0]], f32)  # exponent bytes 127, 128, 126, 135 | 129
    packed = reference.ue8m0_pack(scales)
    assert packed.dtype == np.int32 and packed.shape == (1, 2)
    word0 = 127 | 128 << 8 | 126 << 16 | 135 << 24  # top byte >= 128: negative as int32
    assert packed.view(np.uint32).tolist() == [[word0, 129]]  # the last word padded with zero bytes
    assert packed[0, 0] == word0 - 2**32


def test_ue8m0_pack_refuses_scales_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        reference.ue8m0_pack(np.array([[1.0, 3.0, 1.0, 1.0]], f32))
    with pytest.raises(ValueError, match="power-of-two"):
        reference.ue8m0_pack(np.array([[0.0]], f32))


# ---------------------------------------------------------------------------------------------------------------
# LL dispatch and combine. E = 4 on 2 ranks, max_tokens T = 4 (R * T = 8 rows per expert).
#   rank 0: token 0 -> experts 0, 1 (both on rank 0: delivered twice); token 1 -> expert 3
#   rank 1: token 0 -> experts 1, 2; token 1 -> experts 0, 1; token 2 -> nowhere
LL_TOPK = [np.array([[0, 1], [3, -1]]), np.array([[1, 2], [0, 1], [-1, -1]])]


def test_low_latency_dispatch_delivers_every_pair_grouped_by_source_rank_then_token():
    xs = [rows(1, 2, hidden=2), rows(10, 20, 30, hidden=2)]
    (x0, s0, n0, src0), (x1, s1, n1, src1) = reference.low_latency_dispatch(xs, LL_TOPK, 4, 4, use_fp8=False)
    assert s0 is None and s1 is None
    assert n0.tolist() == [2, 3] and n1.tolist() == [1, 1] and n0.dtype == np.int32
    assert src0[0, :2].tolist() == [[0, 0], [1, 1]]  # expert 0: r0t0, r1t1
    assert src0[1, :3].tolist() == [[0, 0], [1, 0], [1, 1]]  # expert 1: r0t0 (again), r1t0, r1t1
    assert src1[0, :1].tolist() == [[1, 0]] and src1[1, :1].tolist() == [[0, 1]]
    assert x0[0, :2, 0].tolist() == [1, 20] and x0[1, :3, 0].tolist() == [1, 10, 20]
    assert x1[0, 0, 0] == 10 and x1[1, 0, 0] == 2
    assert x0.shape == (2, 8, 2) and src0.shape == (2, 8, 2) and src0.dtype == np.int64


def test_low_latency_dispatch_leaves_unused_rows_zero_and_marked():
    xs = [rows(1, 2, hidden=2), rows(10, 20, 30, hidden=2)]
    (x0, _, _, src0), (x1, _, _, src1) = reference.low_latency_dispatch(xs, LL_TOPK, 4, 4, use_fp8=False)
    assert not x0[0, 2:].any() and not x0[1, 3:].any() and not x1[:, 1:].any()
    assert (src0[0, 2:] == -1).all() and (src0[1, 3:] == -1).all() and (src1[:, 1:] == -1).all()


def test_low_latency_dispatch_casts_to_fp8_per_token():
    x0 = np.zeros((2, 128), f32)
    x0[0, :2] = [448.0, 1.0625]  # scale 1: 1.0625 is a tie, to 1.0
    x0[1, :2] = [896.0, 3.0]  # scale 2: 448, 1.5
    x1 = np.zeros((3, 128), f32)  # all-zero tokens: amax floored, scale 1e-4 / 448
    (rx0, rs0, _, _), (rx1, rs1, _, _) = reference.low_latency_dispatch([x0, x1], LL_TOPK, 4, 4)
    assert rx0[0, 0, :2].tolist() == [448.0, 1.0] and rs0[0, 0].tolist() == [1.0]  # r0t0 on expert 0
    assert rx0[1, 0, :2].tolist() == [448.0, 1.0] and rs0[1, 0].tolist() == [1.0]  # r0t0 again on expert 1
    assert rx1[1, 0, :2].tolist() == [448.0, 1.5] and rs1[1, 0].tolist() == [2.0]  # r0t1 on expert 3
    assert rs0[0, 1].tolist() == [f32(1e-4) / f32(448.0)] and not rx0[0, 1].any()  # r1t1
    assert rs0.shape == (2, 8, 1) and not rs0[0, 2:].any()
    _, rs_round, _, _ = reference.low_latency_dispatch([x0, x1], LL_TOPK, 4, 4, round_scale=True)[1]
    assert rs_round[1, 0].tolist() == [2.0] and rs_round[0, 0].tolist() == [2.0**-22]


def test_low_latency_dispatch_refuses_more_tokens_than_max_tokens():
    xs = [rows(1, 2, hidden=2), rows(10, 20, 30, hidden=2)]
    with pytest.raises(ValueError, match="max_tokens"):
        reference.low_latency_dispatch(xs, LL_TOPK, 4, 2, use_fp8=False)
    reference.low_latency_dispatch(xs, LL_TOPK, 4, 3, use_fp8=False)  # exactly max_tokens is fine


def test_high_throughput_calls_refuse_arguments_of_the_wrong_kind():
    results = reference.dispatch(XS, TOPK, WEIGHTS, 4)
    ys, srcs = [r[0] for r in results], [r[4] for r in results]
    with pytest.raises(TypeError, match="num_tokens must hold one entry per rank"):
        reference.combine(ys, srcs, 3)
    with pytest.raises(TypeError, match=r"num_tokens\[1\] must be an integer, not 2.0"):
        reference.combine(ys, srcs, [3, 2.0])
    with pytest.raises(TypeError, match="num_experts must be an integer"):
        reference.dispatch_layout(TOPK[0], 4.0, 2)
    assert [o.shape for o in reference.combine(ys, srcs, [3, np.int64(2)])] == [(3, 4), (2, 4)]


def test_low_latency_calls_refuse_what_the_library_could_never_be_given():
    xs = [rows(1, 2, hidden=2), rows(10, 20, 30, hidden=2)]
    # 448.5 is no BF16 value (the library would receive 448 and cast with scale 1, not 448.5 / 448).
    not_bf16 = np.zeros((1, 128), f32)
    not_bf16[0, 0] = 448.5
    with pytest.raises(ValueError, match=r"xs of rank 0 holds 448\.5 at \(0, 0\), which is no BF16 value"):
        reference.low_latency_dispatch([not_bf16], [np.array([[0]])], 1, 1)
    reference.low_latency_dispatch([reference.bf16_round(not_bf16)], [np.array([[0]])], 1, 1)
    nan_row = np.full((1, 128), np.nan, f32)  # NaN is a BF16 value whatever its payload
    reference.low_latency_dispatch([nan_row], [np.array([[0]])], 1, 1, use_fp8=False)
    # One top-k width on every rank, in the dispatch and in the combine.
    with pytest.raises(ValueError, match="rank 1 has 3 slots but rank 0's has 2"):
        reference.low_latency_dispatch(xs, [LL_TOPK[0], np.array([[1, 2, -1], [0, 1, -1], [-1, -1, -1]])], 4, 4)
    results = reference.low_latency_dispatch(xs, LL_TOPK, 4, 4, use_fp8=False)
    ys = [r[0] for r in results]
    weights = [np.ones(t.shape, f32) for t in LL_TOPK]
    srcs = [r[3] for r in results]
    with pytest.raises(ValueError, match="rank 1 has 1 slots but rank 0's has 2"):
        reference.low_latency_combine(ys, [LL_TOPK[0], LL_TOPK[1][:, :1]], [weights[0], weights[1][:, :1]], srcs)
    # An unused row is (-1, -1); any other negative source is refused, not taken as unused.
    for row in ([-2, 0], [-1, 5]):
        bad = [srcs[0].copy(), srcs[1]]
        bad[0][0, 7] = row
        with pytest.raises(ValueError, match=r"neither \(-1, -1\)"):
            reference.low_latency_combine(ys, LL_TOPK, weights, bad)
    # Arguments of the wrong kind: a clear error naming the argument, never a count truncated from a float.
    with pytest.raises(ValueError, match="topk_weights is required"):
        reference.low_latency_combine(ys, LL_TOPK, None, srcs)
    with pytest.raises(TypeError, match="max_tokens must be an integer, not 4.5"):
        reference.low_latency_dispatch(xs, LL_TOPK, 4, 4.5)
    with pytest.raises(TypeError, match="num_experts must be an integer, not 4.0"):
        reference.low_latency_dispatch(xs, LL_TOPK, 4.0, 4)
    with pytest.raises(TypeError, match="topk_idxs must hold one entry per rank"):
        reference.low_latency_dispatch(xs, 7, 4, 4)


def test_low_latency_dispatch_delivers_a_token_naming_one_expert_twice_once_and_combine_adds_it_per_slot():
    x = rows(1.5, 3.0, hidden=2)
    topk = np.array([[1, -1, 1], [0, 1, 0]])
    ((recv_x, _, count, src),) = reference.low_latency_dispatch([x], [topk], 2, 2, use_fp8=False)
    assert count.tolist() == [1, 2]  # expert 0: token 1 once; expert 1: tokens 0 and 1, once each
    assert src[0, 0].tolist() == [0, 1] and src[1, :2].tolist() == [[0, 0], [0, 1]]
    np.testing.assert_array_equal(recv_x[1, :2], x)
    y = recv_x * np.float32(2.0)
    w = np.array([[0.5, 0.25, 0.125], [1.0, 2.0, 4.0]], dtype=np.float32)
    (out,) = reference.low_latency_combine([y], [topk], [w], [src])
    # token 0: slots 0 and 2 both read expert 1's row; token 1: slots 0 and 2 read expert 0's, slot 1 expert 1's
    np.testing.assert_array_equal(out[0], reference.bf16_round(2 * x[0] * 0.5 + 2 * x[0] * 0.125))
    np.testing.assert_array_equal(out[1], reference.bf16_round(2 * x[1] * 1.0 + 2 * x[1] * 2.0 + 2 * x[1] * 4.0))


def test_low_latency_takes_a_rank_with_no_tokens():
    xs = [np.zeros((0, 2), f32), rows(5, hidden=2)]
    topk = [np.zeros((0, 2), np.int64), np.array([[0, 3]])]
    results = reference.low_latency_dispatch(xs, topk, 4, 2, use_fp8=False)
    (x0, _, n0, src0), (x1, _, n1, src1) = results
    assert n0.tolist() == [1, 0] and n1.tolist() == [0, 1]
    assert src0[0, 0].tolist() == [1, 0] and src1[1, 0].tolist() == [1, 0] and x1[1, 0, 0] == 5
    outs = reference.low_latency_combine(
        [x0, x1], topk, [np.zeros((0, 2), f32), np.array([[0.5, 0.25]], f32)], [src0, src1]
    )
    assert outs[0].shape == (0, 2) and outs[1].tolist() == [[3.75, 3.75]]  # 0.5 * 5 + 0.25 * 5


def test_low_latency_combine_weights_each_expert_row_and_skips_empty_slots():
    # Row places (from the dispatch test): rank 0 expert 0: r0t0, r1t1; rank 0 expert 1: r0t0, r1t0, r1t1;
    # rank 1 expert 0 (global 2): r1t0; rank 1 expert 1 (global 3): r0t1.
    srcs = [
        r[3]
        for r in reference.low_latency_dispatch(
            [rows(0, 0, hidden=2), rows(0, 0, 0, hidden=2)], LL_TOPK, 4, 4, use_fp8=False
        )
    ]
    y0 = np.zeros((2, 8, 2), f32)
    y1 = np.zeros((2, 8, 2), f32)
    y0[0, 0], y0[0, 1] = 2.0, 6.0  # expert 0 on r0t0, r1t1
    y0[1, 0], y0[1, 1], y0[1, 2] = 3.0, 5.0, 7.0  # expert 1 on r0t0, r1t0, r1t1
    y1[0, 0] = 9.0  # expert 2 on r1t0
    y1[1, 0] = 4.0  # expert 3 on r0t1
    weights = [np.array([[0.5, 0.25], [0.5, 100.0]], f32), np.array([[1.0, 2.0], [0.25, 0.5], [8.0, 8.0]], f32)]
    out0, out1 = reference.low_latency_combine([y0, y1], LL_TOPK, weights, srcs)
    assert out0[:, 0].tolist() == [0.5 * 2 + 0.25 * 3, 0.5 * 4]  # the -1 slot's weight 100 is ignored
    assert out1[:, 0].tolist() == [1 * 5 + 2 * 9, 0.25 * 6 + 0.5 * 7, 0.0]
    assert out0.dtype == np.float32 and out0.shape == (2, 2)


def test_low_latency_combine_sums_slots_in_ascending_order():
    # w * y per slot: 2^20, -2^20, 2^-10. Ascending gives 2^-10; descending would give 0.
    topk = [np.array([[0, 1, 2]])]
    srcs = [np.full((3, 1, 2), 0, np.int64)]  # one rank, three experts, each holding r0t0 in row 0
    ys = [np.array([[[2.0**20]], [[-(2.0**20)]], [[2.0**-10]]], f32)]
    out = reference.low_latency_combine(ys, topk, [np.ones((1, 3), f32)], srcs)[0]
    assert out.tolist() == [[2.0**-10]]


def test_low_latency_combine_rounds_the_product_before_adding():
    # Slot 0: 1 * (1 + 2^-8). Slot 1: w = 1 + 2^-8 + 2^-16 + 2^-23 times y = (2 - 2^-7) * 2^-25 (a BF16 value):
    # exactly 2^-24 * (1 + 2^-24 - 2^-31), which rounds to 2^-24 in float32. Then 1 + 2^-8 + 2^-24 is a float32
    # tie, to even: 1 + 2^-8, and BF16 of that is a tie too, to 1.0. A fused multiply-add would keep the excess,
    # round up to 1 + 2^-8 + 2^-23 and give BF16 1 + 2^-7.
    topk = [np.array([[0, 1]])]
    srcs = [np.full((2, 1, 2), 0, np.int64)]
    ys = [np.array([[[1.0]], [[(2 - 2.0**-7) * 2.0**-25]]], f32)]
    weights = [np.array([[1 + 2.0**-8, 1 + 2.0**-8 + 2.0**-16 + 2.0**-23]], f32)]
    assert reference.low_latency_combine(ys, topk, weights, srcs)[0].tolist() == [[1.0]]


def test_low_latency_combine_rounds_once_to_bf16():
    # 1 * 1 + 1 * 2^-8 + 1 * 2^-8 = 1 + 2^-7 exactly; rounding after each slot would give 1.
    topk = [np.array([[0, 1, 2]])]
    srcs = [np.full((3, 1, 2), 0, np.int64)]
    ys = [np.array([[[1.0]], [[2.0**-8]], [[2.0**-8]]], f32)]
    assert reference.low_latency_combine(ys, topk, [np.ones((1, 3), f32)], srcs)[0].tolist() == [[1 + 2.0**-7]]


def test_low_latency_combine_refuses_a_pair_that_was_never_received():
    topk = [np.array([[0, 1]])]
    srcs = [np.array([[[0, 0]], [[-1, -1]]], np.int64)]  # expert 1 holds nothing
    with pytest.raises(ValueError, match="never received"):
        reference.low_latency_combine([np.zeros((2, 1, 2), f32)], topk, [np.ones((1, 2), f32)], srcs)


def test_low_latency_round_trip_of_bf16_values_gives_the_weighted_sum():
    # Without FP8, sending each expert's rows straight back gives sum_k w_k * x: with x small integers and weights
    # powers of two the sum is exact, so it can be written out.
    xs = [rows(1, 2, hidden=2), rows(10, 20, 30, hidden=2)]
    results = reference.low_latency_dispatch(xs, LL_TOPK, 4, 4, use_fp8=False)
    weights = [np.array([[0.5, 0.25], [2.0, 0.0]], f32), np.array([[1.0, 0.5], [0.25, 4.0], [1.0, 1.0]], f32)]
    out0, out1 = reference.low_latency_combine([r[0] for r in results], LL_TOPK, weights, [r[3] for r in results])
    assert out0[:, 0].tolist() == [0.75 * 1, 2.0 * 2]
    assert out1[:, 0].tolist() == [1.5 * 10, 4.25 * 20, 0.0]


@pytest.mark.parametrize("num_ranks", [4, 8])
def test_low_latency_over_many_ranks_follows_the_definitions(num_ranks):
    # Random routing over 4 or 8 ranks (distinct experts per token, -1 slots, ranks with no tokens). The expected
    # rows, counts and sources are derived here from the definition (rows of expert e: the (source, token) pairs
    # naming it, source ascending, then token), and the round trip with small integers and power-of-two weights is
    # exact, so its sums can be derived as well.
    rng = np.random.default_rng(num_ranks)
    local_experts, num_topk, max_tokens, hidden = 3, 4, 5, 2
    num_experts = local_experts * num_ranks
    xs, topks, weights = [], [], []
    for _ in range(num_ranks):
        n = int(rng.integers(0, max_tokens + 1))
        topk = np.full((n, num_topk), -1, np.int64)
        for t in range(n):
            chosen = rng.choice(num_experts, size=int(rng.integers(0, num_topk + 1)), replace=False)
            topk[t, : len(chosen)] = chosen
            rng.shuffle(topk[t])
        topks.append(topk)
        xs.append(np.repeat(rng.integers(-8, 9, (n, 1)), hidden, axis=1).astype(f32))
        weights.append((2.0 ** rng.integers(-2, 2, (n, num_topk))).astype(f32))
    results = reference.low_latency_dispatch(xs, topks, num_experts, max_tokens, use_fp8=False)
    assert len(results) == num_ranks
    for rank, (recv_x, scales, count, src) in enumerate(results):
        assert scales is None
        for local in range(local_experts):
            expert = rank * local_experts + local
            pairs = [(s, t) for s in range(num_ranks) for t in range(len(xs[s])) if expert in topks[s][t]]
            assert count[local] == len(pairs)
            assert src[local, : len(pairs)].tolist() == [[s, t] for s, t in pairs]
            assert (src[local, len(pairs) :] == -1).all() and (recv_x[local, len(pairs) :] == 0).all()
            for j, (s, t) in enumerate(pairs):
                assert recv_x[local, j].tolist() == xs[s][t].tolist()
    outs = reference.low_latency_combine([r[0] for r in results], topks, weights, [r[3] for r in results])
    for rank in range(num_ranks):
        named = topks[rank] >= 0
        expected = (weights[rank] * named * xs[rank][:, :1]).sum(axis=1)
        assert outs[rank][:, 0].tolist() == expected.tolist()
        assert (outs[rank][:, 0] == outs[rank][:, 1]).all()


def test_fp8_cast_skips_nan_in_the_block_maximum_and_keeps_an_infinite_scale_infinite():
    x = np.full((1, 256), 2.0, np.float32)
    x[0, 5] = np.nan  # block 0: scale from the finite channels; only the NaN channel is NaN
    x[0, 130] = np.inf  # block 1: infinite scale; finite channels cast to zero, the infinite one to NaN
    for round_scale in (False, True):
        q, scales = reference.fp8_cast(x, round_scale=round_scale)
        assert np.isfinite(scales[0, 0]) and np.isinf(scales[0, 1]), scales
        assert np.isnan(q[0, 5]) and np.isnan(q[0, :128]).sum() == 1
        assert np.isnan(q[0, 130]) and np.isnan(q[0, 128:]).sum() == 1 and (q[0, 128:130] == 0).all()
    q, scales = reference.fp8_cast(x)
    assert scales[0, 0] == np.float32(2.0) / np.float32(448.0) and q[0, 0] == np.float32(448.0)


def test_bf16_round_gives_the_canonical_nan():
    bits = reference.bf16_round(np.array([np.nan, -np.nan], np.float32)).view(np.uint32) >> 16
    assert bits.tolist() == [0x7FFF, 0x7FFF]


def test_ue8m0_pack_gives_an_infinite_scale_the_kernels_exponent_byte():
    words = reference.ue8m0_pack(np.array([[1.0, np.inf, 2.0**-20]], np.float32))
    assert words.view(np.uint32).tolist() == [[127 | 255 << 8 | 107 << 16]]


def test_the_sums_start_from_positive_zero():
    # acc = 0.0f, then acc + y: -0 + ... would keep a lone -0.0 row; +0 + -0 gives +0 (DESIGN.md).
    out = reference.combine([np.array([[-0.0]], f32)], [np.array([[0, 0]])], [1])[0]
    assert out.tolist() == [[0.0]] and not np.signbit(out[0, 0])
    ll = reference.low_latency_combine(
        [np.array([[[-0.0]]], f32)], [np.array([[0]])], [np.ones((1, 1), f32)], [np.zeros((1, 1, 2), np.int64)]
    )[0]
    assert ll.tolist() == [[0.0]] and not np.signbit(ll[0, 0])
