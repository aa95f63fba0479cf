"""What each rank of tests/distributed/test_ddp_fsdp.py runs (2 processes, gloo, CPU), and the single-process
references it is compared with.

One training step of a tiny Llama (tests/models.py) per scenario. Rank r takes rows [2r, 2r + 2) of a 4-row
batch whose rows have different numbers of labelled tokens. The loss of a rank is its summed token loss
divided by the token count of the *whole* batch (``num_items_in_batch``, all-reduced as transformers'
Trainer does with average_tokens_across_devices) and multiplied by the world size: DDP and FSDP average the
gradients over the ranks, so the averaged gradient is exactly the gradient of the single-process loss on the
concatenated batch (summed token loss / global count), not only in expectation. A mean per rank would give
the mean of two means, which differs from the global mean whenever the ranks hold different token counts.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

WORLD = 2
LR = 0.5
_ROWS, _COLS = 4, 12
# This process's device: cpu (gloo), or cuda:<rank> for the multigpu (nccl) variant; set by main() and by
# the test module for its single-process references.
DEVICE = torch.device("cpu")


def data():
    """(ids [4, 12], labels, global count of labelled next-token targets)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 131, (_ROWS, _COLS), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100  # rank 0 holds fewer targets than rank 1
    labels[3, 9:] = -100
    return ids.to(DEVICE), labels.to(DEVICE), int((labels[:, 1:] != -100).sum())


def rows(t, rank):
    return t[2 * rank:2 * rank + 2]


def model(patched=True, tied=False, **options):
    import fastkern
    from tests.models import tiny_model

    m = tiny_model("llama", tie_word_embeddings=tied).to(DEVICE).train()
    if patched:
        fastkern.patch_model(m, **options)
    return m


def step(m, loss):
    """Backward, then one SGD step: returns the gradients (full tensors) and the parameters after the step."""
    loss.backward()
    m = getattr(m, "module", m)  # DDP's wrapper prefixes the names with "module."
    grads = {n: _full(p.grad) for n, p in m.named_parameters() if p.grad is not None}
    torch.optim.SGD(m.parameters(), lr=LR).step()
    params = {n: _full(p.detach()) for n, p in m.named_parameters()}
    return grads, params


def _full(t):
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def reference(patched: bool, half: int | None = None, tied: bool = False, lora: bool = False):
    """Single process: the concatenated batch with the global count (half=None), or one rank's rows alone
    with their own count (half=r); with LoRA adapters on every linear layer if ``lora``. Returns loss,
    gradients, parameters after the SGD step."""
    ids, labels, n = data()
    if half is not None:
        ids, labels = rows(ids, half), rows(labels, half)
        n = int((labels[:, 1:] != -100).sum())
    if lora:
        m = _with_lora(model(False, tied))
        if patched:
            import fastkern

            fastkern.patch_model(m)
    else:
        m = model(patched, tied)
    loss = m(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(n, device=DEVICE)).loss
    grads, params = step(m, loss)
    return {"loss": loss.detach().cpu(), "grads": grads, "params": params}


def _fsdp(m, head: bool):
    from torch.distributed.fsdp import fully_shard

    for layer in m.model.layers:
        fully_shard(layer)
    if head:  # the lm_head in an FSDP group of its own: never unsharded by the root's forward
        fully_shard(m.lm_head)
    fully_shard(m)
    return m


def _fsdp_as_accelerate(m):
    """The units accelerate 1.16's fsdp2_prepare_model makes for a transformers model: each decoder layer
    (TRANSFORMER_BASED_WRAP), the input embedding when untied, the tail [final norm, lm_head] (with the
    embedding when tied) kept unsharded after forward, then the root. The head is then a member of a group
    that the final norm's forward unshards, and its own forward never runs."""
    from torch.distributed.fsdp import fully_shard

    for layer in m.model.layers:
        fully_shard(layer)
    tied = m.lm_head.weight is m.model.embed_tokens.weight
    if not tied:
        fully_shard(m.model.embed_tokens)
    fully_shard([m.model.norm, m.model.embed_tokens, m.lm_head] if tied else [m.model.norm, m.lm_head],
                reshard_after_forward=False)
    fully_shard(m)
    return m


class _Spy:
    """Counts the calls TRL's fused head hands to fastkern and to TRL's own function."""

    def __init__(self):
        from trl.kernels import ChunkedLogProbFunction

        from fastkern.integrations import trl as trl_hook

        self.fastkern = self.trl = 0
        real_fastkern, real_trl = trl_hook.fused_logprobs, ChunkedLogProbFunction.apply

        def count_fastkern(*args):
            self.fastkern += 1
            return real_fastkern(*args)

        def count_trl(*args):
            self.trl += 1
            return real_trl(*args)

        trl_hook.fused_logprobs = count_fastkern
        ChunkedLogProbFunction.apply = staticmethod(count_trl)
        self._undo = lambda: (setattr(trl_hook, "fused_logprobs", real_fastkern),
                              setattr(ChunkedLogProbFunction, "apply", staticmethod(real_trl)))

    def close(self):
        self._undo()
        return {"fastkern_calls": self.fastkern, "trl_calls": self.trl}


def _global_step(rank, m, trl_head=False):
    ids, labels, n = data()
    kw = dict(labels=rows(labels, rank), num_items_in_batch=torch.tensor(n, device=DEVICE))
    out = m(rows(ids, rank), fused_lm_head=True, **kw) if trl_head else m(input_ids=rows(ids, rank), **kw)
    total = out.loss.detach().clone()
    grads, params = step(m, out.loss * WORLD)
    dist.all_reduce(total)  # sum of S_r / N over ranks = S / N, the single-process loss
    return {"loss": total.cpu(), "grads": grads, "params": params,
            "logits_none": getattr(out, "logits", None) is None}


def scenario_ddp(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    return _global_step(rank, DDP(model(True)))


def scenario_fsdp_plain(rank):
    return _global_step(rank, _fsdp(model(False), head=False))


def scenario_fsdp(rank):
    return _global_step(rank, _fsdp(model(True), head=False))


def scenario_fsdp_head(rank):
    return _global_step(rank, _fsdp(model(True), head=True))


def scenario_fsdp_accelerate(rank):
    return _global_step(rank, _fsdp_as_accelerate(model(True)))


def scenario_fsdp_accelerate_tied(rank):
    return _global_step(rank, _fsdp_as_accelerate(model(True, tied=True)))


def _checkpointed(m):
    """Gradient checkpointing on, non-reentrant, as transformers' Trainer and TRL turn it on."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable = getattr(m, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m


class _ReentrantCount:
    """Counts the layer calls that took checkpointing="recompute"'s reentrant form (once per call: the offload
    form hands a layer without inputs to move to the recompute form's own ``_reentrant``)."""

    def __init__(self):
        from fastkern.patching.checkpointing import OffloadRecomputeFunction, RecomputeCheckpointFunction

        self.calls, self._undo, self._inside = 0, [], False
        for cls in (RecomputeCheckpointFunction, OffloadRecomputeFunction):
            real = cls.__dict__["_reentrant"]

            def count(this, *args, _real=real):
                if self._inside:
                    return _real(this, *args)
                self.calls, self._inside = self.calls + 1, True
                try:
                    return _real(this, *args)
                finally:
                    self._inside = False

            cls._reentrant = count
            self._undo.append((cls, real))

    def close(self):
        for cls, real in self._undo:
            cls._reentrant = real
        return {"reentrant_calls": self.calls}


def _ddp_recompute(rank, find_unused: bool, lora: bool = False, checkpointing: str = "recompute"):
    """checkpointing="recompute" (or "offload") under DDP: the reentrant checkpoint with the layer's
    parameters as its inputs (docs/multi_gpu.md), with find_unused_parameters=True (what transformers'
    Trainer picks for a PEFT model) or False."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    m = _checkpointed(model(False))
    if lora:
        m = _with_lora(m)
    import fastkern

    fastkern.patch_model(m, checkpointing=checkpointing)
    spy = _ReentrantCount()
    try:
        result = _global_step(rank, DDP(m, find_unused_parameters=find_unused))
    finally:
        counts = spy.close()
    result.update(counts, layers=m.config.num_hidden_layers)
    return result


def _with_lora(m):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)  # nonzero B: every adapter gets a gradient
    return get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                        init_lora_weights=False))


def scenario_ddp_recompute(rank):
    return _ddp_recompute(rank, find_unused=True)


def scenario_ddp_recompute_static(rank):
    return _ddp_recompute(rank, find_unused=False)


def scenario_ddp_recompute_lora(rank):
    return _ddp_recompute(rank, find_unused=True, lora=True)


def scenario_ddp_offload_lora(rank):
    return _ddp_recompute(rank, find_unused=True, lora=True, checkpointing="offload")


def scenario_fsdp_recompute(rank):
    return _global_step(rank, _fsdp(_checkpointed(model(True, checkpointing="recompute")), head=False))


def scenario_fsdp_offload(rank):
    # Offloaded checkpointing composed with FSDP2 (on CPU the saved inputs stay in place: only CUDA tensors
    # are copied out, so this checks the composition, not the copies).
    return _global_step(rank, _fsdp(model(True, checkpointing="offload"), head=False))


def scenario_trl_fsdp_head(rank):
    from trl.trainer.utils import add_fused_lm_head

    m = model(True)
    add_fused_lm_head(m)
    _fsdp(m, head=True)
    spy = _Spy()
    try:
        result = _global_step(rank, m, trl_head=True)
    finally:
        result.update(spy.close())
    return result


def scenario_dtensor_head(rank):
    """No FSDP: the lm_head weight is a DTensor sharded by rows on a CPU mesh (as tensor parallelism leaves
    it). Each rank trains on its own rows with its own count; the gradient of its shard must be that shard
    of the single-process gradient on those rows. Then the same through TRL's fused head, which gathers
    the weight with full_tensor() before calling its function."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from trl.trainer.utils import add_fused_lm_head

    mesh = init_device_mesh(DEVICE.type, (WORLD,))
    ids, labels, _ = data()
    ids, labels = rows(ids, rank), rows(labels, rank)
    n = torch.tensor(int((labels[:, 1:] != -100).sum()), device=DEVICE)
    result = {}
    for via_trl in (False, True):
        m = model(True)
        m.lm_head.weight = torch.nn.Parameter(distribute_tensor(m.lm_head.weight.detach(), mesh, [Shard(0)]))
        spy = None
        if via_trl:
            add_fused_lm_head(m)
            spy = _Spy()
        try:
            out = (m(ids, labels=labels, num_items_in_batch=n, fused_lm_head=True) if via_trl
                   else m(input_ids=ids, labels=labels, num_items_in_batch=n))
            out.loss.backward()
        finally:
            counts = spy.close() if spy else {}
        grads = {name: (p.grad.to_local() if name == "lm_head.weight" else p.grad).cpu().clone()
                 for name, p in m.named_parameters() if p.grad is not None}
        result["trl" if via_trl else "loss"] = {"loss": out.loss.detach().cpu(), "grads": grads,
                                                "logits_none": getattr(out, "logits", None) is None, **counts}
    return result


def _qlora(path, storage):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import fastkern

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=storage)
    m = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32,
                                             device_map={"": DEVICE.type if DEVICE.type == "cpu" else DEVICE.index})
    torch.manual_seed(1)  # nonzero B: the adapters' gradients all depend on the NF4 products
    m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                     init_lora_weights=False)).train()
    report = fastkern.patch_model(m)
    return m, "fastkern NF4 dequant" in str(report)


QLORA_STORAGES = (torch.bfloat16, torch.uint8)


def scenario_qlora_fsdp(rank):
    """QLoRA (NF4, double quant) with fastkern's NF4 LoRA path, FSDP2 over the decoder layers and the root,
    for a floating quant_storage (bf16: what FSDP+QLoRA recipes set) and bitsandbytes' default uint8. Both
    ranks take the whole batch, so the averaged gradients must equal the unsharded model's exactly.

    GPU (multigpu) only: under the Triton interpreter the NF4 forward costs ~4 s per model, over the CPU
    budget of this suite; the same check passed on CPU by hand (docs/multi_gpu.md)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from fastkern.integrations.peft import base_quant_state
    from tests.models import tiny_model

    path = os.path.join(_OUT_DIR, "tiny-llama")
    if rank == 0:
        tiny_model("llama").save_pretrained(path)
    dist.barrier()
    ids, labels, n = data()
    result = {}
    for storage in QLORA_STORAGES:
        runs = []
        for sharded in (False, True):
            m, nf4_path = _qlora(path, storage)
            base = m.base_model.model.model.layers[0].mlp.down_proj.base_layer
            full_bytes = base.weight.numel() * base.weight.element_size()
            if sharded:
                for layer in m.base_model.model.model.layers:
                    fully_shard(layer)
                fully_shard(m)
            weight = base.weight
            local = weight.to_local() if isinstance(weight, DTensor) else weight
            out = m(input_ids=ids, labels=labels)
            out.loss.backward()
            grads = {name: _full(p.grad) for name, p in m.named_parameters() if p.grad is not None}
            runs.append({"loss": out.loss.detach().cpu(), "grads": grads, "nf4_path": nf4_path,
                         "sharded_bytes_fraction": local.numel() * local.element_size() / full_bytes,
                         "quant_state_kept": base_quant_state(base) is not None})
        result[str(storage)] = runs
    return result


# Left out of the CPU (gloo) run for time; see scenario_qlora_fsdp.
GPU_ONLY = {"qlora_fsdp"}
SCENARIOS = {
    "ddp": scenario_ddp,
    "fsdp_plain": scenario_fsdp_plain,
    "fsdp": scenario_fsdp,
    "fsdp_head": scenario_fsdp_head,
    "fsdp_accelerate": scenario_fsdp_accelerate,
    "fsdp_accelerate_tied": scenario_fsdp_accelerate_tied,
    "fsdp_offload": scenario_fsdp_offload,
    "ddp_recompute": scenario_ddp_recompute,
    "ddp_recompute_static": scenario_ddp_recompute_static,
    "ddp_recompute_lora": scenario_ddp_recompute_lora,
    "ddp_offload_lora": scenario_ddp_offload_lora,
    "fsdp_recompute": scenario_fsdp_recompute,
    "trl_fsdp_head": scenario_trl_fsdp_head,
    "dtensor_head": scenario_dtensor_head,
    "qlora_fsdp": scenario_qlora_fsdp,
}
_OUT_DIR = ""


def main(rank: int, port: int, out_dir: str, names: list[str], backend: str = "gloo") -> None:
    """mp.spawn target: run the named scenarios on this rank, save {name: result} to out_dir/rank<r>.pt.
    backend "nccl" runs on cuda:<rank> (the multigpu variant)."""
    global DEVICE, _OUT_DIR
    _OUT_DIR = out_dir
    torch.set_num_threads(1)  # two ranks share two cores with the rest of the machine
    if backend == "nccl":
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {name: SCENARIOS[name](rank) for name in names}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
