"""One measured long-context training step (bench/e2e/long_context.py): a plain loop or TRL's SFTTrainer,
the attention backend that actually ran, and on the CPU a tracked peak of live tensor memory.

Steppers share one interface: ``step(seq_len) -> (loss, seconds)`` runs one optimizer step on one
sequence of ``seq_len`` random token ids (batch 1) and ``free()`` drops what the step left behind.

* ``LoopStepper``: forward, backward, AdamW step in a few lines (the cheaper default, ``--trainer loop``).
* ``TrlStepper`` (``--trainer trl``): TRL's SFTTrainer with ``padding_free=True``, batch 1, one step
  (``max_steps=1``), TRL's own gradient checkpointing (on by default in SFTConfig), bf16 on CUDA, on an
  in-memory dataset of one pre-tokenized sequence (``datasets.Dataset.from_dict``). A new trainer per
  length (its optimizer too: AdamW's state is created inside the measured step, as in a real first step);
  the step is timed by a callback, so building the trainer and its dataloader is not counted.
"""

from __future__ import annotations

import functools
import gc
import shutil
import tempfile
import time
import weakref

import torch

# aten ops that say which scaled-dot-product-attention kernel ran (forward or backward names map to the
# same label); the first match in this order names an event.
_BACKENDS = (
    ("_scaled_dot_product_flash_attention_for_cpu", "cpu flash (aten CPU kernel)"),
    ("_scaled_dot_product_flash_attention", "flash"),
    ("_scaled_dot_product_efficient_attention", "efficient"),
    ("_scaled_dot_product_cudnn_attention", "cudnn"),
    ("_scaled_dot_product_fused_attention_overrideable", "overrideable"),
    ("_scaled_dot_product_attention_math", "math"),
    ("_flash_attention_forward", "varlen flash"),
    ("_flash_attention_backward", "varlen flash"),
    ("_efficient_attention_forward", "varlen efficient"),
    ("_efficient_attention_backward", "varlen efficient"),
)


def backend_label(event_names) -> str:
    """The attention kernels among profiler event names, e.g. ``"flash"`` or ``"flash + math"``; ``"none
    seen"`` when no SDPA-class op ran (e.g. an attention written as matmuls)."""
    seen = []
    for name in event_names:
        for op, label in _BACKENDS:
            if op in name:
                if label not in seen:
                    seen.append(label)
                break
    return " + ".join(seen) if seen else "none seen"


class AttentionBackends:
    """Context manager: records, through torch.profiler with CPU activity only (aten op names, no CUDA
    tracing, so the step's time is barely touched), which attention kernels the step dispatched to.
    ``label`` after exit."""

    def __init__(self):
        self.label = "not recorded"
        self._prof = None

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=False)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        if exc[0] is None:
            self.label = backend_label(e.key for e in self._prof.key_averages())
        self._prof = None
        return False


class TrackedPeak:
    """On the CPU, where torch keeps no allocator statistics and the process's max RSS only ever grows: the
    peak bytes of live tensor storages during the step. A dispatch mode sees every op's outputs; each new
    storage is counted until it is freed (a weak reference's callback; torch keeps a storage's Python
    object alive as long as the storage). The model's parameters and buffers (and ``others``' tensors, e.g.
    an optimizer's state) count from the start. ``peak_mib`` after exit. This is what ``--memory-cap-mib``
    compares against to simulate a device cap on the CPU; views, in-place ops and reused storages are
    counted once."""

    def __init__(self, model, *others):
        self.peak_mib = None
        self._model, self._others = model, others
        self._mode = None

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        from torch.utils.weak import WeakIdKeyDictionary

        live = WeakIdKeyDictionary()
        state = dict(current=0, peak=0)

        def release(nbytes, _ref):
            state["current"] -= nbytes

        def track(t):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                return
            st = t.untyped_storage()
            if st in live:
                return
            nbytes = st.nbytes()
            live[st] = weakref.ref(st, functools.partial(release, nbytes))
            state["current"] += nbytes
            state["peak"] = max(state["peak"], state["current"])

        for t in list(self._model.parameters()) + list(self._model.buffers()):
            track(t)
        for other in self._others:
            if isinstance(other, torch.optim.Optimizer):
                for st in other.state.values():
                    for v in st.values():
                        track(v)

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    track(t)
                return out

        self._state, self._live = state, live
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self.peak_mib = self._state["peak"] / 2**20
        self._mode, self._live = None, None
        return False


def random_ids(seq_len: int, vocab: int) -> torch.Tensor:
    """[seq_len] token ids in [0, vocab), the same for a given length whatever the trainer."""
    g = torch.Generator(device="cpu").manual_seed(seq_len)
    return torch.randint(0, vocab, (seq_len,), generator=g)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LoopStepper:
    """forward + backward + AdamW step on one [1, seq_len] row (input ids = labels)."""

    def __init__(self, model, device: torch.device, lr: float = 1e-5):
        self.model, self.device = model, device
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(self, seq_len: int) -> tuple[float, float]:
        _sync(self.device)
        start = time.perf_counter()
        ids = random_ids(seq_len, self.model.config.vocab_size)[None].to(self.device)
        loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        _sync(self.device)
        seconds = time.perf_counter() - start
        del loss, ids
        return value, seconds

    def tracked(self):
        return self.model, self.optimizer

    def free(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        free_memory(self.model)


class TrlStepper:
    """One TRL SFTTrainer step per call (padding-free, batch 1, max_steps 1)."""

    def __init__(self, model, device: torch.device, lr: float = 1e-5):
        from fastkern.demo import build_tokenizer

        self.model, self.device, self.lr = model, device, lr
        self.tokenizer = build_tokenizer()  # only its pad token is used: the dataset is already token ids
        self.trainer = None

    def _config(self, out_dir: str):
        from trl import SFTConfig

        cuda = self.device.type == "cuda"
        # padding_free=True without packing: TRL requires max_length=None (the one sequence is used whole).
        return SFTConfig(output_dir=out_dir, max_steps=1, per_device_train_batch_size=1, padding_free=True,
                         packing=False, max_length=None, learning_rate=self.lr, lr_scheduler_type="constant",
                         warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", bf16=cuda,
                         use_cpu=not cuda, dataloader_num_workers=0, disable_tqdm=True, seed=0, data_seed=0)

    def step(self, seq_len: int) -> tuple[float, float]:
        from datasets import Dataset
        from trl import SFTTrainer

        from fastkern.demo import step_timer

        dataset = Dataset.from_dict({"input_ids": [random_ids(seq_len, self.model.config.vocab_size).tolist()]})
        out_dir = tempfile.mkdtemp(prefix="fastkern-long-context-")
        timer = step_timer()
        try:
            self.trainer = SFTTrainer(model=self.model, args=self._config(out_dir), train_dataset=dataset,
                                      processing_class=self.tokenizer, callbacks=[timer])
            self.trainer.train()
            losses = [h["loss"] for h in self.trainer.state.log_history if "loss" in h]
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        if not losses or not timer.times:
            raise RuntimeError("TRL step: the trainer logged no loss or no step")
        return float(losses[-1]), timer.times[-1]

    def tracked(self):
        return (self.model,)

    def free(self) -> None:
        # The trainer holds its optimizer (AdamW state), the dataloader and the last batch: drop them all.
        if self.trainer is not None:
            self.trainer.optimizer = None
            self.trainer.lr_scheduler = None
            self.trainer = None
        self.model.zero_grad(set_to_none=True)
        free_memory(self.model)


def free_memory(model) -> None:
    """Everything a step (or a failed step) left cached: Python garbage (frames of an exception hold
    tensors), the offloader's host pool, torch's CUDA cache."""
    gc.collect()
    from fastkern.patching.checkpointing import model_offloader

    offloader = model_offloader(model)
    if offloader is not None:
        offloader.empty_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


STEPPERS = {"loop": LoopStepper, "trl": TrlStepper}
