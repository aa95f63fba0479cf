"""TRL's fused LM head computed by fastkern's log-prob kernel, for models patched with ``loss=True``.

Supported: TRL 1.16.x (``SUPPORTED_TRL``). There, every trainer (SFT, DPO, GRPO, RLOO, KTO) computes
its per-token log-probabilities through ``trl.trainer.utils.add_fused_lm_head``, whose wrapped
forward calls the module global ``trl.trainer.utils._ChunkedLogProbFunction.apply(hidden, weight,
bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)`` at call time. That global is
the only hook TRL offers (the wrapper is a closure over it), so it is module level: fastkern swaps
in :class:`FastkernChunkedLogProb`, which dispatches **per model**: a call whose ``weight`` is the
head of a model registered by patch_model(loss=True), and whose ``outputs`` fastkern computes
(log_probs, entropy, is_top1, mean_logits), runs fastkern's log-prob op (fastkern/ops/linear_logprobs.py); every
other call (other models, or the output ``log_sum_sq_probs`` of DPO's WPO weighting) goes to TRL's own
function unchanged. The swap is undone when the last registered model is unpatched.

Which model a call belongs to is decided per call, from the model and not from a parameter id taken at
patch time: FSDP2 and accelerate replace parameter objects after patching, FSDP2 hands the head's
unsharded parameter to the forward, and TRL gathers a DTensor head with ``full_tensor()`` (a new tensor
every call) before its function. See :func:`_owner`.

On any other TRL version nothing is installed, patch_model's report says so, and TRL's own kernel
runs. tests/integrations/test_trl_fused_head.py fails loudly if TRL moves the hook.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch

SUPPORTED_TRL = ("1.16.",)
_FASTKERN_OUTPUTS = {"log_probs", "entropy", "is_top1", "mean_logits"}

# id(model) -> (weak reference to the model, handle of the forward hook on its backbone). Keyed by the
# model: a parameter id would go stale when FSDP replaces the parameter, and could be reused by another.
_REGISTERED: dict[int, tuple[weakref.ref, object]] = {}
# The registered model whose backbone forward finished last on this thread, consumed by the next call.
_LAST_BACKBONE = threading.local()
_ORIGINAL: dict[str, object] = {}


def trl_version() -> str | None:
    try:
        import trl
    except Exception:
        return None
    return str(getattr(trl, "__version__", "unknown"))


def supported(version: str | None) -> bool:
    return version is not None and version.startswith(SUPPORTED_TRL)


class FastkernChunkedLogProb:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction`` inside trl.trainer.utils (same ``apply``)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        original = _ORIGINAL["function"]
        head = _owner(hidden, weight)
        # ZeRO-3: TRL gathers the head only around this call; fastkern's backward would read it partitioned.
        if not set(outputs) <= _FASTKERN_OUTPUTS or (head is not None and _zero3(head.weight)):
            head = None
        unsharded = False
        if head is not None:
            weight, bias, unsharded = _weight_for(head, weight, bias)
        if head is None or _any_dtensor(hidden, weight, bias, targets):
            return original.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                                  logit_scale, outputs)
        # TRL's chunk_size is the vocabulary width of its own tiles (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE),
        # not fastkern's tokens per chunk, so it is not passed on: fastkern sizes its chunks from free memory.
        if hidden.dtype != weight.dtype:  # TRL's cast_lm_head_to_fp32 hands an fp32 hidden to a bf16 head
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        logp, entropy, is_top1, mean_logits = fused_logprobs(hidden, weight, bias, targets, temperature,
                                                             final_logit_softcapping, logit_scale, "entropy" in outputs)
        if unsharded:
            _release(head)
        return (logp, entropy, None, mean_logits if "mean_logits" in outputs else None,
                is_top1 if "is_top1" in outputs else None)


def _registered_models():
    for ref, _ in list(_REGISTERED.values()):
        model = ref()
        if model is not None:
            yield model


def _owner(hidden, weight):
    """The LM head of the registered model this call computes, or None (then TRL's own function runs).

    1. ``weight`` is the current ``weight`` of a registered model's head, looked up now: plain and DDP
       models, an FSDP2 head in an unsharded group (the unsharded parameter is what the module holds during
       the forward), ZeRO-3 (gathered in place, same object).
    2. ``weight`` is a plain tensor where the head holds a DTensor: TRL gathered it with ``full_tensor()``,
       a new tensor unrelated to the parameter (no shared storage; no autograd link when the head is
       frozen). The model is then the one whose backbone forward just ran on this thread (TRL calls its
       function right after the backbone, in the same forward), and the gathered tensor must have that
       head's global shape and dtype, the hidden size matching. A stale mark (a backbone run on its own)
       could only match a call with the same head shape and dtype, and the call is consumed either way.
    """
    marked = getattr(_LAST_BACKBONE, "model", None)
    _LAST_BACKBONE.model = None
    for model in _registered_models():
        head = model.get_output_embeddings()
        if head is not None and head.weight is weight:
            return head
    model = marked() if isinstance(marked, weakref.ref) else None
    if model is None or id(model) not in _REGISTERED or type(weight) is not torch.Tensor:
        return None
    head = model.get_output_embeddings()
    dtensor = _dtensor_type()
    param = getattr(head, "weight", None)
    if (dtensor is not None and isinstance(param, dtensor) and weight.shape == param.shape
            and weight.dtype == param.dtype and hidden.shape[-1] == weight.shape[-1]):
        return head
    return None


def _weight_for(head, weight, bias):
    """The plain weight and bias to compute with, given what TRL passed for ``head``, and whether the head
    was unsharded here.

    A plain head: what TRL passed. A DTensor head that TRL did not gather: gathered here. A trainable head
    in its own FSDP2 group: unsharded through FSDP (fastkern.patching.loss.head_weight_bias) so that FSDP
    reduce-scatters its gradient; the gradient of TRL's ``full_tensor()`` copy would reach each rank's
    shard unaveraged. A frozen DTensor head: TRL's gathered copy (no gradient to get wrong)."""
    from ..patching.loss import _distributed_types, head_weight_bias

    dtensor, fsdp_module = _distributed_types()
    if dtensor is None or not isinstance(head.weight, dtensor):
        return weight, bias, False
    if isinstance(weight, dtensor) or (head.weight.requires_grad and isinstance(head, fsdp_module)):
        return head_weight_bias(head)
    return weight, bias, False


@functools.lru_cache(maxsize=None)
def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def _any_dtensor(*tensors) -> bool:
    """fastkern's ops take plain tensors only; a DTensor left here (e.g. tensor-parallel activations) goes
    to TRL's function, which handles what TRL supports."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def _zero3(param) -> bool:
    from ..patching.loss import zero3_partitioned

    return zero3_partitioned(param)


def _release(head) -> None:
    from ..patching.loss import release_head

    release_head(head)


def _mark_backbone(model_ref, module, args, output):
    # Traced by Dynamo (a compiled model), a store into a thread-local is replayed as a graph side effect and
    # can leave another object there; the gathered-weight case it serves does not arise in a compiled
    # backbone call, so the mark is skipped there.
    if torch.compiler.is_compiling():
        return
    _LAST_BACKBONE.model = model_ref


def fused_logprobs(hidden, weight, bias, targets, temperature, softcap, logit_scale, want_entropy):
    from ..ops.linear_logprobs import logprobs_entropy_top1

    return logprobs_entropy_top1(hidden, weight, targets, bias=bias, temperature=float(temperature), softcap=softcap,
                                 logit_scale=float(logit_scale), return_entropy=want_entropy)


def _install() -> None:
    import trl.trainer.utils as trl_utils

    if "function" not in _ORIGINAL:
        _ORIGINAL["function"] = trl_utils._ChunkedLogProbFunction
        trl_utils._ChunkedLogProbFunction = FastkernChunkedLogProb


def _uninstall() -> None:
    import trl.trainer.utils as trl_utils

    if "function" in _ORIGINAL:
        trl_utils._ChunkedLogProbFunction = _ORIGINAL.pop("function")


def installed() -> bool:
    return "function" in _ORIGINAL


def register(model: torch.nn.Module) -> str | None:
    """Route TRL's fused head to fastkern for ``model``; returns a note for the patch report."""
    version = trl_version()
    if version is None:
        return None
    if not supported(version):
        return (f"TRL {version} is not supported by fastkern's fused-head hook (supported: "
                f"{', '.join(v + 'x' for v in SUPPORTED_TRL)}); TRL's own kernel runs in its trainers")
    import trl.trainer.utils as trl_utils

    if not hasattr(trl_utils, "_ChunkedLogProbFunction") or not hasattr(trl_utils, "add_fused_lm_head"):
        return f"TRL {version}: trl.trainer.utils._ChunkedLogProbFunction not found; TRL's own kernel runs"
    _install()
    if not is_registered(model):
        # TRL's fused forward runs `model.base_model` (the backbone) through its __call__, then its function:
        # a forward hook there marks the model for the gathered-weight case of _owner. PEFT calls the
        # CausalLM's forward directly (no hooks on it), but the backbone is still called as a module.
        ref = weakref.ref(model)
        backbone = getattr(model, "base_model", None)
        handle = (backbone.register_forward_hook(functools.partial(_mark_backbone, ref))
                  if isinstance(backbone, torch.nn.Module) and backbone is not model else None)
        _REGISTERED[id(model)] = (ref, handle)
    return f"TRL {version} fused LM head -> fastkern.ops.fused_linear_logprobs for this model"


def is_registered(model: torch.nn.Module) -> bool:
    entry = _REGISTERED.get(id(model))
    return entry is not None and entry[0]() is model


def unregister(model: torch.nn.Module) -> None:
    for key, (ref, handle) in list(_REGISTERED.items()):
        if ref() is model or ref() is None:
            if handle is not None:
                handle.remove()
            del _REGISTERED[key]
    if not _REGISTERED and installed():
        _uninstall()
