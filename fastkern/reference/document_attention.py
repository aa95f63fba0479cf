"""Reference attention over packed documents: plain matmul-softmax-matmul, one document at a time.

Layout as in varlen flash attention: query [T, Hq, D], key/value [T, Hk, D] with T the total number of
tokens of all documents, Hq a multiple of Hk (grouped-query attention), document d being the rows
``bounds[d]:bounds[d + 1]``. Every token attends causally to its own document only, optionally to the
last ``sliding_window`` tokens only (itself included, the convention of transformers' masks), with
Gemma-2's logit softcap ``tanh(s / softcap) * softcap`` applied before the mask.

The order of operations is transformers' ``eager_attention_forward`` (scores in the input dtype, times
the scale, softcap, mask, softmax in fp32, cast back, dropout, times v), so on one document it gives what
transformers' eager attention gives on that document alone. It is the "eager" backend of
fastkern.ops.document_attention and, in float64, the oracle of its tests.
"""

from __future__ import annotations

import torch


def document_causal_mask(length: int, sliding_window: int | None, device) -> torch.Tensor:
    """[length, length] bool, True where query i may attend key j: j <= i and i - j < sliding_window."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    allowed = j <= i
    if sliding_window is not None:
        allowed &= (i - j) < sliding_window
    return allowed


def document_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """[T, Hq, D] output; see the module docstring. ``bounds`` = [0, end_0, end_1, ..., T] (host ints)."""
    heads, kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    group = heads // kv_heads
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        q = query[start:end].transpose(0, 1)  # [Hq, L, D]
        k = key[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        v = value[start:end].transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(q, k.transpose(1, 2)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        allowed = document_causal_mask(end - start, sliding_window, query.device)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if dropout_p > 0:
            weights = torch.nn.functional.dropout(weights, p=dropout_p, training=True)
        outs.append(torch.matmul(weights, v).transpose(0, 1))  # [L, Hq, D]
    if not outs:
        return query.new_empty((0, heads, value.shape[-1]))
    return torch.cat(outs, dim=0)
