"""Packing patcher (option ``packing``): packed batches attend within each document, with no [T, T] mask.

A packed (padding-free) batch is what TRL's collators give: no attention_mask, position_ids that restart
at each document, often ``cu_seq_lens_q/k`` and ``max_length_q/k``. transformers' sdpa and eager paths
turn it into a dense block-diagonal [B, 1, T, T] mask without a cache, and with a cache (the default of
``use_cache``) let documents attend to each other. Per model instance, ``patch_model(packing=True)``:

1. registers (once per process, under fastkern-only names) an attention function and a mask function
   for each of "sdpa" and "eager" in transformers' ``AttentionInterface`` / ``AttentionMaskInterface``,
   and sets this model's ``config._attn_implementation`` to the fastkern name ("sdpa" ->
   "fastkern_packed_sdpa"). Other models keep their own config and are untouched;
2. binds an instance forward on the decoder backbone (the spec's [packing] class, e.g. LlamaModel) that,
   once per forward, finds the documents of a packed batch (from cu_seq_lens_q when given, else where
   position_ids do not step by 1, transformers' own rule) and hands them on as one keyword argument
   (``fastkern_documents``), which transformers passes through the decoder layers to every attention
   call, gradient-checkpoint recomputation included.

For a packed batch the mask function returns None instead of building the mask and the attention function
runs fastkern.ops.document_attention (varlen flash attention on CUDA where torch has it, else SDPA per
document; eager math per document under "eager" or with a logit softcap). Every other call (padded
batches, a single document per row, decoding against a cache) goes to transformers' own "sdpa"/"eager"
functions unchanged, so such batches give exactly what they gave before.
flash_attention_2/3 already run packed batches varlen from cu_seq_lens or position_ids: left as they are.
unpatch_model puts the original attention implementation name back.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..ops.document_attention import document_attention
from .core import PatchContext, instance_forward
from .report import PatchReport

_KIND = "packing"
_PREFIX = "fastkern_packed_"
_BASES = ("sdpa", "eager")  # attention implementations whose packed path fastkern replaces
DOCUMENTS_KWARG = "fastkern_documents"

# The documents of the packed batch whose backbone forward is running in this thread/task; read by the
# mask function, which transformers calls without position_ids or any other argument that would tell.
_ACTIVE_DOCUMENTS: contextvars.ContextVar["PackedDocuments | None"] = contextvars.ContextVar(
    "fastkern_active_documents", default=None
)


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
# The attention and mask functions registered with transformers.


def _transformers_interfaces():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS


@functools.cache
def _family_eager_attention(module_type: type):
    """The eager_attention_forward of the modeling file that defines this attention class (what its
    forward falls back to for "eager"; Gemma2's applies the softcap)."""
    fn = getattr(sys.modules.get(module_type.__module__), "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(
            f"fastkern packing: {module_type.__module__} has no eager_attention_forward for {module_type.__name__}; "
            "unpatch with packing=False"
        )
    return fn


def _base_attention(base: str, module: nn.Module):
    if base == "eager":
        return _family_eager_attention(type(module))
    attention_functions, _ = _transformers_interfaces()
    return attention_functions[base]


def _make_attention_function(base: str):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        documents = kwargs.pop(DOCUMENTS_KWARG, None)
        packed = documents is not None and attention_mask is None
        if documents is None and attention_mask is None and _ACTIVE_DOCUMENTS.get() is not None:
            # The mask was skipped for a packed batch but the boundaries did not reach this call: running on
            # without them would let documents see each other. Refuse instead of computing something wrong.
            raise RuntimeError(
                "fastkern packing: an attention call of a packed batch did not receive the document boundaries "
                f"(`{DOCUMENTS_KWARG}`); this transformers version does not pass keyword arguments through to "
                "attention. Patch with packing=False."
            )
        if packed and (base == "sdpa" and kwargs.get("softcap") is not None):
            packed = False  # transformers' sdpa refuses a softcap; let it say so, as without fastkern
        if packed and not (getattr(module, "is_causal", True) and kwargs.get("is_causal") is not False):
            raise ValueError("fastkern packing: packed batches need causal attention; this layer is bidirectional")
        if not packed:
            return _base_attention(base, module)(module, query, key, value, attention_mask, dropout=dropout,
                                                 scaling=scaling, **kwargs)
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
            backend="eager" if base == "eager" else "auto",
        )
        return out.view(batch, length, heads, out.shape[-1]), None

    attention.__name__ = attention.__qualname__ = f"{_PREFIX}{base}_attention"
    return attention


def _make_mask_function(base: str):
    def mask(*args, **kwargs):
        documents = _ACTIVE_DOCUMENTS.get()
        if (
            documents is not None
            and not args
            and kwargs.get("attention_mask") is None
            and kwargs.get("batch_size") == documents.batch
            and kwargs.get("q_length") == documents.length
            and kwargs.get("kv_length") == documents.length
        ):
            return None  # the attention function separates the documents itself
        _, mask_functions = _transformers_interfaces()
        return mask_functions._global_mapping[base](*args, **kwargs)

    mask.__name__ = mask.__qualname__ = f"{_PREFIX}{base}_mask"
    return mask


def register_implementations() -> None:
    """Add fastkern_packed_sdpa / fastkern_packed_eager to transformers' registries (idempotent; names only
    a config set by patch_model selects)."""
    attention_functions, mask_functions = _transformers_interfaces()
    for base in _BASES:
        name = _PREFIX + base
        if name not in attention_functions._global_mapping:
            attention_functions.register(name, _make_attention_function(base))
        if name not in mask_functions._global_mapping:
            mask_functions.register(name, _make_mask_function(base))


# ---------------------------------------------------------------------------------------------------
# The backbone forward.


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


@instance_forward(_KIND)
def packed_backbone_forward(self, *args, **kwargs):
    forward = type(self).forward
    implementation = getattr(self.config, "_attn_implementation", None)
    if not (isinstance(implementation, str) and implementation.startswith(_PREFIX)):
        return forward(self, *args, **kwargs)  # the attention implementation was changed since patching
    bound = _forward_signature(type(self)).bind(self, *args, **kwargs)
    arguments = dict(bound.arguments)
    extra = arguments.pop(next(n for n, p in bound.signature.parameters.items() if p.kind is p.VAR_KEYWORD), {})
    arguments.pop("self")
    documents = _documents_of_call(self, arguments, extra)
    if documents is None:
        return forward(self, *args, **kwargs)
    token = _ACTIVE_DOCUMENTS.set(documents)
    try:
        return forward(self, **arguments, **extra, **{DOCUMENTS_KWARG: documents})
    finally:
        _ACTIVE_DOCUMENTS.reset(token)


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
    option = _KIND
    default = True

    def apply(self, ctx: PatchContext, value) -> None:
        if value is not True:
            raise ValueError(f"fastkern.patch_model: packing must be True or False, got {value!r}")
        classes = {}
        for spec, section in ctx.section("packing"):
            try:
                classes[spec.resolve(section["class"])] = spec
            except KeyError:
                ctx.report.problems.append(f"{spec.source} [packing]: missing key 'class'")
            except LookupError as exc:
                ctx.report.problems.append(f"{exc}; packing not patched")
        for name, module in ctx.named_modules():
            if type(module) not in classes:
                continue
            config = getattr(module, "config", None)
            implementation = getattr(config, "_attn_implementation", None)
            if isinstance(implementation, str) and implementation.startswith(_PREFIX):
                ctx.report.add_skipped(name, _KIND, "already patched")
                continue
            if implementation not in _BASES:
                if isinstance(implementation, str) and implementation.startswith("flash_attention"):
                    why = f"{implementation} already runs packed batches varlen (cu_seq_lens or position_ids); left as is"
                else:
                    why = f"attention implementation {implementation!r} is not one fastkern packs (sdpa, eager); left as is"
                ctx.report.add_skipped(name, _KIND, why)
                continue
            detail = (f"packed batches: per-document attention, no [T, T] mask ({implementation} -> "
                      f"{_PREFIX}{implementation})")
            if ctx.replace_forward(module, name, packed_backbone_forward, detail, {}):
                register_implementations()
                config._attn_implementation = _PREFIX + implementation

    def remove(self, model: nn.Module, report: PatchReport) -> None:
        # Instance forwards are removed by unpatch_model; the configs still name the fastkern implementation.
        seen = set()
        for name, module in model.named_modules():
            config = getattr(module, "config", None)
            implementation = getattr(config, "_attn_implementation", None)
            if id(config) in seen or not (isinstance(implementation, str) and implementation.startswith(_PREFIX)):
                continue
            seen.add(id(config))
            config._attn_implementation = implementation.removeprefix(_PREFIX)
            report.add_patched(name, _KIND, f"config attention implementation {implementation} -> "
                                            f"{config._attn_implementation}")


PACKING_PATCHER = PackingPatcher()
