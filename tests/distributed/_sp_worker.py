"""What each rank of tests/distributed/test_sequence_parallel.py runs (2 processes, gloo, CPU), and the
single-process references it is compared with.

Every model scenario is one forward and backward of a tiny Llama (hidden 64, 4 heads, 2 kv heads, 2 layers,
vocab 97, fp32) on a sequence of odd length (so shard_sequence pads one token), sharded over the 2 ranks:
rank 0 holds tokens [0, 12), rank 1 [12, 24) of the padded row. The loss is sequence_parallel_loss of the
summed shard losses, the gradients are summed over the ranks by sync_gradients; both must equal one process
running the whole unsharded batch with the ordinary mean loss.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

WORLD = 2
VOCAB = 97
LENGTH = 23  # odd: padded to 24, 12 tokens per rank
DOCUMENTS = (9, 8, 6)  # the packed row: document 1 crosses the shard boundary at 12
# This process's device: cpu (gloo), or cuda:<rank> for the multigpu (nccl) variant; set by main() and by
# the test module for its single-process references.
DEVICE = torch.device("cpu")


def model(patched: bool, kv_heads: int = 2, attn: str = "sdpa", checkpointing: bool = False, **overrides):
    import fastkern
    from tests.models import tiny_model

    m = tiny_model("llama", vocab_size=VOCAB, num_key_value_heads=kv_heads, attn=attn, **overrides)
    m = m.to(DEVICE).train()
    if checkpointing:
        enable = getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable  # 5.23 renamed it
        enable()
    if patched:
        fastkern.patch_model(m)
    return m


def data(kind: str):
    """(input_ids, labels, position_ids) of the whole batch, the same on every rank.

    "packed": one row of 3 documents, positions restarting at each, the first token of each document
    unlabelled (TRL's padding-free collator). "causal": 2 ordinary rows, the second row's last 14 tokens
    unlabelled, so rank 1's shard of it has no target and the ranks hold different token counts. "front":
    the same rows labelled in their first 10 tokens only."""
    g = torch.Generator().manual_seed(5)
    if kind == "packed":
        ids = torch.randint(3, VOCAB, (1, LENGTH), generator=g)
        position_ids = torch.cat([torch.arange(n) for n in DOCUMENTS]).unsqueeze(0)
        labels = ids.clone()
        labels[position_ids == 0] = -100
        return ids.to(DEVICE), labels.to(DEVICE), position_ids.to(DEVICE)
    ids = torch.randint(3, VOCAB, (2, LENGTH), generator=g)
    labels = ids.clone()
    labels[1, LENGTH - 14:] = -100
    if kind == "front":  # targets in the first 10 tokens only: rank 1 has none, yet must run its backward
        labels[:, 10:] = -100
    return ids.to(DEVICE), labels.to(DEVICE), None


# name -> (batch kind, model options). Every case: sharded over 2 ranks vs one process.
CASES = {
    "packed": ("packed", dict(patched=False)),
    "packed_patched": ("packed", dict(patched=True)),
    "causal": ("causal", dict(patched=False)),
    "causal_patched": ("causal", dict(patched=True)),
    "causal_eager": ("causal", dict(patched=False, attn="eager")),
    "no_targets_on_rank_1": ("front", dict(patched=True)),  # transformers' eager needs an explicit mask
    "packed_patched_checkpointing": ("packed", dict(patched=True, checkpointing=True)),  # all-to-alls recomputed
    "kv_repeat": ("packed", dict(patched=True, kv_heads=1)),  # 1 kv head, 2 ranks: repeated x2
}


def _grads(m):
    return {n: p.grad.detach().cpu().clone() for n, p in m.named_parameters() if p.grad is not None}


def reference(case: str):
    """One process, the whole batch, the model's ordinary mean loss. use_cache=False as in training (TRL
    turns it off): with a cache, transformers 5.25's sdpa path lets packed documents attend to each other."""
    kind, options = CASES[case]
    ids, labels, position_ids = data(kind)
    m = model(**options)
    out = m(input_ids=ids, labels=labels, position_ids=position_ids, use_cache=False)
    out.loss.backward()
    return {"loss": out.loss.detach().cpu(), "grads": _grads(m)}


def _sharded_step(case: str):
    from fastkern.parallel import enable_sequence_parallel, sequence_parallel_loss, shard_sequence, sync_gradients

    kind, options = CASES[case]
    m = model(**options)
    sp = enable_sequence_parallel(m, None)
    ids, labels, position_ids = data(kind)
    shard = shard_sequence(ids, labels, position_ids)
    out = m(**shard.model_inputs())
    loss = sequence_parallel_loss(out.loss, shard.token_count)
    loss.backward()
    sync_gradients(m)
    report = str(sp)
    sp.undo()
    return {"loss": loss.detach().cpu(), "grads": _grads(m), "token_count": shard.token_count, "report": report,
            "logits_none": getattr(out, "logits", None) is None}


def scenario_models(rank):
    return {case: _sharded_step(case) for case in CASES}


def scenario_shard(rank):
    """shard_sequence's layout and padding rule on the packed row."""
    from fastkern.parallel import shard_sequence

    ids, labels, position_ids = data("packed")
    shard = shard_sequence(ids, labels, position_ids, pad_token_id=0)
    return {name: (value.cpu() if isinstance(value, torch.Tensor) else value) for name, value in
            ((n, getattr(shard, n)) for n in ("input_ids", "position_ids", "labels", "shift_labels", "token_count",
                                              "start", "stop", "padding"))}


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def scenario_errors(rank):
    """Bad input fails on every rank before any collective, with a message that says what to do."""
    from fastkern.parallel import enable_sequence_parallel, shard_sequence

    result = {"heads": _error(lambda: enable_sequence_parallel(
        model(False, kv_heads=1, hidden_size=48, num_attention_heads=3), None))}
    m = model(False)
    sp = enable_sequence_parallel(m, None)
    ids, labels, position_ids = data("packed")
    shard = shard_sequence(ids, labels, position_ids)
    result["twice"] = _error(lambda: enable_sequence_parallel(m, None))
    result["no_position_ids"] = _error(lambda: m(input_ids=shard.input_ids))
    padding_mask = torch.ones_like(shard.input_ids)
    padding_mask[0, 0] = 0
    result["padding_mask"] = _error(lambda: m(**shard.model_inputs(), attention_mask=padding_mask))
    # An all-ones mask (a tokenizer's) is dropped: same loss as without it.
    with torch.no_grad():
        plain = m(**shard.model_inputs()).loss
        ones = m(**shard.model_inputs(), attention_mask=torch.ones_like(shard.input_ids)).loss
    result["ones_mask_same"] = bool(torch.equal(plain, ones))
    m.config._attn_implementation = "sdpa"
    result["implementation_changed"] = _error(lambda: m(**shard.model_inputs()))
    m.config._attn_implementation = sp.name
    sp.undo()
    result["undo_restores"] = m.config._attn_implementation == "sdpa"
    from transformers import AttentionInterface

    result["undo_unregisters"] = sp.name is None and not any(
        k.startswith("fastkern_ulysses") for k in AttentionInterface._global_mapping)
    return result


def scenario_single_rank_group(rank):
    """A group of one rank: enable_sequence_parallel changes nothing and says so."""
    from fastkern.parallel import enable_sequence_parallel

    groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank takes part in creating every group
    m = model(False)
    sp = enable_sequence_parallel(m, groups[rank])
    return {"active": sp.active, "report": str(sp), "implementation": m.config._attn_implementation}


def _perturbed_objective(x, w, scatter_dim, gather_dim, method):
    """A scalar of both ranks' inputs, the same on both: sum over ranks of sum(w_r * y_r^2), y = all_to_all(x)."""
    from fastkern.parallel import all_to_all, sum_over_ranks

    y = all_to_all(x, scatter_dim, gather_dim, method=method)
    return sum_over_ranks((w * y * y).sum()), y


def scenario_all_to_all(rank):
    """Forward against an all-gather of the inputs; backward against central differences of a global
    float64 objective, perturbing one entry of one rank's input at a time (both ranks evaluate it)."""
    result = {}
    for method in ("all_to_all_single", "send_recv"):
        for shape, scatter_dim, gather_dim in (((2, 4, 3, 2), 1, 2), ((2, 3, 4, 2), 2, 1)):
            g = torch.Generator().manual_seed(11 + rank)
            x = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
            out_shape = list(shape)
            out_shape[scatter_dim] //= WORLD
            out_shape[gather_dim] *= WORLD
            w = torch.randn(out_shape, generator=g, dtype=torch.float64).to(DEVICE)
            objective, y = _perturbed_objective(x, w, scatter_dim, gather_dim, method)
            everyone = [torch.empty(shape, dtype=torch.float64, device=DEVICE) for _ in range(WORLD)]
            dist.all_gather(everyone, x.detach())
            # Expected: this rank's chunk of every rank's input along scatter_dim, concatenated along gather_dim.
            expected = torch.cat([t.chunk(WORLD, scatter_dim)[rank] for t in everyone], dim=gather_dim)
            objective.backward()
            analytic = x.grad.clone()
            numeric = torch.zeros_like(analytic)
            eps = 1e-6
            for owner in range(WORLD):
                for i in range(x.numel()):
                    values = []
                    for sign in (1, -1):
                        xp = x.detach().clone()
                        if owner == rank:
                            xp.view(-1)[i] += sign * eps
                        values.append(_perturbed_objective(xp, w, scatter_dim, gather_dim, method)[0])
                    if owner == rank:
                        numeric.view(-1)[i] = (values[0] - values[1]) / (2 * eps)
            result[(method, scatter_dim, gather_dim)] = {
                "forward_error": (y.detach() - expected).abs().max().item(),
                "shape": tuple(y.shape),
                "grad_error": (analytic - numeric).abs().max().item(),
                "grad_scale": analytic.abs().max().item(),
            }
    return result


SCENARIOS = {
    "all_to_all": scenario_all_to_all,
    "shard": scenario_shard,
    "models": scenario_models,
    "errors": scenario_errors,
    "single_rank_group": scenario_single_rank_group,
}


def main(rank: int, port: int, out_dir: str, names: list[str], backend: str = "gloo") -> None:
    """mp.spawn target: run the named scenarios on this rank, save {name: result} to out_dir/rank<r>.pt.
    backend "nccl" runs on cuda:<rank> (the multigpu variant)."""
    global DEVICE
    torch.set_num_threads(1)  # two ranks share the machine's cores
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
