"""Causal attention over packed documents, without a [T, T] mask.

    document_attention(query, key, value, cu_seqlens, *, max_seqlen=None, bounds=None, scale=None,
                       sliding_window=None, softcap=None, dropout_p=0.0, backend="auto") -> [T, Hq, D]

query [T, Hq, D] and key/value [T, Hk, D] hold the tokens of all documents one after another (the
layout of varlen flash attention; Hq a multiple of Hk); document d is rows cu_seqlens[d]:cu_seqlens[d+1].
Each token attends causally within its own document (and to the last ``sliding_window`` tokens of it
when given, itself included, as transformers' sliding masks count). Result = running each document
alone through causal attention.

Backends (``backend="auto"`` picks the first that applies):
* "varlen": torch.nn.attention.varlen.varlen_attn (flash attention over all documents in one launch),
  when torch has it (found by feature detection, not by version), the tensors are CUDA fp16/bf16, there
  is no softcap and no dropout, and the installed signature can express the window, scale and GQA.
* "sdpa": torch's scaled_dot_product_attention once per document, is_causal (or an [L, L] window mask
  for a document longer than the window). Exact, O(sum L_i^2) work, any device; also the CPU path.
* "eager": fastkern.reference.document_attention (matmul, softcap, mask, fp32 softmax, dropout,
  matmul per document): the only backend with a logit softcap.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import torch
import torch.nn.functional as F

from ..reference.document_attention import document_attention_reference, document_causal_mask
from ._common import FLOAT_DTYPES, check_tensor

_OP = "fastkern.ops.document_attention"
BACKENDS = ("auto", "varlen", "sdpa", "eager")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _varlen_entry():
    """(varlen_attn, names of its parameters) if this torch has it, else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    try:
        params = frozenset(inspect.signature(varlen_attn).parameters)
    except (TypeError, ValueError):
        return None
    return varlen_attn, params


_varlen_failed: list[str] = []  # set once if the varlen kernel raised on this machine; auto stops trying it


def varlen_unavailable_reason(query, key, *, scale, sliding_window, softcap, dropout_p, max_seqlen) -> str | None:
    """None if the varlen backend can run this call, else why not (for errors and docs)."""
    entry = _varlen_entry()
    if entry is None:
        return "torch has no torch.nn.attention.varlen.varlen_attn"
    if _varlen_failed:
        return f"varlen_attn failed earlier in this process: {_varlen_failed[0]}"
    _, params = entry
    if query.device.type != "cuda":
        return f"varlen_attn needs CUDA tensors, got {query.device.type}"
    if query.dtype not in _FLASH_DTYPES:
        return f"varlen_attn needs fp16/bf16, got {query.dtype}"
    if query.shape[-1] % 8 or query.shape[-1] > 256:
        return f"flash attention needs head_dim a multiple of 8 and <= 256, got {query.shape[-1]}"
    if softcap is not None:
        return "varlen_attn has no logit softcap"
    if dropout_p > 0:
        return "varlen_attn has no dropout"
    window_matters = sliding_window is not None and max_seqlen is not None and max_seqlen > sliding_window
    if "window_size" not in params and (window_matters or "is_causal" not in params):
        return "this varlen_attn cannot express a causal sliding window"
    if "scale" not in params and not math.isclose(scale, query.shape[-1] ** -0.5, rel_tol=1e-12):
        return "this varlen_attn has no scale argument and the scale is not 1/sqrt(head_dim)"
    return None


def _check(query, key, value, bounds, scale, sliding_window, softcap, dropout_p, backend):
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(_OP, name, t, dtypes=FLOAT_DTYPES)
        if t.dim() != 3:
            raise ValueError(f"{_OP}: `{name}` must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if t.device != query.device or t.dtype != query.dtype:
            raise ValueError(f"{_OP}: `{name}` is {t.dtype} on {t.device}, `query` is {query.dtype} on {query.device}")
    if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
        raise ValueError(f"{_OP}: key {tuple(key.shape)} / value {tuple(value.shape)} do not match query {tuple(query.shape)}")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"{_OP}: query head_dim {query.shape[2]} != key head_dim {key.shape[2]}")
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        raise ValueError(f"{_OP}: query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
    tokens = query.shape[0]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != tokens:
        raise ValueError(f"{_OP}: cu_seqlens must run from 0 to the token count {tokens}, got {bounds[:3]}...{bounds[-2:]}")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{_OP}: cu_seqlens must be non-decreasing")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"{_OP}: sliding_window must be a positive int or None, got {sliding_window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{_OP}: softcap must be positive or None, got {softcap!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{_OP}: dropout_p must be in [0, 1), got {dropout_p!r}")
    if scale is not None and not scale > 0:
        raise ValueError(f"{_OP}: scale must be positive or None, got {scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{_OP}: backend must be one of {BACKENDS}, got {backend!r}")


def _host_bounds(cu_seqlens) -> list[int]:
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"{_OP}: cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        return cu_seqlens.tolist()
    return [int(b) for b in cu_seqlens]


def select_backend(query, key, *, bounds, scale=None, sliding_window=None, softcap=None, dropout_p=0.0,
                   backend="auto") -> str:
    """The backend document_attention will run for these arguments (raises if a forced one cannot)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    max_seqlen = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
    if backend == "eager":
        return "eager"
    if backend == "sdpa":
        if softcap is not None:
            raise ValueError(f"{_OP}: the sdpa backend cannot apply a logit softcap; use backend='eager' or 'auto'")
        return "sdpa"
    reason = varlen_unavailable_reason(query, key, scale=scale, sliding_window=sliding_window, softcap=softcap,
                                       dropout_p=dropout_p, max_seqlen=max_seqlen)
    if backend == "varlen":
        if reason is not None:
            raise ValueError(f"{_OP}: backend='varlen' cannot run here: {reason}")
        return "varlen"
    # "auto" takes varlen only for token-major contiguous q and k: the layout the end-to-end SFT run
    # measured. Other layouts (transformers' own rope hands over head-major tensors) go per document.
    # varlen on head-major input is correct (GPU test on the H100), but whether its contiguous copy
    # beats per-document SDPA has not been measured.
    if reason is None and query.is_contiguous() and key.is_contiguous():
        return "varlen"
    return "eager" if softcap is not None else "sdpa"


def _varlen(query, key, value, bounds, cu_seqlens, max_seqlen, scale, sliding_window):
    fn, params = _varlen_entry()
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.device != query.device:
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32).to(query.device, non_blocking=True)
    cu_seqlens = cu_seqlens.to(torch.int32)
    kwargs = {}
    if "window_size" in params:
        left = -1 if sliding_window is None or max_seqlen <= sliding_window else sliding_window - 1
        kwargs["window_size"] = (left, 0)  # (left, 0): causal, `left` earlier tokens visible
    else:
        kwargs["is_causal"] = True
    if "scale" in params:
        kwargs["scale"] = scale
    group = query.shape[1] // key.shape[1]
    if group > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    # Only token-major contiguous [T, H, D] operands go to the flash kernel (backend="varlen" forced
    # with other strides copies). The projection views (fastkern's in-place rope) already are;
    # transformers' own rope returns head-major [H, T, D] tensors, seen here as [T, H, D] views with a
    # head stride of T*D: the suspected cause of the gradient mismatch in the one H100 bench run that
    # passed such views straight to varlen_attn (see select_backend).
    query, key, value = (t if t.is_contiguous() else t.contiguous() for t in (query, key, value))
    return fn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _sdpa(query, key, value, bounds, scale, sliding_window, dropout_p):
    group = query.shape[1] // key.shape[1]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length == 0:
            continue
        q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, Hq, L, D]
        k = key[start:end].transpose(0, 1).unsqueeze(0)
        v = value[start:end].transpose(0, 1).unsqueeze(0)
        if sliding_window is None or length <= sliding_window:
            # A window at least as long as the document changes nothing: plain causal, flash-eligible.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale, is_causal=length > 1,
                                                 enable_gqa=group > 1)
        else:
            # Masked SDPA kernels do not take GQA, so repeat k/v like transformers' sdpa path does.
            if group > 1:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            mask = document_causal_mask(length, sliding_window, query.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        outs.append(out[0].transpose(0, 1))
    if not outs:
        return query.new_empty((0, query.shape[1], value.shape[-1]))
    return torch.cat(outs, dim=0)


def document_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens,
    *,
    max_seqlen: int | None = None,
    bounds: list[int] | None = None,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention within each packed document; [T, Hq, D] (see the module docstring).

    cu_seqlens: [N + 1] document starts and the total (int tensor, or a list of ints). ``bounds`` is the
    same as a host list when the caller already has one (saves a device-to-host copy per call).
    """
    if bounds is None:
        bounds = _host_bounds(cu_seqlens)
    _check(query, key, value, bounds, scale, sliding_window, softcap, dropout_p, backend)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    if max_seqlen is None:
        max_seqlen = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
    chosen = select_backend(query, key, bounds=bounds, scale=scale, sliding_window=sliding_window, softcap=softcap,
                            dropout_p=dropout_p, backend=backend)
    if chosen == "varlen":
        try:
            return _varlen(query, key, value, bounds, cu_seqlens, max_seqlen, scale, sliding_window)
        except RuntimeError as exc:
            if backend == "varlen":
                raise
            # e.g. a GPU generation the flash build does not cover: say so once, then use per-document SDPA.
            _varlen_failed.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
            warnings.warn(f"{_OP}: varlen_attn failed ({_varlen_failed[0]}); using per-document SDPA from now on")
            chosen = "sdpa"
    if chosen == "sdpa":
        return _sdpa(query, key, value, bounds, scale, sliding_window, dropout_p)
    return document_attention_reference(query, key, value, bounds, scale=scale, sliding_window=sliding_window,
                                        softcap=softcap, dropout_p=dropout_p)
