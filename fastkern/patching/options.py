"""The options of ``patch_model``: one table giving each option's name, default, check, doc and patcher.

Everything about an option is stated here once: ``patch_model`` validates against this table, applies
the patchers in its order, and builds its docstring from it (so ``help(fastkern.patch_model)`` lists
the same defaults and values the code uses).

Off is spelled ``False`` or ``None`` for every option; any other value must be one the option lists.
An invalid value raises :class:`OptionError` (a TypeError and a ValueError, so either ``except``
catches it) naming the option and the accepted values, before any module of the model is touched.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any, Callable

from .attention import ATTENTION_PATCHER
from .checkpointing import CHECKPOINTING_PATCHER, _offloader_kwargs
from .compile import COMPILE_PATCHER
from .context import Patcher
from .lora import LORA_PATCHER
from .loss import LOSS_PATCHER
from .mlp import MLP_PATCHER
from .moe import MOE_AUTO_MAX_INTERMEDIATE, MOE_PATCHER
from .norm import NORM_PATCHER
from .packing import PACKING_PATCHER
from .tiled_mlp import TILED_MLP_PATCHER, _min_tokens


class OptionError(TypeError, ValueError):
    """An invalid ``patch_model`` option value. Both a TypeError (a value of the wrong kind) and a
    ValueError (a value out of range), since a bad option can be either: a caller may catch either."""


@dataclass(frozen=True)
class Option:
    name: str  # keyword of patch_model
    default: Any
    accepted: str  # the accepted values, as the docstring and error messages say them
    check: Callable[[Any], bool]  # True if the value is accepted (off values are accepted before it runs)
    doc: str
    patcher: Patcher

    @property
    def option(self) -> str:
        # The attribute name callers of core._patchers() read (tests and bench scripts).
        return self.name

    def validate(self, value: Any) -> None:
        if is_off(value):
            return
        if not self.check(value):
            raise OptionError(f"fastkern.patch_model: {self.name} must be {self.accepted}, got {value!r}")

    def apply(self, ctx, value: Any) -> None:
        self.patcher.apply(ctx, value)

    def remove(self, model, report) -> None:
        self.patcher.remove(model, report)


def is_off(value: Any) -> bool:
    return value is None or value is False


def _is_true(value: Any) -> bool:
    return value is True


def _moe_ok(value: Any) -> bool:
    return value is True or value == "auto"


def _checkpointing_ok(value: Any) -> bool:
    # The offloader's own checks give the precise message (unknown keys, bad host_bytes, ...), so they are
    # raised as they are rather than folded into the generic "must be" line.
    try:
        _offloader_kwargs(value)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    return True


def _tiled_mlp_ok(value: Any) -> bool:
    try:
        _min_tokens(value)
    except ValueError:
        return False
    return True


_BOOL = "True or False"

# Application order. patch_model applies the patchers top to bottom; where the order matters, why:
# - mlp before tiled_mlp: tiled_mlp wraps whatever MLP forward is bound (the fused GLU forward when mlp
#   patched the module), so the fused forward must be in place first; the other way round mlp would find
#   the instance forward taken and skip the module.
# - rope before packing: packing routes packed batches through the attention forward rope bound, and binds
#   the same forward (with the family's own rotation) only on attention modules rope left alone; rope
#   after packing would find those forwards taken and skip them.
# - compile last: it compiles each decoder layer's call, so every fastkern forward inside a layer is bound
#   before the layer is marked compiled and the compiled graph traces the patched forwards.
# - mlp, moe, norm, checkpointing, lora and loss touch disjoint modules (or, for checkpointing, no forward);
#   their relative order does not change what is patched, only the order of the report's entries.
OPTIONS: tuple[Option, ...] = (
    Option("mlp", True, _BOOL, _is_true,
           "fused SwiGLU/GeGLU in the MLP of every supported family.",
           MLP_PATCHER),
    # "auto": where bench/cases/moe_experts.py measured it ahead of transformers' experts (docs/families.md).
    Option("moe", "auto", '"auto", True or False', _moe_ok,
           "the routed experts of MoE families (mixtral, qwen2_moe, qwen3_moe, gpt_oss) run "
           "fastkern.ops.moe_experts: grouped Triton GEMMs over all experts with the SwiGLU (gpt_oss: clamped, "
           "with biases) fused in, instead of transformers' experts forward; the router and its load-balancing "
           "loss are untouched. \"auto\" does so for experts of intermediate size up to "
           f"{MOE_AUTO_MAX_INTERMEDIATE} (measured faster than transformers' grouped_mm experts on the Qwen3-MoE "
           "shape, than its eager experts on the gpt-oss shape) and leaves wider ones (Mixtral: grouped_mm measured "
           "faster) to transformers; True "
           "patches every experts module. Experts whose parameters PEFT targets keep transformers' forward. See "
           "docs/families.md.",
           MOE_PATCHER),
    Option("norm", True, _BOOL, _is_true,
           "RMSNorm modules run fastkern.ops.rms_norm, which saves the input and one fp32 rstd per row for "
           "backward instead of an fp32 copy of the input. See docs/trainers.md.",
           NORM_PATCHER),
    # "recompute" by default: the same gradients as torch's non-reentrant checkpoint, bit for bit
    # (tests/patching/test_checkpointing_recompute.py), with less host work per decoder layer (bench/host_ops.py:
    # LoRA 2413 -> 1082 Python calls, full 1708 -> 888, QLoRA 3281 -> 2335) and a 1.34x faster host-bound step
    # (CPU, 16-layer tiny LoRA Llama, checkpointing alone swapped; docs/e2e.md). It never turns checkpointing on.
    Option("checkpointing", "recompute",
           '"recompute", "offload" or {"offload": True, "host_bytes": N}',
           _checkpointing_ok,
           '"recompute": whenever gradient checkpointing is on (it is not turned on for you), decoder layers run '
           "forward without autograd and recompute in backward (torch's reentrant checkpoint, anchored so that "
           "frozen inputs still give parameter gradients) instead of the non-reentrant checkpoint's per-tensor "
           'hooks: the same math with far less host work. "offload" turns gradient checkpointing on for the decoder layers with their saved inputs '
           "offloaded to CPU memory on a side stream; gradient_checkpointing_enable() called later (by you, "
           "the Trainer or TRL) keeps offloading. The pinned host memory is capped at half the available RAM "
           '(inputs past the cap stay on the GPU); {"offload": True, "host_bytes": N} or {"offload": True, '
           '"host_fraction": f} sets the cap; {"offload": True, "min_bytes": 256 << 20} (the long-context recipe) '
           "keeps layers whose inputs are all smaller on the device, run as \"recompute\" itself. "
           "See docs/offload_checkpointing.md.",
           CHECKPOINTING_PATCHER),
    # On by default: measured faster end to end (TRL SFT dense LoRA, H200: -13% step, -0.5 GiB) and, judged
    # against an fp32/fp64 reference run, at least as accurate as PEFT's own forward (its rounding differs
    # from PEFT's, not its error: tests/test_accuracy_rule.py). Falls back to PEFT's forward per call for
    # what it does not implement (variants, active dropout, lora_bias, adapter_names).
    Option("lora", True, _BOOL, _is_true,
           "PEFT LoRA layers over nn.Linear or bitsandbytes nf4 Linear4bit run fastkern's lora_linear when "
           "exactly equivalent (else PEFT's own forward). See docs/nf4_lora.md.",
           LORA_PATCHER),
    # On: end to end on the H100 (docs/benchmarks.md) it made the TRL SFT step faster (303.7 vs 310.5 ms
    # with mlp alone) and keeps q/k in the token-major layout varlen flash attention takes for packed batches.
    Option("rope", True, _BOOL, _is_true,
           "attention modules rotate q and k with the fused in-place fastkern.ops.rope (one launch for q and "
           "k) instead of transformers' apply_rotary_pos_emb. See docs/rope.md.",
           ATTENTION_PATCHER),
    Option("packing", True, _BOOL, _is_true,
           "packed (padding-free) batches, as TRL's collators give them (position_ids restarting per "
           "document, optional cu_seq_lens_*), attend within each document under sdpa and eager, cache on or "
           "off, without a [T, T] mask; other batches run transformers' own attention. See docs/packing.md.",
           PACKING_PATCHER),
    Option("loss", True, _BOOL, _is_true,
           "the *ForCausalLM forward computes its loss with fastkern.ops.fused_linear_cross_entropy when given "
           "labels, without building logits in a training step (logits None there unless return_logits=True; "
           "eval and no-grad calls still return them), and TRL 1.16's fused LM head uses "
           "fastkern.ops.fused_linear_logprobs for it, whether patched before or after the trainer is built. "
           "See docs/linear_cross_entropy.md.",
           LOSS_PATCHER),
    Option("tiled_mlp", "auto", '"auto", True, False or an int >= 1 (a token count)', _tiled_mlp_ok,
           "decoder MLPs run over token tiles when one [tokens, intermediate] activation of a call would pass "
           "512 MiB (True: always; an int: above that many tokens). See docs/long_context.md.",
           TILED_MLP_PATCHER),
    Option("compile", False, _BOOL, _is_true,
           "each decoder layer runs through torch.compile (regional compilation, this instance's layers "
           "only), cutting the host work of host-bound steps. See docs/e2e.md.",
           COMPILE_PATCHER),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def validate(options: dict[str, Any]) -> dict[str, Any]:
    """Every option's effective value (the given one, else the default); raises before anything is
    patched if an option is unknown or a value is not one its option accepts."""
    unknown = set(options) - set(BY_NAME)
    if unknown:
        raise TypeError(f"fastkern.patch_model: unknown option(s) {sorted(unknown)}; known: {sorted(BY_NAME)}")
    for name, value in options.items():
        BY_NAME[name].validate(value)
    return {o.name: options.get(o.name, o.default) for o in OPTIONS}


def options_doc(indent: str = "  ") -> str:
    """The options as the patch_model docstring lists them: keyword, default, accepted values, doc."""
    lines = []
    for o in OPTIONS:
        head = f"{o.name} [{o.default!r}; {o.accepted}]: "
        lines += textwrap.wrap(head + o.doc, width=100, initial_indent=indent,
                               subsequent_indent=indent + "  ", break_on_hyphens=False)
    return "\n".join(lines)
