"""Packing patcher (option ``packing``): packed batches attend within each document, with no [T, T] mask.

A packed (padding-free) batch is what TRL's collators give: no attention_mask, position_ids that restart
at each document, often ``cu_seq_lens_q/k`` and ``max_length_q/k``. transformers' sdpa and eager paths
turn it into a dense block-diagonal [B, 1, T, T] mask without a cache, and with a cache (the default of
``use_cache``) let documents attend to each other. Per model instance, ``patch_model(packing=True)``:

1. binds an instance forward on the decoder backbone (the spec's [packing] class, e.g. LlamaModel) that,
   once per forward, finds the documents of a packed batch (from cu_seq_lens_q when given, else where
   position_ids do not step by 1, transformers' own rule) and hands them on as one keyword argument
   (``fastkern_documents``), which transformers passes through the decoder layers to every attention
   call, gradient-checkpoint recomputation included. In place of the attention_mask it passes an empty
   [B, 1, T, 0] tensor: transformers returns a 4-D mask as given instead of building one, and any
   attention that did not get the documents fails on its shape instead of attending across documents;
2. makes sure every attention module of the backbone routes such a call to fastkern: the rope patcher's
   forward does (attention.py); with rope off this patcher binds the same forward with the family's own
   rotation. That forward runs fastkern.ops.document_attention (varlen flash attention on CUDA where torch
   has it, else SDPA per document; eager math per document under "eager" or with a logit softcap).

Nothing shared changes: ``config._attn_implementation`` keeps what the user set (it is read per call, so
``set_attn_implementation`` after patching applies and the packed path follows it between sdpa and
eager), and transformers' attention and mask registries are left alone. Every other call (padded
batches, a single document per row, decoding against a cache, ``output_attentions=True``, which takes
transformers' exact path to return the weights, and calls traced by torch.compile, where finding the
documents would need their bounds on the host) runs transformers' own masks and attention.
flash_attention_2/3 already run packed batches varlen from cu_seq_lens or position_ids: left as they are.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..ops.document_attention import document_attention
from .context import PatchContext, fastkern_forward_kind, instance_forward
from .report import PatchReport

_KIND = "packing"
_BASES = ("sdpa", "eager")  # attention implementations whose packed path fastkern replaces
DOCUMENTS_KWARG = "fastkern_documents"


@dataclass(frozen=True)
class PackedDocuments:
    """Document boundaries of a packed [B, T] batch, flattened over rows (row r is tokens r*T..(r+1)*T)."""

    batch: int
    length: int  # T
    bounds: tuple[int, ...]  # host: 0, end of document 0, ..., B*T; row ends are always boundaries
    cu_seqlens: torch.Tensor  # the same as int32 on the model's device (what varlen kernels take)
    max_seqlen: int

    @property
    def count(self) -> int:
        return len(self.bounds) - 1


def _bounds_from_position_ids(position_ids: torch.Tensor, batch: int, length: int) -> list[int]:
    if position_ids.dim() != 2 or position_ids.shape[-1] != length or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"fastkern packing: position_ids must be [batch, seq_len] = [{batch}, {length}] (or [1, {length}]), "
            f"got {tuple(position_ids.shape)}"
        )
    position_ids = position_ids.expand(batch, length)
    # A document starts wherever the position does not follow the previous one (transformers'
    # find_packed_sequence_indices rule), and at every row start.
    starts = torch.ones(batch, length, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = (position_ids[:, 1:] - position_ids[:, :-1]) != 1
    flat_starts = starts.flatten().cpu().nonzero().flatten().tolist()  # the one device-to-host copy
    return flat_starts + [batch * length]


def _bounds_from_cu_seqlens(cu_seq_lens: torch.Tensor, batch: int, length: int) -> list[int]:
    if not isinstance(cu_seq_lens, torch.Tensor) or cu_seq_lens.dim() != 1 or cu_seq_lens.dtype.is_floating_point:
        raise ValueError(f"fastkern packing: cu_seq_lens_q must be a 1-D integer tensor, got {cu_seq_lens!r:.80}")
    bounds = cu_seq_lens.tolist()
    total = batch * length
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(
            f"fastkern packing: cu_seq_lens_q must rise from 0 to batch*seq_len = {total}, got "
            f"{bounds[:4]}{'...' if len(bounds) > 4 else ''}{bounds[-1:] if len(bounds) > 4 else ''}"
        )
    # Rows never share a document (transformers' masks work per row), so row ends are boundaries too.
    return sorted(set(bounds) | {r * length for r in range(batch + 1)})


def find_documents(batch: int, length: int, device, position_ids=None, cu_seq_lens_q=None,
                   cu_seq_lens_k=None) -> PackedDocuments | None:
    """The documents of a [batch, length] batch without attention_mask; None if each row is one document."""
    if cu_seq_lens_q is not None:
        bounds = _bounds_from_cu_seqlens(cu_seq_lens_q, batch, length)
        if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(
            cu_seq_lens_k.cpu(), cu_seq_lens_q.cpu()
        ):
            raise ValueError("fastkern packing: cu_seq_lens_k differs from cu_seq_lens_q in a self-attention forward")
    elif position_ids is not None:
        bounds = _bounds_from_position_ids(position_ids, batch, length)
    else:
        return None
    if len(bounds) - 1 <= batch:
        return None
    max_seqlen = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True)
    return PackedDocuments(batch, length, tuple(bounds), cu_seqlens, max_seqlen)


# ---------------------------------------------------------------------------------------------------
# The attention call of a packed batch (made by the attention forward of attention.py).


def packed_mask(documents: PackedDocuments, device) -> torch.Tensor:
    """What the backbone passes as attention_mask for a packed batch: [B, 1, T, 0], no memory.

    transformers returns a 4-D mask as given (so no [T, T] mask is built), and an attention that uses it
    as a mask fails on its shape: a packed batch never runs silently across documents."""
    return torch.empty((documents.batch, 1, documents.length, 0), dtype=torch.bool, device=device)


def is_packed_mask(attention_mask) -> bool:
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[-1] == 0


def packed_attention_function(base_function, implementation: str, documents: "PackedDocuments | None"):
    """The attention function for a call that got the documents of a packed batch (or its empty mask)."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if documents is None:
            # The mask was skipped for a packed batch but the boundaries did not reach this call: running on
            # without them would let documents see each other. Refuse instead of computing something wrong.
            raise RuntimeError(
                "fastkern packing: an attention call of a packed batch did not receive the document boundaries "
                f"(`{DOCUMENTS_KWARG}`); this transformers version does not pass keyword arguments through to "
                "attention. Patch with packing=False."
            )
        if not is_packed_mask(attention_mask):
            # A real mask reached this call: it says who attends to whom, as without fastkern.
            return base_function(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 **kwargs)
        if implementation not in _BASES:
            raise RuntimeError(f"fastkern packing: a packed batch reached attention under {implementation!r}")
        if implementation == "sdpa" and kwargs.get("softcap") is not None:
            # transformers' sdpa refuses a softcap: let it say so, as without fastkern.
            return base_function(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
        if not (getattr(module, "is_causal", True) and kwargs.get("is_causal") is not False):
            raise ValueError("fastkern packing: packed batches need causal attention; this layer is bidirectional")
        batch, heads, length, head_dim = query.shape
        if (batch, length) != (documents.batch, documents.length) or key.shape[2] != length:
            raise RuntimeError(
                f"fastkern packing: attention got q {tuple(query.shape)}, k {tuple(key.shape)} for a packed batch of "
                f"[{documents.batch}, {documents.length}] tokens (a non-empty cache under a packed batch?)"
            )

        # [B, H, T, D] (transposed views of [B, T, H, D] projections) -> [B*T, H, D] views, no copy.
        def flat(t):
            return t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[3])

        out = document_attention(
            flat(query), flat(key), flat(value), documents.cu_seqlens,
            bounds=list(documents.bounds), max_seqlen=documents.max_seqlen, scale=scaling,
            sliding_window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap"), dropout_p=dropout,
            backend="eager" if implementation == "eager" else "auto",
        )
        return out.view(batch, length, heads, out.shape[-1]), None

    return attention


# ---------------------------------------------------------------------------------------------------
# The backbone forward.


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


@instance_forward(_KIND)
def packed_backbone_forward(self, *args, **kwargs):
    forward = type(self).forward
    if torch.compiler.is_compiling():
        # Finding the documents reads their bounds on the host (a graph break, and a guard on every batch's
        # layout): a traced call takes transformers' own path, which torch.compile supports.
        return forward(self, *args, **kwargs)
    if self.config._attn_implementation not in _BASES:  # read per call: set_attn_implementation() applies
        return forward(self, *args, **kwargs)
    bound = _forward_signature(type(self)).bind(self, *args, **kwargs)
    arguments = dict(bound.arguments)
    extra = arguments.pop(next(n for n, p in bound.signature.parameters.items() if p.kind is p.VAR_KEYWORD), {})
    arguments.pop("self")
    if extra.get("output_attentions", getattr(self.config, "output_attentions", False)):
        return forward(self, *args, **kwargs)  # the weights come from transformers' exact eager path
    documents = _documents_of_call(self, arguments, extra)
    if documents is None:
        return forward(self, *args, **kwargs)
    arguments["attention_mask"] = packed_mask(documents, documents.cu_seqlens.device)
    return forward(self, **arguments, **extra, **{DOCUMENTS_KWARG: documents})


def _documents_of_call(backbone: nn.Module, arguments: dict, extra: dict) -> PackedDocuments | None:
    if arguments.get("attention_mask") is not None or DOCUMENTS_KWARG in extra:
        return None
    if not getattr(backbone.config, "is_causal", True) or getattr(backbone.config, "use_bidirectional_attention", False):
        return None
    # transformers 5.25 renamed the backbone's `past_key_values` parameter to `cache` (the old name still
    # accepted, then found in `extra`); 5.17-5.23 name it `past_key_values`. Look under every name.
    cache = next((c for c in (arguments.get("cache"), arguments.get("past_key_values"), extra.get("cache"),
                              extra.get("past_key_values")) if c is not None), None)
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
        return None  # continuing from a cache: one sequence per row, as transformers sees it
    embeds = arguments.get("inputs_embeds")
    ids = arguments.get("input_ids")
    reference = embeds if embeds is not None else ids
    if reference is None or reference.dim() < 2:
        return None
    batch, length = reference.shape[0], reference.shape[1]
    return find_documents(batch, length, reference.device, position_ids=arguments.get("position_ids"),
                          cu_seq_lens_q=extra.get("cu_seq_lens_q"), cu_seq_lens_k=extra.get("cu_seq_lens_k"))


# ---------------------------------------------------------------------------------------------------
# The patcher.


class PackingPatcher:
    def apply(self, ctx: PatchContext, value) -> None:
        backbones = {}
        for spec, section in ctx.section("packing"):
            try:
                backbones[spec.resolve(section["class"])] = spec
            except KeyError:
                ctx.report.problems.append(f"{spec.source} [packing]: missing key 'class'")
            except LookupError as exc:
                ctx.report.problems.append(f"{exc}; packing not patched")
        for name, module in ctx.named_modules():
            if type(module) not in backbones:
                continue
            if fastkern_forward_kind(module) == _KIND:
                ctx.report.add_skipped(name, _KIND, "already patched")
                continue
            implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
            if implementation not in _BASES:
                if isinstance(implementation, str) and implementation.startswith("flash_attention"):
                    why = f"{implementation} already runs packed batches varlen (cu_seq_lens or position_ids); left as is"
                else:
                    why = f"attention implementation {implementation!r} is not one fastkern packs (sdpa, eager); left as is"
                ctx.report.add_skipped(name, _KIND, why)
                continue
            attention, why = _attention_plan(ctx, backbones[type(module)], module, name)
            if why is not None:
                ctx.report.add_skipped(name, _KIND, why)
                continue
            from .attention import packed_attention_forward

            for attn_name, attn, config, verdict in attention:
                ctx.replace_forward_probed(attn, attn_name, packed_attention_forward,
                                           f"{type(attn).__name__}: packed batches routed to per-document attention "
                                           "(transformers' rotation; rope is off)", {"attention": config}, verdict)
            ctx.replace_forward(module, name, packed_backbone_forward,
                                "packed batches: per-document attention, no [T, T] mask (under sdpa and eager; "
                                "config._attn_implementation unchanged)", {})

    def remove(self, model: nn.Module, report: PatchReport) -> None:
        # Instance forwards and _fastkern_* attributes are removed by unpatch_model; nothing shared was changed.
        return None


def _attention_plan(ctx: PatchContext, spec, backbone: nn.Module, backbone_name: str):
    """([(name, attention module, AttentionConfig, probe verdict)] to bind, None) when every attention module of the
    backbone can route a packed call, else ([], why not). Attention modules the rope patcher bound already
    route packed calls; the others get the same forward with the family's own rotation, probed first."""
    from .attention import _config_from_section, _probe, _rotates, module_problem

    section = spec.sections.get("attention")
    if section is None or "class" not in section:
        return [], f"{spec.source} has no [attention] section: attention calls cannot receive the documents"
    try:
        cls = spec.resolve(section["class"])
        config = _config_from_section(spec, section, fused_rope=False)
    except (LookupError, ValueError) as exc:
        return [], f"attention not resolvable ({exc})"
    plan, probed = [], {}
    for attn_name, attn in backbone.named_modules(prefix=backbone_name):
        if type(attn) is not cls:
            continue
        kind = fastkern_forward_kind(attn)
        if kind in ("rope", _KIND):
            continue
        if "forward" in attn.__dict__:
            return [], f"{attn_name}: forward already overridden on this instance; packed calls could not reach it"
        if (why := module_problem(attn, config)) is not None:
            return [], f"{attn_name}: {why}"
        param = next(attn.parameters(), None)
        key = (param.dtype if param is not None else None, _rotates(attn, config))
        if key not in probed:
            probed[key] = _probe(attn, config)
        if probed[key].skips:
            return [], f"{attn_name}: {probed[key].reason}"
        plan.append((attn_name, attn, config, probed[key]))
    return plan, None


PACKING_PATCHER = PackingPatcher()
