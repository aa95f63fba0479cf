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

On any other TRL version nothing is installed, patch_model's report says so, and TRL's own kernel
runs. tests/integrations/test_trl_fused_head.py fails loudly if TRL moves the hook.
"""

from __future__ import annotations

import weakref

import torch

SUPPORTED_TRL = ("1.16.",)
_FASTKERN_OUTPUTS = {"log_probs", "entropy", "is_top1", "mean_logits"}

# id(weight parameter) -> weak reference to the model that owns it as its LM head.
_REGISTERED: dict[int, weakref.ref] = {}
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
        owner = _REGISTERED.get(id(weight))
        if owner is None or owner() is None or not set(outputs) <= _FASTKERN_OUTPUTS:
            return original.apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                                  logit_scale, outputs)
        if hidden.dtype != weight.dtype:  # TRL's cast_lm_head_to_fp32 hands an fp32 hidden to a bf16 head
            weight = weight.to(hidden.dtype)
            bias = None if bias is None else bias.to(hidden.dtype)
        logp, entropy, is_top1, mean_logits = fused_logprobs(hidden, weight, bias, targets, temperature,
                                                             final_logit_softcapping, logit_scale, "entropy" in outputs)
        return (logp, entropy, None, mean_logits if "mean_logits" in outputs else None,
                is_top1 if "is_top1" in outputs else None)


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
    head = model.get_output_embeddings()
    _install()
    _REGISTERED[id(head.weight)] = weakref.ref(model)
    return f"TRL {version} fused LM head -> fastkern.ops.fused_linear_logprobs for this model"


def unregister(model: torch.nn.Module) -> None:
    for key in [k for k, ref in _REGISTERED.items() if ref() is model or ref() is None]:
        del _REGISTERED[key]
    if not _REGISTERED and installed():
        _uninstall()
