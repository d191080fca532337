"""NumPy reference implementation of the semantics in DESIGN.md section 3: the oracle the GPU tests compare with.

Functions take and return per-rank data the way DESIGN.md section 6 specifies: lists of per-rank inputs in, lists of
per-rank outputs out. BF16 data are float32 arrays holding BF16-representable values; FP8 data are float32 arrays
holding e4m3fn-representable values. They are written for clarity, not speed: loops follow the definitions, with the
per-row work done by NumPy so that the shapes the GPU tests use (N = 4096, H = 7168) take seconds.

Choices made where DESIGN.md is silent:

- ``dispatch`` takes each rank's payload either as one [N, H] array (any dtype; rows are copied through unchanged)
  or as a tuple ``(q, scales)`` for FP8 (``q`` [N, H], ``scales`` [N, ...]: float32 [N, H/128] or UE8M0-packed
  int32, both copied through row by row); then that rank's ``recv_x`` is the tuple ``(recv_q, recv_scales)``. All
  ranks use the same kind. ``recv_topk_idx`` is int64, ``recv_topk_weights`` float32,
  ``num_recv_tokens_per_expert`` an int32 array [E_loc]. Receive counts count (token, slot) pairs, like
  ``dispatch_layout``'s per-expert counts (a token that names one expert twice counts twice there; routers never
  do that).
- ``combine`` also takes ``topk_weights`` (keyword): per rank [M_d, K] in receive order; when given, each rank's
  result is the pair ``(out, combined_weights)``. ``biases`` is per rank ``None``, one array, or a tuple of 0-2
  arrays. Inputs are used as float32 as given (they are expected to hold BF16 values already).
- ``low_latency_dispatch`` delivers a token that names one expert in several slots once, as the library does
  (``low_latency_combine`` then adds that row once per slot); ``round_scale`` is ignored when ``use_fp8`` is False.
  ``recv_scales`` are plain float32 scales; pack them with ``ue8m0_pack`` where the UE8M0 form is wanted.
- Helpers ``bf16_round``, ``e4m3_round`` and ``ue8m0_pack`` are public: they define the numerics. NaN stays NaN (BF16's
  canonical 0x7FFF); e4m3 saturates infinities and everything beyond 448 to +-448; the FP8 cast's block maximum skips
  NaN, as the kernel's does.
"""

from __future__ import annotations

import operator

import numpy as np

__all__ = [
    "bf16_round",
    "combine",
    "dispatch",
    "dispatch_layout",
    "e4m3_round",
    "fp8_cast",
    "low_latency_combine",
    "low_latency_dispatch",
    "ue8m0_pack",
]

FP8_BLOCK = 128
E4M3_MAX = 448.0
AMAX_EPSILON = 1e-4
INT32_MAX = 2**31 - 1


def _integer(value, name: str) -> int:
    """`value` as an int; a float, a bool or a string is refused rather than truncated or taken as a number."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {value!r}") from None


def _layout_one(topk_idx: np.ndarray, num_experts: int, num_ranks: int):
    topk_idx = np.asarray(topk_idx)
    if topk_idx.ndim != 2:
        raise ValueError(f"topk_idx has shape {topk_idx.shape}; it must be [num_tokens, num_topk]")
    if not np.issubdtype(topk_idx.dtype, np.integer):
        raise ValueError(f"topk_idx has dtype {topk_idx.dtype}; it must be an integer type")
    num_experts, num_ranks = _integer(num_experts, "num_experts"), _integer(num_ranks, "num_ranks")
    if num_ranks < 1 or num_experts < 1 or num_experts % num_ranks != 0:
        raise ValueError(f"num_experts ({num_experts}) must be a positive multiple of num_ranks ({num_ranks})")
    if topk_idx.size and (topk_idx.min() < -1 or topk_idx.max() >= num_experts):
        raise ValueError(f"topk_idx entries must lie in [-1, {num_experts})")
    experts_per_rank = num_experts // num_ranks
    num_tokens = topk_idx.shape[0]
    is_token_in_rank = np.zeros((num_tokens, num_ranks), dtype=bool)
    num_tokens_per_expert = np.zeros(num_experts, dtype=np.int32)
    for token in range(num_tokens):
        for expert in topk_idx[token]:
            if expert == -1:
                continue
            num_tokens_per_expert[expert] += 1
            is_token_in_rank[token, expert // experts_per_rank] = True
    num_tokens_per_rank = is_token_in_rank.sum(axis=0, dtype=np.int32)
    return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank


def dispatch_layout(topk_idx, num_experts: int, num_ranks: int):
    """Layout of one rank's routing: ``topk_idx`` [N, K] (entries in [-1, E)) gives
    ``(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32, is_token_in_rank [N, R] bool)``.

    A token counts once per rank however many of its experts live there; -1 slots count nowhere. Given a list of
    per-rank ``topk_idx`` arrays instead, returns the list of per-rank results.
    """
    if isinstance(topk_idx, (list, tuple)):
        return [_layout_one(t, num_experts, num_ranks) for t in topk_idx]
    return _layout_one(topk_idx, num_experts, num_ranks)


# ---------------------------------------------------------------------------------------------------------------
# Numerics: BF16 and e4m3 rounding, the FP8 cast, UE8M0 packing.


_BF16_CANONICAL_NAN = np.uint32(0x7FFF0000).view(np.float32)


def bf16_round(x) -> np.ndarray:
    """Round float32 values to the nearest BF16 value, ties to even; the result is float32 (BF16-representable).

    Values beyond the largest BF16 round to infinity exactly as IEEE rounding says; every NaN becomes the canonical
    NaN 0x7FFF (as bits of a BF16; the GPU's conversion gives that one).
    """
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    # Adding 0x7FFF plus the lowest kept bit, then truncating, is round-to-nearest-even on the upper 16 bits.
    kept_lsb = (bits >> np.uint64(16)) & np.uint64(1)
    rounded = ((bits + np.uint64(0x7FFF) + kept_lsb) & np.uint64(0xFFFF0000)).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), _BF16_CANONICAL_NAN, rounded).astype(np.float32)


def e4m3_round(x) -> np.ndarray:
    """Round float32 values onto the float8 e4m3fn grid, ties to even, saturating to +-448; float32 result.

    The grid: normals 2^-6 .. 448 with 3 mantissa bits, subnormals in steps of 2^-9; magnitudes at or below 2^-10
    become zero of the same sign. Infinities saturate to +-448; NaN stays NaN.
    """
    x = np.asarray(x, dtype=np.float32)
    # Every magnitude beyond 448 rounds to 448 under saturation, so clamping first changes nothing.
    magnitude = np.minimum(np.abs(x), np.float32(E4M3_MAX))
    _, exponent = np.frexp(magnitude)  # magnitude = m * 2**exponent with m in [0.5, 1)
    # Grid step: 2^(e - 3) for a normal with leading bit 2^e, and 2^-9 throughout the subnormal range (e < -6).
    step = np.ldexp(np.float32(1.0), np.maximum(exponent - 1, -6) - 3).astype(np.float32)
    # Dividing and multiplying by a power of two is exact here; np.rint rounds half to even.
    rounded = (np.rint(magnitude / step) * step).astype(np.float32)
    return np.copysign(rounded, x).astype(np.float32)


def _pow2_ceil(values: np.ndarray) -> np.ndarray:
    """2^ceil(log2(v)) for positive normal float32 v, computed exactly; infinity stays infinity."""
    mantissa, exponent = np.frexp(values)  # v = m * 2**e, m in [0.5, 1): v is a power of two iff m == 0.5
    exponent = np.where(mantissa == 0.5, exponent - 1, exponent)
    return np.where(np.isinf(values), values, np.ldexp(np.float32(1.0), exponent)).astype(np.float32)


def fp8_cast(x, round_scale: bool = False):
    """Cast [N, H] values to FP8 per token and 128-channel block: returns ``(q [N, H], scales [N, H/128])``.

    ``amax = max(max|x| over the block, 1e-4f)``, ``scale = amax / 448.0f`` (float32), with ``round_scale`` rounded
    up to a power of two, and ``q = e4m3(x / scale)`` (float32 division). ``q`` is float32 holding e4m3 values;
    ``q * scale`` dequantises. H must be a multiple of 128. As in the kernel, the maximum skips NaN (a NaN channel
    casts to NaN, the others as if it were absent), and an infinite channel makes its block's scale infinite (the
    block's finite channels cast to zero, the infinite one to NaN).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x has shape {x.shape}; it must be [num_tokens, hidden]")
    num_tokens, hidden = x.shape
    if hidden % FP8_BLOCK != 0:
        raise ValueError(f"hidden size {hidden} must be a multiple of {FP8_BLOCK} for FP8")
    blocks = x.reshape(num_tokens, hidden // FP8_BLOCK, FP8_BLOCK)
    amax = np.fmax(np.fmax.reduce(np.abs(blocks), axis=2), np.float32(AMAX_EPSILON))
    scales = (amax / np.float32(E4M3_MAX)).astype(np.float32)
    if round_scale:
        scales = _pow2_ceil(scales)
    with np.errstate(invalid="ignore"):  # inf / inf under an infinite scale: NaN, as in the kernel
        q = e4m3_round(blocks / scales[:, :, None]).reshape(num_tokens, hidden)
    return q, scales


def ue8m0_pack(scales) -> np.ndarray:
    """Pack power-of-two float32 scales [..., B] as UE8M0 exponent bytes (log2(scale) + 127), four per int32.

    Block 4j+i sits in bits 8i..8i+7 of word j; the result is int32 [..., ceil(B/4)], the last word padded with
    zero bytes when B is not a multiple of 4. Scales must be powers of two in [2^-127, 2^127] (``round_scale``), or
    +inf (a block holding an infinity), which packs as 0xFF, the kernel's exponent byte of an infinite scale.
    """
    scales = np.asarray(scales, dtype=np.float32)
    if scales.ndim < 1:
        raise ValueError("scales must have a block axis")
    mantissa, exponent = np.frexp(scales)
    infinite = np.isposinf(scales)
    biased = np.where(infinite, 255, exponent.astype(np.int64) - 1 + 127)
    if not np.all(infinite | ((mantissa == 0.5) & (biased >= 0) & (biased <= 254))):
        raise ValueError("UE8M0 packing needs power-of-two scales in [2^-127, 2^127] (cast with round_scale=True)")
    num_blocks = scales.shape[-1]
    num_words = -(-num_blocks // 4)
    padded = np.zeros(scales.shape[:-1] + (num_words * 4,), dtype=np.uint32)
    padded[..., :num_blocks] = biased
    by_word = padded.reshape(scales.shape[:-1] + (num_words, 4))
    words = np.zeros(scales.shape[:-1] + (num_words,), dtype=np.uint32)
    for i in range(4):
        words |= by_word[..., i] << np.uint32(8 * i)
    return words.view(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# Argument checks shared by the communication references.


def _num_ranks(first, *others) -> int:
    """The number of ranks: the entries of the per-rank list of `first` (name, list), which each (name, list) of
    `others` given (not None) must match."""
    for name, given in (first, *others):
        if given is not None and not hasattr(given, "__len__"):
            raise TypeError(f"{name} must hold one entry per rank (a list), not {type(given).__name__}")
    num_ranks = len(first[1])
    if num_ranks < 1:
        raise ValueError("the per-rank lists are empty; there must be at least one rank")
    for name, other in others:
        if other is not None and len(other) != num_ranks:
            raise ValueError(f"{name} has {len(other)} entries but there are {num_ranks} ranks")
    return num_ranks


def _experts_per_rank(num_experts: int, num_ranks: int) -> int:
    num_experts = _integer(num_experts, "num_experts")
    if num_experts < 1 or num_experts % num_ranks != 0:
        raise ValueError(f"num_experts ({num_experts}) must be a positive multiple of num_ranks ({num_ranks})")
    return num_experts // num_ranks


def _check_topk(topk_idx, num_experts: int, rank: int, num_tokens: int | None = None) -> np.ndarray:
    topk_idx = np.asarray(topk_idx)
    if topk_idx.ndim != 2:
        raise ValueError(f"topk_idx of rank {rank} has shape {topk_idx.shape}; it must be [num_tokens, num_topk]")
    if not np.issubdtype(topk_idx.dtype, np.integer):
        raise ValueError(f"topk_idx of rank {rank} has dtype {topk_idx.dtype}; it must be an integer type")
    if num_tokens is not None and topk_idx.shape[0] != num_tokens:
        raise ValueError(f"topk_idx of rank {rank} has {topk_idx.shape[0]} rows but the rank has {num_tokens} tokens")
    if topk_idx.size and (topk_idx.min() < -1 or topk_idx.max() >= num_experts):
        raise ValueError(f"topk_idx entries of rank {rank} must lie in [-1, {num_experts})")
    return topk_idx.astype(np.int64)


def _checked_topks(topk_idxs, num_experts: int, num_tokens=None) -> list:
    """Every rank's topk_idx checked (with its token count where given), all with one number of slots."""
    topks = [
        _check_topk(t, num_experts, rank, None if num_tokens is None else num_tokens[rank])
        for rank, t in enumerate(topk_idxs)
    ]
    for rank, topk in enumerate(topks):
        if topk.shape[1] != topks[0].shape[1]:
            raise ValueError(f"topk_idx of rank {rank} has {topk.shape[1]} slots but rank 0's has {topks[0].shape[1]}")
    return topks


def _check_bf16_values(x: np.ndarray, what: str) -> None:
    """Refuses float32 data that a BF16 array cannot hold (the library's data are BF16: it could never see them)."""
    rounded = bf16_round(x)
    wrong = (rounded != x) & ~(np.isnan(rounded) & np.isnan(x))
    if wrong.any():
        at = tuple(int(i) for i in np.argwhere(wrong)[0])
        raise ValueError(
            f"{what} holds {float(x[at])!r} at {at}, which is no BF16 value (pass reference.bf16_round(x))"
        )


def _check_weights(weights, shape, rank: int) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float32)
    if weights.shape != shape:
        raise ValueError(f"topk_weights of rank {rank} has shape {weights.shape}; it must be {shape}")
    return weights


def _first_namings(topk_idx: np.ndarray) -> np.ndarray:
    """topk_idx with every slot that names an expert an earlier slot of its token names set to -1: the (token,
    expert) pairs a low-latency dispatch delivers, each once."""
    first = topk_idx.copy()
    for k in range(1, topk_idx.shape[1]):
        first[(topk_idx[:, :k] == topk_idx[:, k : k + 1]).any(axis=1), k] = -1
    return first


def _tokens_in_rank(topk_idx: np.ndarray, experts_per_rank: int, num_ranks: int) -> np.ndarray:
    """[N, R] bool: does token t have at least one expert on rank d."""
    in_rank = np.zeros((topk_idx.shape[0], num_ranks), dtype=bool)
    tokens, slots = np.nonzero(topk_idx >= 0)
    in_rank[tokens, topk_idx[tokens, slots] // experts_per_rank] = True
    return in_rank


# ---------------------------------------------------------------------------------------------------------------
# High-throughput dispatch and combine.


def dispatch(xs, topk_idxs, topk_weights, num_experts: int, expert_alignment: int = 1):
    """HT dispatch over all ranks. Per rank returns
    ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert, recv_src)``.

    Token t of rank r reaches rank d once if any of its experts lives on d. Rank d's rows are grouped by source rank
    ascending, then source token ascending; ``recv_src`` [M, 2] int64 holds (source rank, source token).
    ``recv_topk_idx`` [M, K] int64 holds receiver-local expert ids, -1 for experts elsewhere and for -1 slots;
    ``recv_topk_weights`` [M, K] float32 is 0 in those slots (None when ``topk_weights`` is None).
    ``num_recv_tokens_per_expert`` int32 [E_loc] counts (token, slot) pairs per local expert, each count rounded up
    to ``expert_alignment``. ``xs[r]`` is an [N, H] array, or an FP8 pair ``(q, scales)``; ``recv_x`` then has the
    same form, rows copied unchanged.
    """
    num_ranks = _num_ranks(("xs", xs), ("topk_idxs", topk_idxs), ("topk_weights", topk_weights))
    experts_per_rank = _experts_per_rank(num_experts, num_ranks)
    if (
        isinstance(expert_alignment, bool)
        or int(expert_alignment) != expert_alignment
        or not 1 <= expert_alignment <= INT32_MAX
    ):
        raise ValueError(f"expert_alignment ({expert_alignment!r}) must be an integer in [1, {INT32_MAX}]")
    expert_alignment = int(expert_alignment)

    is_fp8 = [isinstance(x, tuple) for x in xs]
    if any(is_fp8) and not all(is_fp8):
        raise ValueError("either every rank passes an FP8 pair (q, scales) or none does")
    payloads = []  # per rank: the arrays whose rows travel (one array, or q and scales)
    for rank, x in enumerate(xs):
        arrays = [np.asarray(a) for a in x] if is_fp8[rank] else [np.asarray(x)]
        if is_fp8[rank] and len(arrays) != 2:
            raise ValueError(f"the FP8 payload of rank {rank} must be a pair (q, scales)")
        if arrays[0].ndim != 2:
            raise ValueError(f"x of rank {rank} has shape {arrays[0].shape}; it must be [num_tokens, hidden]")
        if any(a.ndim < 1 or a.shape[0] != arrays[0].shape[0] for a in arrays):
            raise ValueError(f"the scales of rank {rank} must have one row per token")
        if payloads and any(a.shape[1:] != b.shape[1:] for a, b in zip(arrays, payloads[0], strict=True)):
            raise ValueError(f"the payload of rank {rank} has rows shaped unlike rank 0's")
        payloads.append(arrays)

    topks = _checked_topks(topk_idxs, num_experts, [arrays[0].shape[0] for arrays in payloads])
    weights = [
        None if topk_weights is None else _check_weights(topk_weights[r], t.shape, r) for r, t in enumerate(topks)
    ]
    in_rank = [_tokens_in_rank(topk, experts_per_rank, num_ranks) for topk in topks]

    results = []
    for dst in range(num_ranks):
        recv_arrays = [[] for _ in payloads[0]]
        recv_idx, recv_weights, recv_src = [], [], []
        for src in range(num_ranks):
            tokens = np.nonzero(in_rank[src][:, dst])[0]
            for received, array in zip(recv_arrays, payloads[src], strict=True):
                received.append(array[tokens])
            experts = topks[src][tokens]
            here = (experts >= 0) & (experts // experts_per_rank == dst)
            recv_idx.append(np.where(here, experts - dst * experts_per_rank, -1))
            if weights[src] is not None:
                recv_weights.append(np.where(here, weights[src][tokens], np.float32(0.0)))
            recv_src.append(np.stack([np.full(tokens.size, src, dtype=np.int64), tokens.astype(np.int64)], axis=1))
        recv_x = tuple(np.concatenate(parts) for parts in recv_arrays)
        recv_x = recv_x if is_fp8[0] else recv_x[0]
        recv_idx = np.concatenate(recv_idx).astype(np.int64)
        recv_weights = np.concatenate(recv_weights).astype(np.float32) if topk_weights is not None else None
        local = recv_idx[recv_idx >= 0]
        counts = np.bincount(local, minlength=experts_per_rank).astype(np.int64)
        counts = -(-counts // expert_alignment) * expert_alignment
        results.append((recv_x, recv_idx, recv_weights, counts.astype(np.int32), np.concatenate(recv_src)))
    return results


def _bias_list(entry, rank: int):
    if entry is None:
        return []
    if isinstance(entry, np.ndarray):
        return [entry]
    entry = list(entry)
    if len(entry) > 2:
        raise ValueError(f"rank {rank} has {len(entry)} biases; at most 2 are allowed")
    return entry


def combine(ys, recv_srcs, num_tokens, biases=None, *, topk_weights=None):
    """HT combine over all ranks, the inverse of ``dispatch``. Per rank returns out [N_r, H] float32 holding BF16
    values: ``acc = 0.0f``; for each rank d ascending that received token t, ``acc = acc + y_d[row of t on d]``;
    then ``acc = acc + bias0``, ``acc = acc + bias1`` (float32 adds); ``out[t] = bf16(acc)``. Tokens that went
    nowhere get 0 plus the biases.

    ``ys[d]`` [M_d, H] and ``recv_srcs[d]`` [M_d, 2] are in rank d's receive order; ``num_tokens[r]`` is N_r;
    ``biases[r]`` is None, one array or a tuple of up to two [N_r, H] arrays. With ``topk_weights`` (per rank
    [M_d, K]) each result is ``(out, combined_weights [N_r, K] float32)``, summed the same way and not rounded.
    """
    num_ranks = _num_ranks(
        ("ys", ys),
        ("recv_srcs", recv_srcs),
        ("num_tokens", num_tokens),
        ("biases", biases),
        ("topk_weights", topk_weights),
    )
    ys = [np.asarray(y, dtype=np.float32) for y in ys]
    if any(y.ndim != 2 for y in ys):
        raise ValueError("every ys entry must be [num_received, hidden]")
    hidden = ys[0].shape[1]
    if any(y.shape[1] != hidden for y in ys):
        raise ValueError("the ys entries disagree on the hidden size")
    num_tokens = [_integer(n, f"num_tokens[{rank}]") for rank, n in enumerate(num_tokens)]
    if any(n < 0 for n in num_tokens):
        raise ValueError("num_tokens entries must be non-negative")

    srcs = []
    for rank in range(num_ranks):
        src = np.asarray(recv_srcs[rank])
        if src.shape != (ys[rank].shape[0], 2) or not np.issubdtype(src.dtype, np.integer):
            raise ValueError(f"recv_src of rank {rank} must be integer [{ys[rank].shape[0]}, 2]")
        src = src.astype(np.int64)
        if src.size and (src[:, 0].min() < 0 or src[:, 0].max() >= num_ranks):
            raise ValueError(f"recv_src of rank {rank} names a source rank outside [0, {num_ranks})")
        for source in range(num_ranks):
            tokens = src[src[:, 0] == source, 1]
            if tokens.size and (tokens.min() < 0 or tokens.max() >= num_tokens[source]):
                raise ValueError(f"recv_src of rank {rank} names a token outside rank {source}'s {num_tokens[source]}")
            if np.unique(tokens).size != tokens.size:
                raise ValueError(f"recv_src of rank {rank} holds a token of rank {source} twice")
        srcs.append(src)

    weights_in = None
    if topk_weights is not None:
        weights_in = [np.asarray(w, dtype=np.float32) for w in topk_weights]
        num_topk = weights_in[0].shape[1] if weights_in[0].ndim == 2 else -1
        for rank, w in enumerate(weights_in):
            if w.shape != (ys[rank].shape[0], num_topk):
                raise ValueError(
                    f"topk_weights of rank {rank} has shape {w.shape}; it must be [{ys[rank].shape[0]}, {num_topk}]"
                )

    acc = [np.zeros((n, hidden), dtype=np.float32) for n in num_tokens]
    acc_weights = [np.zeros((n, weights_in[0].shape[1]), dtype=np.float32) for n in num_tokens] if weights_in else None
    for dst in range(num_ranks):  # ascending rank order fixes the float32 summation order
        for source in range(num_ranks):
            rows = np.nonzero(srcs[dst][:, 0] == source)[0]
            tokens = srcs[dst][rows, 1]
            acc[source][tokens] = acc[source][tokens] + ys[dst][rows]
            if weights_in is not None:
                acc_weights[source][tokens] = acc_weights[source][tokens] + weights_in[dst][rows]

    results = []
    for rank in range(num_ranks):
        total = acc[rank]
        for bias in _bias_list(None if biases is None else biases[rank], rank):
            bias = np.asarray(bias, dtype=np.float32)
            if bias.shape != total.shape:
                raise ValueError(f"a bias of rank {rank} has shape {bias.shape}; it must be {total.shape}")
            total = total + bias
        out = bf16_round(total)
        results.append(out if weights_in is None else (out, acc_weights[rank]))
    return results


# ---------------------------------------------------------------------------------------------------------------
# Low-latency dispatch and combine.


def low_latency_dispatch(
    xs, topk_idxs, num_experts: int, max_tokens: int, use_fp8: bool = True, round_scale: bool = False
):
    """LL dispatch over all ranks. Per rank returns ``(recv_x [E_loc, R*T, H] float32, recv_scales
    [E_loc, R*T, H/128] float32 or None, recv_count [E_loc] int32, recv_src [E_loc, R*T, 2] int64)``.

    Every valid (token, expert) pair is delivered, so a token with two experts on one rank arrives twice. Rows of
    local expert e are grouped by source rank ascending, then source token ascending; rows past ``recv_count[e]``
    are zero, with -1 in ``recv_src``. ``recv_x`` holds ``fp8_cast`` values (scales in ``recv_scales``), or the
    input values unchanged when ``use_fp8`` is False. Each rank may have at most ``max_tokens`` tokens, and ``xs``
    must hold BF16 values (float32 that BF16 holds exactly: ``bf16_round(x)``), as the library's inputs do; others
    are refused, since the FP8 cast of a value the library could never receive would differ from its own.
    """
    num_ranks = _num_ranks(("xs", xs), ("topk_idxs", topk_idxs))
    experts_per_rank = _experts_per_rank(num_experts, num_ranks)
    max_tokens = _integer(max_tokens, "max_tokens")
    xs = [np.asarray(x, dtype=np.float32) for x in xs]
    if any(x.ndim != 2 for x in xs):
        raise ValueError("every xs entry must be [num_tokens, hidden]")
    hidden = xs[0].shape[1]
    if any(x.shape[1] != hidden for x in xs):
        raise ValueError("the xs entries disagree on the hidden size")
    for rank, x in enumerate(xs):
        if x.shape[0] > max_tokens:
            raise ValueError(f"rank {rank} has {x.shape[0]} tokens, more than max_tokens ({max_tokens})")
        _check_bf16_values(x, f"xs of rank {rank}")

    topks = _checked_topks(topk_idxs, num_experts, [x.shape[0] for x in xs])
    sent_x, sent_scales, tokens_of_expert = [], [], []
    for rank, x in enumerate(xs):
        topk = _first_namings(topks[rank])
        if use_fp8:
            q, scales = fp8_cast(x, round_scale)
            sent_x.append(q)
            sent_scales.append(scales)
        else:
            sent_x.append(x)
        # Valid (token, expert) pairs sorted by expert, then token: each expert's tokens form one ascending run.
        tokens, slots = np.nonzero(topk >= 0)
        experts = topk[tokens, slots]
        order = np.lexsort((tokens, experts))
        tokens, experts = tokens[order], experts[order]
        bounds = np.searchsorted(experts, np.arange(num_experts + 1))
        tokens_of_expert.append([tokens[bounds[e] : bounds[e + 1]] for e in range(num_experts)])

    rows_per_expert = num_ranks * max_tokens
    results = []
    for dst in range(num_ranks):
        recv_x = np.zeros((experts_per_rank, rows_per_expert, hidden), dtype=np.float32)
        recv_scales = (
            np.zeros((experts_per_rank, rows_per_expert, hidden // FP8_BLOCK), dtype=np.float32) if use_fp8 else None
        )
        recv_count = np.zeros(experts_per_rank, dtype=np.int32)
        recv_src = np.full((experts_per_rank, rows_per_expert, 2), -1, dtype=np.int64)
        for local in range(experts_per_rank):
            expert = dst * experts_per_rank + local
            row = 0
            for src in range(num_ranks):
                tokens = tokens_of_expert[src][expert]
                end = row + tokens.size
                recv_x[local, row:end] = sent_x[src][tokens]
                if use_fp8:
                    recv_scales[local, row:end] = sent_scales[src][tokens]
                recv_src[local, row:end, 0] = src
                recv_src[local, row:end, 1] = tokens
                row = end
            recv_count[local] = row
        results.append((recv_x, recv_scales, recv_count, recv_src))
    return results


def low_latency_combine(ys, topk_idxs, topk_weights, recv_srcs):
    """LL combine over all ranks. Per rank returns out [N_r, H] float32 holding BF16 values:
    ``acc = 0.0f``; for k ascending with ``topk_idx[t, k] != -1``: ``acc = acc + (w[t, k] * y)``, product and sum
    each rounded to float32; ``out[t] = bf16(acc)``.

    ``ys[d]`` [E_loc, R*T, H] holds rank d's expert outputs in the dispatch layout; the row of (token t of rank r,
    expert e) is the row of local expert e % E_loc on rank e // E_loc whose ``recv_src`` is (r, t).
    """
    if topk_weights is None:
        raise ValueError("topk_weights is required: the low-latency combine weights every slot")
    num_ranks = _num_ranks(
        ("ys", ys), ("topk_idxs", topk_idxs), ("topk_weights", topk_weights), ("recv_srcs", recv_srcs)
    )
    ys = [np.asarray(y, dtype=np.float32) for y in ys]
    if ys[0].ndim != 3 or any(y.shape != ys[0].shape for y in ys):
        raise ValueError("the ys entries must all be [local_experts, num_ranks * max_tokens, hidden], one shape")
    experts_per_rank, rows_per_expert, hidden = ys[0].shape
    num_experts = experts_per_rank * num_ranks
    topks = _checked_topks(topk_idxs, num_experts)
    weights = [_check_weights(w, topks[rank].shape, rank) for rank, w in enumerate(topk_weights)]
    num_tokens = [t.shape[0] for t in topks]

    # Index every received row by the key (source rank, expert, source token).
    key_stride = max(num_tokens) + 1
    keys, holders = [], []
    for dst in range(num_ranks):
        src = np.asarray(recv_srcs[dst])
        if src.shape != (experts_per_rank, rows_per_expert, 2) or not np.issubdtype(src.dtype, np.integer):
            raise ValueError(f"recv_src of rank {dst} must be integer [{experts_per_rank}, {rows_per_expert}, 2]")
        if np.any(src[src[:, :, 0] < 0] != -1):
            raise ValueError(f"recv_src of rank {dst} has a row that is neither (-1, -1) (unused) nor a source")
        local, row = np.nonzero(src[:, :, 0] >= 0)
        source, token = src[local, row, 0].astype(np.int64), src[local, row, 1].astype(np.int64)
        if source.size and source.max() >= num_ranks:
            raise ValueError(f"recv_src of rank {dst} names a source rank outside [0, {num_ranks})")
        if np.any(token < 0) or np.any(token >= np.asarray(num_tokens, dtype=np.int64)[source]):
            raise ValueError(f"recv_src of rank {dst} names a token its source rank does not have")
        expert = dst * experts_per_rank + local
        keys.append((source * num_experts + expert) * key_stride + token)
        holders.append(np.stack([np.full(local.size, dst), local, row], axis=1))
    keys = np.concatenate(keys)
    holders = np.concatenate(holders)
    order = np.argsort(keys, kind="stable")
    keys, holders = keys[order], holders[order]
    if np.any(keys[1:] == keys[:-1]):
        raise ValueError("recv_srcs hold the same (source rank, token) twice for one expert")

    results = []
    for rank in range(num_ranks):
        acc = np.zeros((num_tokens[rank], hidden), dtype=np.float32)
        for slot in range(topks[rank].shape[1]):  # k ascending fixes the float32 summation order
            tokens = np.nonzero(topks[rank][:, slot] >= 0)[0]
            experts = topks[rank][tokens, slot]
            wanted = (rank * num_experts + experts) * key_stride + tokens
            if tokens.size == 0:
                continue
            found = np.minimum(np.searchsorted(keys, wanted), keys.size - 1)
            missing = np.nonzero(keys[found] != wanted)[0] if keys.size else np.arange(tokens.size)
            if missing.size:
                token, expert = tokens[missing[0]], experts[missing[0]]
                raise ValueError(f"token {token} of rank {rank} was never received by expert {expert}")
            values = np.empty((tokens.size, hidden), dtype=np.float32)
            for dst in range(num_ranks):
                here = holders[found, 0] == dst
                values[here] = ys[dst][holders[found[here], 1], holders[found[here], 2]]
            products = weights[rank][tokens, slot][:, None] * values  # float32 product, rounded on its own
            acc[tokens] = acc[tokens] + products
        results.append(bf16_round(acc))
    return results
