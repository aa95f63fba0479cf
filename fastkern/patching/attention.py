"""Attention patcher (option ``rope``): each supported attention module rotates q and k with the fused
fastkern.ops.rope kernel, on this model instance only.

transformers' attention modules call a module-level ``apply_rotary_pos_emb``; replacing that global
would change every model in the process. Instead each attention instance gets a bound forward that
reproduces its family's attention forward from the pieces the spec names (q/k/v or fused qkv
projections, optional q_norm/k_norm, the attention function looked up per call in
``ALL_ATTENTION_FUNCTIONS`` by ``config._attn_implementation``, o_proj, sliding window and logit
softcap where the family passes them) with the fused in-place rope in the middle.

Validation, per attention class found in the model:
  1. the spec's class, ``eager_attention_forward`` and ``ALL_ATTENTION_FUNCTIONS`` resolve in the
     installed transformers (else a spec problem);
  2. the instance has the attributes the spec names;
  3. the patched forward is compared with the class forward on a small random input with random
     cos/sin (dropout off); a mismatch (transformers changed the attention) skips the class with the
     measured error in the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..ops.rope import rope
from .core import PatchContext, instance_forward
from .report import PatchReport

# Relative error norm allowed between the original and the patched attention in the probe.
_PROBE_TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
_SLIDING_WINDOW = ("none", "config", "attribute")


@dataclass(frozen=True)
class AttentionConfig:
    """What the bound forward needs beyond the module's own attributes (read from the spec)."""

    fused_qkv: str | None  # attribute of a fused [q; k; v] projection (Phi-3), else None
    q_norm: str | None  # RMSNorm over head_dim applied to q and k before rope (Qwen3, Gemma3)
    k_norm: str | None
    sliding_window: str  # "none": not passed; "config": config.sliding_window; "attribute": self.sliding_window
    softcap: str | None  # attribute holding the attention logit softcap (Gemma2), passed as softcap=
    eager_forward: object  # the family's eager_attention_forward
    attention_functions: object  # transformers' ALL_ATTENTION_FUNCTIONS


def _attention_function(config: AttentionConfig, implementation: str):
    functions = config.attention_functions
    if hasattr(functions, "get_interface"):
        return functions.get_interface(implementation, config.eager_forward)
    return config.eager_forward if implementation == "eager" else functions[implementation]


def _project(module: nn.Module, config: AttentionConfig, hidden_states: torch.Tensor):
    """q, k, v as [B, T, H, D] views of the projection outputs."""
    hidden_shape = (*hidden_states.shape[:-1], -1, module.head_dim)
    if config.fused_qkv is not None:
        qkv = getattr(module, config.fused_qkv)(hidden_states)
        q_size = module.config.num_attention_heads * module.head_dim
        kv_size = module.config.num_key_value_heads * module.head_dim
        q, k, v = qkv[..., :q_size], qkv[..., q_size:q_size + kv_size], qkv[..., q_size + kv_size:]
    else:
        q, k, v = module.q_proj(hidden_states), module.k_proj(hidden_states), module.v_proj(hidden_states)
    q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
    # RMSNorm over head_dim: the same on [B, T, H, D] as on its [B, H, T, D] transpose.
    if config.q_norm is not None:
        q = getattr(module, config.q_norm)(q)
    if config.k_norm is not None:
        k = getattr(module, config.k_norm)(k)
    return q, k, v


def _attention(module, config: AttentionConfig, hidden_states, position_embeddings, attention_mask,
               cache, **kwargs):
    q, k, v = _project(module, config, hidden_states)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    # q and k are private intermediates (fresh projection or norm outputs): rotate them in place, unless
    # they are slices of one fused qkv output, where autograd would copy around an in-place update.
    q, k = rope(q, k, cos, sin, inplace=config.fused_qkv is None)
    if cache is not None:
        k, v = cache.update(k, v, module.layer_idx)
    extra = {}
    if config.sliding_window == "config":
        extra["sliding_window"] = getattr(module.config, "sliding_window", None)
    elif config.sliding_window == "attribute":
        extra["sliding_window"] = module.sliding_window
    if config.softcap is not None:
        extra["softcap"] = getattr(module, config.softcap)
    attention_function = _attention_function(config, module.config._attn_implementation)
    out, weights = attention_function(
        module, q, k, v, attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout,
        scaling=module.scaling,
        **extra,
        **kwargs,
    )
    out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return module.o_proj(out), weights


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


def _rotary_dim(module: nn.Module) -> int:
    factor = getattr(module.config, "partial_rotary_factor", None) or 1.0
    return int(module.head_dim * factor) // 2 * 2


def _probe(module: nn.Module, config: AttentionConfig) -> str | None:
    """None if the patched forward matches the class forward on a random input, else why not."""
    param = next(module.parameters(), None)
    if param is None or param.device.type == "meta":
        return "skip-probe: parameters on the meta device"
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    hidden = module.config.hidden_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 5, hidden, generator=gen).to(device=param.device, dtype=dtype)
    angles = torch.randn(2, 5, _rotary_dim(module) // 2, generator=gen).to(param.device) * 3
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    training = module.training
    module.training = False  # dropout off for the comparison
    try:
        with torch.no_grad():
            expected, _ = type(module).forward(module, x, position_embeddings=(cos, sin), attention_mask=None)
            got, _ = _attention(module, config, x, (cos, sin), None, None)
    except Exception as exc:
        return f"patched forward failed on a probe input: {type(exc).__name__}: {exc}"
    finally:
        module.training = training
    expected, got = expected.double(), got.double()
    err = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    tol = _PROBE_TOL.get(dtype, 1e-2)
    if not err <= tol:  # also catches NaN
        return f"patched forward differs from {type(module).__name__}.forward: relative error {err:.2e} > {tol:.0e}"
    return None


def _config_from_section(spec, section) -> AttentionConfig:
    """Resolve the spec's symbols; raises LookupError (spec problem) or ValueError (bad section)."""
    sliding = section.get("sliding_window", "none")
    if sliding not in _SLIDING_WINDOW:
        raise ValueError(f"{spec.source} [attention]: sliding_window must be one of {_SLIDING_WINDOW}, got {sliding!r}")
    return AttentionConfig(
        fused_qkv=section.get("fused_qkv"),
        q_norm=section.get("q_norm"),
        k_norm=section.get("k_norm"),
        sliding_window=sliding,
        softcap=section.get("softcap"),
        eager_forward=spec.resolve("eager_attention_forward"),
        attention_functions=spec.resolve("ALL_ATTENTION_FUNCTIONS"),
    )


def _required_attributes(config: AttentionConfig) -> list[str]:
    names = ["o_proj", "head_dim", "scaling", "attention_dropout", "layer_idx", "config"]
    names += [config.fused_qkv] if config.fused_qkv else ["q_proj", "k_proj", "v_proj"]
    names += [n for n in (config.q_norm, config.k_norm, config.softcap) if n]
    if config.sliding_window == "attribute":
        names.append("sliding_window")
    return names


class AttentionPatcher:
    option = "rope"
    # On: end to end on the H100 (docs/benchmarks.md) it made the TRL SFT step faster (303.7 vs 310.5 ms
    # with mlp alone) and keeps q/k in the token-major layout varlen flash attention takes for packed batches.
    default = True

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
        probed: dict[tuple[type, torch.dtype | None], str | None] = {}
        for name, module in ctx.named_modules():
            config = classes.get(type(module))
            if config is None:
                continue
            absent = [n for n in _required_attributes(config) if not hasattr(module, n)]
            if absent:
                ctx.report.add_skipped(name, "rope", f"{type(module).__name__} has no attribute(s) {absent}")
                continue
            param = next(module.parameters(), None)
            key = (type(module), param.dtype if param is not None else None)
            if key not in probed:
                probed[key] = _probe(module, config)
            mode = "out of place: q, k are slices of a fused qkv" if config.fused_qkv else "in place"
            detail = f"{type(module).__name__} -> fused q+k rope ({mode})"
            ctx.replace_forward_probed(module, name, fused_rope_attention_forward, detail, {"attention": config},
                                       probed[key])

    def remove(self, model: nn.Module, report: PatchReport) -> None:
        # Instance forwards and _fastkern_* attributes are removed generically by unpatch_model.
        return None


ATTENTION_PATCHER = AttentionPatcher()
