"""Loss patcher (option ``loss=True``): the *ForCausalLM forward computes its loss with
:func:`fastkern.ops.fused_linear_cross_entropy` and never builds the [B, T, V] logits.

Driven by the ``[causal_lm]`` section of a family's spec (class, backbone attribute, head
attribute). The patched forward is bound on the model instance. When it gets ``labels`` (or
``shift_labels``) it runs the backbone, keeps the positions ``logits_to_keep`` selects, shifts the
labels as transformers' ForCausalLMLoss does (pad with -100, drop the first; as there, the labels
are those of the kept positions, and a count mismatch raises ValueError), and returns the fused
loss with ``logits=None`` in a training step (training mode with autograd recording); in eval mode or
under no_grad the logits are computed by the head as the original would; ``return_logits=True`` /
``False`` forces either. Without labels it is the original forward. Honoured: ``num_items_in_batch``
(gradient accumulation), ``logits_to_keep``, ``config.final_logit_softcapping`` (Gemma 2/3) and a
logit scale from the config (``logit_scale``, or 1 / ``logits_scaling``). A head that is not a plain
nn.Linear at call time (e.g. a PEFT-wrapped lm_head) falls back to the original forward. Under FSDP2 or
with DTensor parameters the head is gathered once per call (head_weight_bias; docs/multi_gpu.md).

The same patch registers the model's head with fastkern.integrations.trl, so TRL's fused LM head
uses fastkern's log-prob kernel for this model (see that module for the TRL versions supported).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.linear_cross_entropy import fused_linear_cross_entropy
from .context import PatchContext, instance_forward
from .report import PatchReport

_REQUIRED_KEYS = ("class", "backbone", "head")
_IGNORE_INDEX = -100


def config_softcap_and_scale(config) -> tuple[float | None, float]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = 1.0 / text.logits_scaling
    return (float(softcap) if softcap else None), (1.0 if scale is None else float(scale))


def _keep(t: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The hidden states the original forward projects: transformers' own slice_logits_to_keep where it
    has one (int, 1-D positions, 2-D positions or a boolean mask), else the int / 1-D forms it had."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        slice_logits_to_keep = None
    if slice_logits_to_keep is not None:
        return slice_logits_to_keep(t, logits_to_keep)
    if isinstance(logits_to_keep, int):
        return t if logits_to_keep == 0 else t[:, -logits_to_keep:]
    return t[:, logits_to_keep]


@functools.lru_cache(maxsize=None)
def _cache_field(output_type: type) -> str:
    """The KV cache field of a transformers output class: `cache` from transformers 5.25 on (the old
    `past_key_values` is then a deprecated alias that warns), `past_key_values` before."""
    return "cache" if "cache" in getattr(output_type, "__dataclass_fields__", {}) else "past_key_values"


def _original(self, kwargs):
    return type(self).forward(self, **kwargs)


@functools.lru_cache(maxsize=None)
def _distributed_types() -> tuple[type | None, type | None]:
    """(DTensor, FSDPModule), or (None, None) on a torch build without torch.distributed."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None, None
    return DTensor, FSDPModule


def is_linear_head(head) -> bool:
    """Whether ``head`` computes exactly nn.Linear's forward: an nn.Linear, or one that FSDP2's fully_shard
    re-classed in place (class FSDPLinear with bases (FSDPModule, nn.Linear), which only adds hooks).
    A DeepSpeed ZeRO-3 head is not taken: its weight is gathered only inside its own forward's hooks and
    partitioned again before the fused loss's backward would read it; the original forward runs then."""
    if zero3_partitioned(getattr(head, "weight", None)):
        return False
    if type(head) is nn.Linear:
        return True
    _, fsdp_module = _distributed_types()
    return fsdp_module is not None and type(head).__bases__ == (fsdp_module, nn.Linear)


def zero3_partitioned(param) -> bool:
    """Whether ``param`` is managed by DeepSpeed ZeRO-3 (it carries ZeRO-3's ``ds_status``)."""
    return hasattr(param, "ds_status")


def head_weight_bias(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """The head's weight and bias as plain tensors (fastkern's kernels take no DTensor), autograd kept, and
    whether this call unsharded an FSDP2 head (then pass the head to :func:`release_head` after use).

    Under FSDP2 a module's parameters are DTensor shards except between its unshard and its reshard. A
    head in the FSDP group of the model that calls this is unsharded already (plain tensors). A head with
    its own group (``fully_shard(lm_head)``) is never called here, so it is unsharded through FSDP: its
    gradient then lands on the unsharded parameter, which FSDP reduce-scatters at the end of backward (the
    root's final callback runs post-backward for groups whose forward did not run). ``full_tensor()``
    there would hand each rank the shard of its own gradient, never averaged over the ranks. Any other
    DTensor (tensor parallel, a parameter made with distribute_tensor) is gathered with ``full_tensor()``
    once per call: differentiable, its backward gives each rank its shard of the gradient, and the owner
    of the DTensor does whatever reduction its layout needs.
    """
    dtensor, fsdp_module = _distributed_types()
    if dtensor is None:
        return head.weight, head.bias, False
    unshard = isinstance(head, fsdp_module) and isinstance(head.weight, dtensor)
    if unshard:
        head.unshard()
    weight, bias = (p.full_tensor() if isinstance(p, dtensor) else p for p in (head.weight, head.bias))
    return weight, bias, unshard


def release_head(head: nn.Module) -> None:
    """Reshard an FSDP2 head that :func:`head_weight_bias` unsharded, when no backward will (no grad)."""
    if not torch.is_grad_enabled():
        head.reshard()


@instance_forward("loss")
def fused_loss_causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                                 inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                                 return_logits=None, **kwargs):
    # Positional order of the *ForCausalLM forwards in transformers 5 (input_ids, attention_mask, ...).
    kwargs.update(attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                  use_cache=use_cache)
    # transformers 5.25 renamed `past_key_values` to `cache` (generate passes `cache=`, here in kwargs): pass
    # the old name on only when given, as a None under it next to `cache` makes 5.25 warn on every call.
    if past_key_values is not None:
        kwargs["past_key_values"] = past_key_values
    state = self.__dict__.get("_fastkern_loss")
    # No state: unpatched while another wrapper (TRL's add_fused_lm_head) still holds this function.
    head = getattr(self, state[1]) if state is not None else None
    shift_labels = kwargs.pop("shift_labels", None)
    # MoE families ([causal_lm] router_logits = "output_router_logits"): when the call or the config asks
    # for router logits, the original adds the router's auxiliary loss to the loss; it runs as it is then.
    router = state[2] if state is not None and len(state) > 2 else None
    wants_router = router is not None and (kwargs[router] if kwargs.get(router) is not None
                                           else bool(getattr(self.config, router, False)))
    if (labels is None and shift_labels is None) or not is_linear_head(head) or wants_router:
        if shift_labels is not None:
            kwargs["shift_labels"] = shift_labels
        return _original(self, dict(kwargs, input_ids=input_ids, labels=labels, logits_to_keep=logits_to_keep))
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    # The original's output class: MoE families return aux_loss / router_logits fields (None here, as
    # in the original without router logits).
    output_type = MoeCausalLMOutputWithPast if router is not None else CausalLMOutputWithPast

    num_items = kwargs.get("num_items_in_batch")
    return_dict = kwargs.pop("return_dict", None)
    outputs = getattr(self, state[0])(input_ids=input_ids, **kwargs)
    hidden = _keep(outputs.last_hidden_state, logits_to_keep)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=_IGNORE_INDEX)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    # As in transformers' ForCausalLMLoss, labels (or shift_labels) are the targets of the kept positions
    # only: they are shifted as given and never sliced by logits_to_keep. Slicing full-length labels
    # instead would keep the -100 the shift puts last, a silent loss of 0 for logits_to_keep=1; where
    # the counts differ, transformers' cross-entropy raises, and so does this.
    n_kept = hidden.numel() // hidden.shape[-1] if hidden.shape[-1] else 0
    if shift_labels.numel() != n_kept:
        raise ValueError(
            f"fastkern loss: logits_to_keep={logits_to_keep!r} keeps {n_kept} positions but the labels give "
            f"{shift_labels.numel()} targets; as in transformers, pass labels (or shift_labels) for the kept "
            f"positions only")
    weight, bias, unsharded = head_weight_bias(head)
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else weight.dtype
    softcap, scale = config_softcap_and_scale(self.config)
    loss = fused_linear_cross_entropy(
        hidden.to(dtype).reshape(-1, hidden.shape[-1]), weight.to(dtype), shift_labels.reshape(-1),
        bias=None if bias is None else bias.to(dtype), ignore_index=_IGNORE_INDEX, softcap=softcap,
        logit_scale=scale, num_items_in_batch=num_items,
    )
    logits = None
    # Logits are skipped only where they cost the most and nobody reads them: a training step (module in
    # training mode, autograd recording). Evaluation and no-grad calls get them as the original forward
    # gives them; return_logits=True/False forces either way.
    if return_logits is None:
        return_logits = not (self.training and torch.is_grad_enabled())
    if return_logits:
        # A gathered or FSDP-unsharded weight is used as it is: calling an FSDP head would reshard it after
        # its forward, under the weight the loss saved for backward.
        direct = type(head) is nn.Linear and weight is head.weight
        logits = (head(hidden) if direct else F.linear(hidden, weight, bias)) * scale
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
    if unsharded:
        release_head(head)
    cache = getattr(outputs, _cache_field(type(outputs)), None)
    out = output_type(loss=loss, logits=logits, hidden_states=getattr(outputs, "hidden_states", None),
                      attentions=getattr(outputs, "attentions", None), **{_cache_field(output_type): cache})
    return out.to_tuple() if return_dict is False else out


def _router_key(section: dict) -> tuple[str, ...]:
    """The [causal_lm] ``router_logits`` key (the flag under which an MoE forward adds its router loss), if any."""
    key = section.get("router_logits")
    return () if key is None else (key,)


def _check_section(section: dict) -> str | None:
    key = section.get("router_logits")
    if key is not None and not (isinstance(key, str) and key.isidentifier()):
        return f"router_logits must name the config/keyword flag of the router loss, got {key!r}"
    return None


def _bound_by_trl_fused_head(module: nn.Module) -> bool:
    """Whether ``module.forward`` is the instance wrapper TRL's ``add_fused_lm_head`` binds."""
    forward = module.__dict__.get("forward")
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    # TRL wraps it with functools.wraps (the wrapped forward's __qualname__); the code object keeps its own.
    return code is not None and code.co_qualname.startswith("add_fused_lm_head.")


class LossPatcher:
    def apply(self, ctx: PatchContext, value) -> None:
        classes = ctx.section_classes("causal_lm", _REQUIRED_KEYS, "loss", check=_check_section)
        for name, module in ctx.named_modules():
            section = classes.get(type(module))
            if section is None:
                continue
            backbone, head_name = section["backbone"], section["head"]
            head = getattr(module, head_name, None)
            if not hasattr(module, backbone) or head is None:
                ctx.report.add_skipped(name, "loss", f"{type(module).__name__} has no {backbone!r} or {head_name!r}")
                continue
            if not is_linear_head(head):
                why = (f"{head_name} is partitioned by DeepSpeed ZeRO-3" if zero3_partitioned(head.weight)
                       else f"{head_name} is {type(head).__name__}, not nn.Linear")
                ctx.report.add_skipped(name, "loss", why)
                continue
            softcap, scale = config_softcap_and_scale(module.config)
            detail = f"{type(module).__name__} loss -> fused_linear_cross_entropy (logits not built"
            detail += f"; softcap {softcap:g}" if softcap else ""
            detail += f"; logit scale {scale:g}" if scale != 1.0 else ""
            detail += ")"
            if _bound_by_trl_fused_head(module):
                # Patched after a TRL trainer was built: TRL's add_fused_lm_head wrapper owns this instance's
                # forward and its training path never calls the CausalLM forward's loss, only the log-prob
                # function hooked below. Keep TRL's wrapper and route its log-probs to fastkern.
                ctx.report.add_patched(name, "loss", "TRL's fused LM head (bound at trainer init) -> "
                                       "fastkern.ops.fused_linear_logprobs; the forward keeps TRL's wrapper")
                self._register_trl(ctx, module, name)
            elif ctx.replace_forward(module, name, fused_loss_causal_lm_forward, detail,
                                     {"loss": (backbone, head_name, *_router_key(section))}):
                self._register_trl(ctx, module, name)

    @staticmethod
    def _register_trl(ctx: PatchContext, module: nn.Module, name: str) -> None:
        from ..integrations import trl as trl_hook

        note = trl_hook.register(module)
        if note:
            ctx.report.notes.append(note)

    def remove(self, model: nn.Module, report: PatchReport) -> None:
        from ..integrations import trl as trl_hook

        for _, module in model.named_modules():
            trl_hook.unregister(module)


LOSS_PATCHER = LossPatcher()
