"""What the three demos (`fastkern demo --task sft|grpo|dpo`) share: the digit-progression data, the
code-built tokenizer, the model shapes, the step timer and the lines that say what the numbers mean.

It imports none of the demo modules, so fastkern.demo can dispatch to fastkern.demo_grpo and
fastkern.demo_dpo while they take these names from here (no import circle).
"""

from __future__ import annotations

import importlib
import logging
import random
import resource
import time
from dataclasses import dataclass, field

import torch

DIGITS = [str(i) for i in range(10)]

SIZES = {
    # name: LlamaConfig kwargs (vocab_size is set from the option)
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
}

TRL_INSTALL = 'pip install "fastkern[trl]"'
PEFT_INSTALL = 'pip install "fastkern[peft]"'


class MissingExtraError(ImportError):
    """An optional dependency of the demo is not installed; the message names the install command."""


def require_trl() -> None:
    """Fail before any work with the install command, not with a ModuleNotFoundError from deep inside a run."""
    for name in ("trl", "datasets"):  # datasets comes with trl; both are needed
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise MissingExtraError(f"the demo needs TRL ({name} is not importable: {exc}); "
                                    f"install it with: {TRL_INSTALL}") from exc


def require_peft() -> None:
    """`--lora` builds a PEFT model: fail before any work with the install command if PEFT is missing."""
    try:
        importlib.import_module("peft")
    except ImportError as exc:
        raise MissingExtraError(f"--lora needs PEFT (peft is not importable: {exc}); "
                                f"install it with: {PEFT_INSTALL}") from exc


# bitsandbytes logs this at import on CPUs with AVX512-BF16 when it cannot fetch its optional hub kernel
# (the `kernels` package missing, or the repository not trusted); it then uses its built-in CPU code. The
# demos and `fastkern env` never run bitsandbytes' CPU 4-bit matmul, so the line is noise there.
_BNB_CPU_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropBnbCpuNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_CPU_NOTICE)


def quiet_bitsandbytes_cpu_notice() -> None:
    """Drop that one message of that one bitsandbytes logger (everything else it logs still shows).
    Call before bitsandbytes is imported; calling again adds nothing."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropBnbCpuNotice) for f in logger.filters):
        logger.addFilter(_DropBnbCpuNotice())


@dataclass
class RunResult:
    label: str
    final_loss: float
    losses: list[float]
    tokens_per_s: float
    step_s: float
    peak_memory: str
    report: str = ""
    extra: dict = field(default_factory=dict)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *DIGITS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def build_dataset(n_rows: int, length: int, seed: int = 0, min_length: int | None = None):
    """n_rows documents of `length` tokens, or of a uniform random length in [min_length, length]."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        start, step = rng.randrange(10), rng.randrange(1, 10)
        n_tokens = length if min_length is None else rng.randint(min_length, length)
        rows.append(" ".join(DIGITS[(start + i * step) % 10] for i in range(n_tokens - 1)))
    return Dataset.from_dict({"text": rows})


def build_model(size: str, vocab_size: int, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=8192, **SIZES[size])
    return LlamaForCausalLM(config).to(dtype)


def peak_memory_text() -> str:
    """Peak memory of the run just finished: the GPU's peak allocation, or the process's max RSS on CPU."""
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU peak allocated)"
    # ru_maxrss is a high-water mark over the whole process: it never drops between runs.
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS, cumulative)"


def cpu_note() -> str:
    """The line printed under a demo's table on a machine without CUDA ("" with CUDA)."""
    if torch.cuda.is_available():
        return ""
    return ("On CPU the kernels run in Triton's interpreter or as their PyTorch reference, so step times and "
            "tokens/s say nothing about speed; the memory column is the process's max RSS, which only grows, "
            "so the patched run (second) cannot show less. The CPU run checks that training works and matches; "
            "run on a CUDA GPU for speed and memory.")


def device_and_path() -> str:
    """'<device>; kernels: <path> path' for the demos' headers."""
    from . import runtime

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    return f"{device}; kernels: {runtime.path_for(torch.empty(0, device='cuda' if cuda else 'cpu'))} path"


def step_timer():
    """A TrainerCallback recording wall time per optimizer step (`.times`, seconds), synchronized on CUDA.
    Built on call so that importing this module does not import transformers."""
    from transformers import TrainerCallback

    class _StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t0 = [], None

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kw):
            self._sync()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self._sync()
            self.times.append(time.perf_counter() - self._t0)

    return _StepTimer()
