"""Attention patcher (option ``rope``): each supported attention module rotates q and k with the fused
fastkern.ops.rope kernel, on this model instance only.

transformers' attention modules call a module-level ``apply_rotary_pos_emb``; replacing that global
would change every model in the process. Instead each attention instance gets a bound forward that
reproduces its family's attention forward from the pieces the spec names (q/k/v or fused qkv
projections, optional q_norm/k_norm, the attention function looked up per call in
``ALL_ATTENTION_FUNCTIONS`` by ``config._attn_implementation``, o_proj, sliding window, logit
softcap and attention sinks where the family passes them) with the fused in-place rope in the middle.
Spec keys beyond the attribute names: ``qk_norm_scope`` (per head or over the whole projection),
``rope_layout`` (which elements pair and how cos/sin arrive; see _ROPE_LAYOUTS), ``rope_if`` /
``qk_norm_if`` (attributes that turn rope / the q,k norms off in some layers or configs; ``rope_if`` may
list conditions of which any turns rope on, each an attribute or "<attribute> is None"),
``sliding_window_if`` (an attribute that says whether this layer passes its window on at all: EXAONE 4
keeps the window on every layer but passes it in its sliding ones only), ``sinks`` (attention sink logits
passed as ``s_aux``) and ``output_dropout`` (an attribute holding the dropout probability the family
applies to o_proj's output, as Seed-OSS's ``residual_dropout``) and ``clip_qkv`` (a config attribute holding
a bound q, k and v are clamped to after the projections, OLMoE), each validated when the spec is resolved.

Validation, per attention class found in the model:
  1. the spec's class, ``eager_attention_forward`` and ``ALL_ATTENTION_FUNCTIONS`` resolve in the
     installed transformers (else a spec problem);
  2. the instance has the attributes the spec names;
  3. the patched forward is compared with the class forward on a small random input with random
     cos/sin (dropout off); a mismatch (transformers changed the attention) skips the class with the
     measured error in the report.

The same forward carries packed batches (option ``packing``, see packing.py): the patched backbone hands
the documents of a packed batch to every attention call as a keyword argument, and this forward sends
that call to fastkern's per-document attention instead of transformers' attention function. Routing it
here, on this model's own attention modules, leaves ``config._attn_implementation`` as the user set it
and transformers' attention registries untouched. With ``rope`` off, the packing patcher binds the same
forward with the family's own ``apply_rotary_pos_emb`` (``AttentionConfig.rotary``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

from ..ops.rope import rope
from ..ops.rope_qk_norm import rope_qk_norm
from . import packing, sdpa_backend
from .lora import call_projections
from .context import PatchContext, instance_forward, output_dropout_problem
from .probe import ProbeVerdict, meta_skip, probe_generator, run_probe, tolerance
from .report import PatchReport

_SLIDING_WINDOW = ("none", "config", "attribute")
# Where q_norm/k_norm apply: per head on the [B, T, H, D] view (Qwen3, Gemma3, Cohere), over the whole
# projection output before the view (OLMo 2/3 normalise all heads together), or per head after the
# rotation (HunYuan dense: the norms see rotated q and k).
_QK_NORM_SCOPES = ("head", "projection", "head_after_rope")
# How the family pairs the elements it rotates and how its cos/sin arrive (R = rotary dim):
#   half_split: pairs (i, i + R/2), cos = cat(f, f) (Llama and most families);
#   interleaved: pairs (2i, 2i + 1), cos = repeat_interleave(f, 2) (Cohere, Cohere2);
#   interleaved_from_half_split: pairs (2i, 2i + 1), cos = cat(f, f) of which the family uses the first
#     R/2 entries repeat-interleaved (GLM, GLM-4);
#   half_split_from_half: pairs (i, i + R/2), cos = f, only R/2 wide (gpt-oss).
_ROPE_LAYOUTS = ("half_split", "interleaved", "interleaved_from_half_split", "half_split_from_half")
# One rope_if condition: an attribute (true when its value is) or "<attribute> is None".
_CONDITION = re.compile(r"^([A-Za-z_]\w*)( is None)?$")
# Per-head q/k norms inside the rope launch (``fastkern.ops.rope_qk_norm``) where both are patched.
# Measured on an H100 (docs/rope_qk_norm.md, GPU time of fwd+bwd): 0.61-0.64x the separate launches with
# the norm weights frozen (LoRA, QLoRA), 0.66-0.72x with them trainable (full fine-tuning; the
# weight-gradient reduction reworked after an earlier 1.5x-slower measurement). Both on; the switches
# stay for benchmarks, which flip FUSE_QK_NORM per step (bench/e2e/grpo_dpo.py).
FUSE_QK_NORM = True
FUSE_QK_NORM_TRAINABLE = True


@dataclass(frozen=True)
class AttentionConfig:
    """What the bound forward needs beyond the module's own attributes (read from the spec)."""

    fused_qkv: str | None  # attribute of a fused [q; k; v] projection (Phi-3), else None
    q_norm: str | None  # RMSNorm over head_dim applied to q and k before rope (Qwen3, Gemma3)
    k_norm: str | None
    sliding_window: str  # "none": not passed; "config": config.sliding_window; "attribute": self.sliding_window
    sliding_window_if: str | None  # attribute that says whether this layer passes the window (else None is passed)
    softcap: str | None  # attribute holding the attention logit softcap (Gemma2), passed as softcap=
    qk_norm_scope: str  # one of _QK_NORM_SCOPES
    qk_norm_if: str | None  # attribute that says whether this layer has q_norm/k_norm at all (Cohere: use_qk_norm)
    rope_layout: str  # one of _ROPE_LAYOUTS
    # Conditions of which any says this layer rotates, as (attribute, is_none) pairs; None: every layer rotates
    # (NoPE layers: SmolLM3, Cohere2; EXAONE 4 rotates where sliding_window is None or in its sliding layers).
    rope_if: tuple[tuple[str, bool], ...] | None
    sinks: str | None  # attribute holding per-head attention sink logits (gpt-oss), passed as s_aux=
    output_dropout: str | None  # attribute holding the dropout probability applied to o_proj's output (Seed-OSS)
    clip_qkv: str | None  # config attribute holding a bound q, k and v are clamped to (OLMoE); None there: no clamp
    eager_forward: object  # the family's eager_attention_forward
    attention_functions: object  # transformers' ALL_ATTENTION_FUNCTIONS
    rotary: object = None  # None: fastkern's fused rope; else the family's apply_rotary_pos_emb (rope off)


def _attention_function(config: AttentionConfig, implementation: str):
    functions = config.attention_functions
    if hasattr(functions, "get_interface"):
        return functions.get_interface(implementation, config.eager_forward)
    return config.eager_forward if implementation == "eager" else functions[implementation]


def _project(module: nn.Module, config: AttentionConfig, hidden_states: torch.Tensor, norm: bool = True):
    """q, k, v as [B, T, H, D] views of the projection outputs (per-head q/k norms applied unless ``norm``
    is False: the caller then normalises them inside the rope launch)."""
    hidden_shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    if config.fused_qkv is not None:
        qkv = getattr(module, config.fused_qkv)(hidden_states)
        q_size = module.config.num_attention_heads * module.head_dim
        kv_size = module.config.num_key_value_heads * module.head_dim
        q, k, v = qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]
    else:
        q, k, v = call_projections((module.q_proj, module.k_proj, module.v_proj), hidden_states)
    if config.qk_norm_scope == "projection":
        q, k = _qk_norm(module, config, q, k)
    if config.clip_qkv is not None and (bound := getattr(module.config, config.clip_qkv)) is not None:
        # As OLMoE: after the projection-wide norms, before the per-head view. Out of place (the class
        # clamps in place), so fused-qkv slices and hooked projection outputs need no care; same values
        # and the same gradient (zero where clamped).
        q, k, v = q.clamp(-bound, bound), k.clamp(-bound, bound), v.clamp(-bound, bound)
    q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
    # RMSNorm over head_dim: the same on [B, T, H, D] as on its [B, H, T, D] transpose.
    if config.qk_norm_scope == "head" and norm:
        q, k = _qk_norm(module, config, q, k)
    return q, k, v


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _fusable_qk_norm(module: nn.Module, config: AttentionConfig):
    """(q_norm, k_norm, eps, weight_offset, cast_before_weight) when this call may run the per-head q/k norms
    inside the rope launch, else None (the norms then run as their own modules).

    Only norms fastkern's norm patcher has already bound (``_fastkern_norm``, so they passed its probe)
    fuse, both with one form and eps, and not where hooks on the norms expect to see their call. The
    caller still checks the dtypes (``_fuses_in``)."""
    if not FUSE_QK_NORM or config.qk_norm_scope != "head" or config.q_norm is None or config.k_norm is None:
        return None
    if config.qk_norm_if is not None and not getattr(module, config.qk_norm_if):
        return None
    q_norm, k_norm = getattr(module, config.q_norm), getattr(module, config.k_norm)
    form = getattr(q_norm, "_fastkern_norm", None)
    if form is None or getattr(k_norm, "_fastkern_norm", None) != form or _hooked(q_norm) or _hooked(k_norm):
        return None
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return None
    eps_name, weight_offset, cast_before_weight = form
    eps = getattr(q_norm, eps_name)
    if eps != getattr(k_norm, eps_name):
        return None
    return q_norm, k_norm, eps, weight_offset, cast_before_weight


def _fuses_in(fused, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether q, k and both norm weights share one dtype (and the weights are frozen, unless
    FUSE_QK_NORM_TRAINABLE). Otherwise the norms run as their own modules:
    the llama form then falls back to the class forward (which promotes the output dtype), and mixed
    dtypes are rare enough (fp32 norms under an fp16/bf16 base) to leave to the unfused path."""
    q_norm, k_norm = fused[0], fused[1]
    if not FUSE_QK_NORM_TRAINABLE and (q_norm.weight.requires_grad or k_norm.weight.requires_grad):
        return False
    return q.dtype == k.dtype == q_norm.weight.dtype == k_norm.weight.dtype


def _qk_norm(module: nn.Module, config: AttentionConfig, q: torch.Tensor, k: torch.Tensor):
    if config.qk_norm_if is not None and not getattr(module, config.qk_norm_if):
        return q, k
    if config.q_norm is not None:
        q = getattr(module, config.q_norm)(q)
    if config.k_norm is not None:
        k = getattr(module, config.k_norm)(k)
    return q, k


def _rope_tables(layout: str, cos: torch.Tensor, sin: torch.Tensor):
    """cos/sin as the family passes them -> (cos, sin, interleaved) in the layout fastkern.ops.rope reads
    (one entry per rotated element). The conversions are a few [B, T, R] elements per layer, small next
    to q and k."""
    if layout == "interleaved_from_half_split":
        half = cos.shape[-1] // 2
        return cos[..., :half].repeat_interleave(2, dim=-1), sin[..., :half].repeat_interleave(2, dim=-1), True
    if layout == "half_split_from_half":
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1), False
    return cos, sin, layout == "interleaved"


def _rotates(module: nn.Module, config: AttentionConfig) -> bool:
    if config.rope_if is None:
        return True
    return any((getattr(module, name) is None) if is_none else bool(getattr(module, name))
               for name, is_none in config.rope_if)


def _sliding_window(module: nn.Module, config: AttentionConfig):
    if config.sliding_window_if is not None and not getattr(module, config.sliding_window_if):
        return None
    if config.sliding_window == "config":
        return getattr(module.config, "sliding_window", None)
    return module.sliding_window


_get_creation_meta = getattr(torch._C._autograd, "_get_creation_meta", None)


def _autograd_allows_in_place(q: torch.Tensor, k: torch.Tensor) -> bool:
    """False when autograd would refuse an in-place change of q or k: a projection with a full backward
    hook (``register_full_backward_hook``) returns its output through a multi-output autograd node, and
    views of such outputs cannot be modified in place. Then rope rotates out of place (same values)."""
    if _get_creation_meta is None or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return True  # under torch.compile functionalization replaces the in-place update; nothing to refuse
    default = torch._C._autograd.CreationMeta.DEFAULT
    return not ((q.requires_grad and q._is_view() and _get_creation_meta(q) != default)
                or (k.requires_grad and k._is_view() and _get_creation_meta(k) != default))


def _attention(module, config: AttentionConfig, hidden_states, position_embeddings, attention_mask,
               cache, **kwargs):
    rotates = _rotates(module, config)
    fused = _fusable_qk_norm(module, config) if rotates and config.rotary is None else None
    q, k, v = _project(module, config, hidden_states, norm=fused is None)
    if fused is not None and not _fuses_in(fused, q, k):
        q, k = _qk_norm(module, config, q, k)
        fused = None
    if fused is not None:
        # One launch: RMSNorm of every head of q and k, then their rotation, into new [B, T, H, D] tensors.
        q_norm, k_norm, eps, weight_offset, cast_before_weight = fused
        cos, sin, interleaved = _rope_tables(config.rope_layout, *position_embeddings)
        q, k = rope_qk_norm(q, k, q_norm.weight, k_norm.weight, cos, sin, eps, weight_offset=weight_offset,
                            cast_before_weight=cast_before_weight, interleaved=interleaved)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if rotates and config.rotary is not None:
        q, k = config.rotary(q, k, *position_embeddings)  # rope off: the family's own rotation
    elif rotates and fused is None:
        cos, sin, interleaved = _rope_tables(config.rope_layout, *position_embeddings)
        # q and k are private intermediates (fresh projection or norm outputs): rotate them in place, unless
        # they are slices of one fused qkv output, where autograd would copy around an in-place update, or
        # views autograd refuses to see modified (below).
        inplace = config.fused_qkv is None and _autograd_allows_in_place(q, k)
        q, k = rope(q, k, cos, sin, interleaved=interleaved, inplace=inplace)
    if config.qk_norm_scope == "head_after_rope":
        q, k = _qk_norm(module, config, q, k)  # RMSNorm over head_dim: any layout of the heads
    if cache is not None:
        k, v = cache.update(k, v, module.layer_idx)
    extra = {}
    if config.sliding_window != "none":
        extra["sliding_window"] = _sliding_window(module, config)
    if config.softcap is not None:
        extra["softcap"] = getattr(module, config.softcap)
    if config.sinks is not None:
        extra["s_aux"] = getattr(module, config.sinks)
    # Read per call, as transformers' own forward does, so set_attn_implementation() after patching applies.
    implementation = module.config._attn_implementation
    attention_function = _attention_function(config, implementation)
    documents = kwargs.pop(packing.DOCUMENTS_KWARG, None)
    packed = documents is not None or packing.is_packed_mask(attention_mask)
    if packed:
        attention_function = packing.packed_attention_function(attention_function, implementation, documents)
    # cuDNN first only for unmasked, unpacked calls (the training case it is for; docs/e2e.md).
    plain = not packed and attention_mask is None
    with sdpa_backend.preferred_backends(q, implementation if plain else ""):
        out, weights = attention_function(
            module, q, k, v, attention_mask,
            dropout=0.0 if not module.training else module.attention_dropout,
            scaling=module.scaling,
            **extra,
            **kwargs,
        )
    out = module.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous())
    if config.output_dropout is not None and module.training and getattr(module, config.output_dropout):
        out = F.dropout(out, p=getattr(module, config.output_dropout), training=True)
    return out, weights


@instance_forward("rope")
def fused_rope_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                                 *, past_key_values=None, **kwargs):
    # The KV cache arrives as `cache` from transformers 5.25 on (its decoder layers call
    # self_attn(..., cache=cache)) and as `past_key_values` before (5.17-5.23); it is the fourth parameter
    # of the attention forward under both names. Taking only `past_key_values` let 5.25's cache fall into
    # **kwargs: never updated, so a decode step attended to its own token alone.
    if past_key_values is not None:
        if cache is not None:
            raise ValueError("fastkern rope: both `cache` and `past_key_values` given to the attention forward")
        cache = past_key_values
    return _attention(self, self._fastkern_attention, hidden_states, position_embeddings, attention_mask,
                      cache, **kwargs)


@instance_forward("packing")
def packed_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                             *, past_key_values=None, **kwargs):
    # What the packing patcher binds where rope is off: the family's rotation, fastkern's packed-batch routing.
    if past_key_values is not None:
        if cache is not None:
            raise ValueError("fastkern packing: both `cache` and `past_key_values` given to the attention forward")
        cache = past_key_values
    return _attention(self, self._fastkern_attention, hidden_states, position_embeddings, attention_mask,
                      cache, **kwargs)


def _rotary_dim(module: nn.Module) -> int:
    # transformers 5 keeps partial_rotary_factor on the config (Phi-3) or in config.rope_parameters (GLM).
    rope_parameters = getattr(module.config, "rope_parameters", None)
    factor = getattr(module.config, "partial_rotary_factor", None)
    if factor is None and isinstance(rope_parameters, dict):
        factor = rope_parameters.get("partial_rotary_factor")
    return int(module.head_dim * (factor or 1.0)) // 2 * 2


def _probe(module: nn.Module, config: AttentionConfig) -> ProbeVerdict:
    """Whether the patched forward matches the class forward on a random input and random cos/sin."""
    param = next(module.parameters(), None)
    if (skip := meta_skip(param)) is not None:
        return skip
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    hidden = module.config.hidden_size
    gen = probe_generator()
    x = torch.randn(2, 5, hidden, generator=gen, device="cpu").to(device=param.device, dtype=dtype)
    angles = torch.randn(2, 5, _rotary_dim(module) // 2, generator=gen, device="cpu").to(param.device) * 3
    # In the layout the family's rotary embedding produces; the patched rotation is exact for any cos/sin
    # it reads, so a wrong layout key shows up here as a mismatch.
    if config.rope_layout == "interleaved":
        emb = angles.repeat_interleave(2, dim=-1)
    elif config.rope_layout == "half_split_from_half":
        emb = angles
    else:
        emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    return run_probe(module,
                     lambda: type(module).forward(module, x, position_embeddings=(cos, sin), attention_mask=None)[0],
                     lambda: _attention(module, config, x, (cos, sin), None, None)[0],
                     tolerance("rope", dtype))


def _rope_conditions(spec, value) -> tuple[tuple[str, bool], ...] | None:
    """rope_if as (attribute, is_none) pairs: a string or a non-empty list of strings, each "<attribute>" or
    "<attribute> is None"."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and _CONDITION.match(i) for i in items):
        raise ValueError(f"{spec.source} [attention]: rope_if must be an attribute name, \"<attribute> is None\", "
                         f"or a non-empty list of those (any of which turns rope on), got {value!r}")
    return tuple((m.group(1), m.group(2) is not None) for m in map(_CONDITION.match, items))


def _config_from_section(spec, section, fused_rope: bool = True) -> AttentionConfig:
    """Resolve the spec's symbols; raises LookupError (spec problem) or ValueError (bad section).
    ``fused_rope=False``: rotate with the family's own apply_rotary_pos_emb (packing with rope off)."""
    sliding = section.get("sliding_window", "none")
    if sliding not in _SLIDING_WINDOW:
        raise ValueError(f"{spec.source} [attention]: sliding_window must be one of {_SLIDING_WINDOW}, got {sliding!r}")
    for key, allowed, default in (("qk_norm_scope", _QK_NORM_SCOPES, "head"), ("rope_layout", _ROPE_LAYOUTS, "half_split")):
        if section.get(key, default) not in allowed:
            raise ValueError(f"{spec.source} [attention]: {key} must be one of {allowed}, got {section[key]!r}")
    if section.get("sliding_window_if") is not None and sliding == "none":
        raise ValueError(f"{spec.source} [attention]: sliding_window_if needs sliding_window = \"config\" or "
                         "\"attribute\"")
    return AttentionConfig(
        fused_qkv=section.get("fused_qkv"),
        q_norm=section.get("q_norm"),
        k_norm=section.get("k_norm"),
        sliding_window=sliding,
        softcap=section.get("softcap"),
        qk_norm_scope=section.get("qk_norm_scope", "head"),
        qk_norm_if=section.get("qk_norm_if"),
        rope_layout=section.get("rope_layout", "half_split"),
        rope_if=_rope_conditions(spec, section.get("rope_if")),
        sinks=section.get("sinks"),
        output_dropout=section.get("output_dropout"),
        clip_qkv=section.get("clip_qkv"),
        sliding_window_if=section.get("sliding_window_if"),
        eager_forward=spec.resolve("eager_attention_forward"),
        attention_functions=spec.resolve("ALL_ATTENTION_FUNCTIONS"),
        rotary=None if fused_rope else spec.resolve("apply_rotary_pos_emb"),
    )


def _required_attributes(module: nn.Module, config: AttentionConfig) -> list[str]:
    names = ["o_proj", "head_dim", "scaling", "attention_dropout", "layer_idx", "config"]
    names += [config.fused_qkv] if config.fused_qkv else ["q_proj", "k_proj", "v_proj"]
    # q_norm/k_norm exist only where qk_norm_if is on (Cohere builds them only with use_qk_norm).
    norms = (config.q_norm, config.k_norm)
    if config.qk_norm_if is not None:
        names.append(config.qk_norm_if)
        norms = norms if getattr(module, config.qk_norm_if, False) else ()
    conditions = [name for name, _ in config.rope_if or ()]
    names += [n for n in (*norms, config.softcap, *conditions, config.sinks, config.output_dropout,
                          config.sliding_window_if) if n]
    if config.sliding_window == "attribute":
        names.append("sliding_window")
    return names


def module_problem(module: nn.Module, config: AttentionConfig) -> str | None:
    """Why this attention module cannot take the patched forward (a missing attribute, an output dropout
    that is not a probability, a clip bound that is not a positive number), or None. Shared with the
    packing patcher, which binds the same forward."""
    absent = [n for n in _required_attributes(module, config) if not hasattr(module, n)]
    if absent:
        return f"{type(module).__name__} has no attribute(s) {absent}"
    if (why := output_dropout_problem(module, config.output_dropout)) is not None:
        return why
    if config.clip_qkv is not None:
        if not hasattr(module.config, config.clip_qkv):
            return f"{type(module).__name__}'s config has no attribute {config.clip_qkv!r} (clip_qkv)"
        bound = getattr(module.config, config.clip_qkv)
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, (int, float)) or not bound > 0):
            return f"config.{config.clip_qkv} = {bound!r} is not a positive clip bound"
    return None


def _conditions_text(config: AttentionConfig) -> str:
    return " or ".join(f"{name} is None" if is_none else name for name, is_none in config.rope_if or ())


class AttentionPatcher:
    def apply(self, ctx: PatchContext, value) -> None:
        classes = {}
        for spec, section in ctx.section("attention"):
            if "class" not in section:
                ctx.report.problems.append(f"{spec.source} [attention]: missing key 'class'")
                continue
            try:
                cls = spec.resolve(section["class"])
                classes[cls] = _config_from_section(spec, section)
            except (LookupError, ValueError) as exc:
                ctx.report.problems.append(f"{exc}; attention not patched")
        probed: dict[tuple[type, torch.dtype | None, bool], ProbeVerdict] = {}
        for name, module in ctx.named_modules():
            config = classes.get(type(module))
            if config is None:
                continue
            if (why := module_problem(module, config)) is not None:
                ctx.report.add_skipped(name, "rope", why)
                continue
            param = next(module.parameters(), None)
            # Layers that skip rope (NoPE) are probed apart from those that rotate.
            key = (type(module), param.dtype if param is not None else None, _rotates(module, config))
            if key not in probed:
                probed[key] = _probe(module, config)
            mode = "out of place: q, k are slices of a fused qkv" if config.fused_qkv else "in place"
            if config.rope_layout != "half_split":
                mode += f", {config.rope_layout}"
            fusable = _fusable_qk_norm(module, config) if config.rotary is None else None
            if fusable is not None:
                trainable = fusable[0].weight.requires_grad or fusable[1].weight.requires_grad
                if FUSE_QK_NORM_TRAINABLE or not trainable:
                    mode = "with the per-head q/k norms in the same launch, out of place"
                else:  # decided per call: freezing the norms later moves them into the launch
                    mode += "; the per-head q/k norms join the launch while their weights are frozen"
            detail = f"{type(module).__name__} -> fused q+k rope ({mode})"
            if not _rotates(module, config):
                detail = f"{type(module).__name__} -> no rope in this layer (rope_if {_conditions_text(config)}); same attention"
            ctx.replace_forward_probed(module, name, fused_rope_attention_forward, detail, {"attention": config},
                                       probed[key])

    def remove(self, model: nn.Module, report: PatchReport) -> None:
        # Instance forwards and _fastkern_* attributes are removed generically by unpatch_model.
        return None


ATTENTION_PATCHER = AttentionPatcher()
