"""NumPy reference implementation of the semantics in DESIGN.md section 3: the oracle the GPU tests compare with.

Functions take and return per-rank data the way DESIGN.md section 6 specifies. They are written for clarity, not
speed: loops follow the definitions.
"""

from __future__ import annotations


import numpy as np

__all__ = ["dispatch_layout"]


def _layout_one(topk_idx: np.ndarray, num_experts: int, num_ranks: int):
    topk_idx = np.asarray(topk_idx)
    if topk_idx.ndim != 2:
        raise ValueError(f"topk_idx has shape {topk_idx.shape}; it must be [num_tokens, num_topk]")
    if not np.issubdtype(topk_idx.dtype, np.integer):
        raise ValueError(f"topk_idx has dtype {topk_idx.dtype}; it must be an integer type")
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
