"""Packed-batch attention on one GPU: transformers' SDPA (block-diagonal [1, 1, T, T] mask) vs patch_model(packing=True).

    python bench/run.py --ops packed_attention --out DIR               # GPU: Llama-1B shape, one 32K-token row
    python bench/run.py --ops packed_attention --tiny --device cpu --out DIR   # tiny shape, fp32 (CI runs this)

Model: 2 decoder layers of Llama-3.2-1B's shape (hidden 2048, 32 query / 8 key-value heads, head_dim 64,
intermediate 8192; vocab shrunk to 1024 so the LM head does not dominate), bf16, random init. Batch: one
row of 32768 tokens holding ~64 documents of random lengths, position_ids restarting per document, no
attention_mask, TRL's cu_seq_lens_q/k and max_length_q/k passed along, as TRL's padding-free collator
gives them; use_cache=False (training).

Rows (same weights, same batch):
* "transformers sdpa": unpatched; transformers builds the [1, 1, T, T] block-diagonal mask (1 GiB of bool
  at T=32K) and SDPA runs with it (the flash backend cannot take a mask);
* "fastkern packing": patch_model(model, packing=True, every other option off): transformers' rope
  leaves q/k head-major, which go through SDPA per document (see ops/document_attention.py);
* "fastkern packing + rope": the same with rope=True: q/k stay token-major and run varlen flash attention
  (torch.nn.attention.varlen) where this torch has it. The note column says which backend each row ran.

Each row is checked first against running every document alone through the unpatched model (plain causal
attention, positions 0..n-1, no mask): the loss and the embedding gradient, whose relative error goes in
the table. transformers' own row is reported, not trusted. The loss is the mean square of a fixed random
8-column projection of the last hidden state: a plain mean square of LlamaModel's output would be constant
(the final RMSNorm gives every token unit RMS), its gradient pure rounding noise (on the H100 every row,
transformers' included, then disagreed with every other by ~1.2 relative). Then each row is timed: fwd+bwd of the
two layers plus that loss (bench/measure.py: do_bench median on CUDA), and peak extra memory.
Budget: well under a minute on an H100.
"""

from __future__ import annotations

import random

import torch

FULL = dict(hidden=2048, heads=32, kv_heads=8, head_dim=64, intermediate=8192, tokens=32768, documents=64,
            vocab=1024)
SMOKE = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, tokens=96, documents=6, vocab=64)


def document_lengths(tokens: int, documents: int, seed: int = 0) -> list[int]:
    """`documents` random lengths (at least 1) summing to `tokens`."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, tokens), documents - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, tokens])]


def build_model(shape: dict, dtype: torch.dtype, device: str):
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=shape["hidden"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], intermediate_size=shape["intermediate"], num_hidden_layers=2,
        vocab_size=shape["vocab"], max_position_embeddings=max(shape["tokens"], 2048),
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaModel(config).to(device=device, dtype=dtype).train()


def make_batch(shape: dict, device: str, seed: int = 0):
    lengths = document_lengths(shape["tokens"], shape["documents"], seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape["vocab"], (1, shape["tokens"]), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    kwargs = dict(input_ids=ids.to(device), position_ids=position_ids.to(device), use_cache=False,
                  cu_seq_lens_q=cu.to(device), cu_seq_lens_k=cu.to(device), max_length_q=max(lengths),
                  max_length_k=max(lengths))
    return kwargs, lengths


def probe(model) -> torch.Tensor:
    """A fixed random [hidden, 8] projection: the loss is mean((last_hidden @ probe)^2)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(model.config.hidden_size, 8, generator=g).to(model.device)


def per_document_reference(model, batch, lengths):
    """Loss and embedding gradient of the packed batch computed one document at a time (no packing at all)."""
    model.zero_grad(set_to_none=True)
    ids = batch["input_ids"]
    total = ids.shape[1] * 8
    projection = probe(model)
    loss = torch.zeros((), device=ids.device)
    start = 0
    for n in lengths:
        positions = torch.arange(n, device=ids.device)[None]
        hidden = model(input_ids=ids[:, start:start + n], position_ids=positions, use_cache=False).last_hidden_state
        part = (hidden.float() @ projection).pow(2).sum() / total
        part.backward()
        loss += part.detach()
        start += n
    return loss, model.embed_tokens.weight.grad.float()


def fwd_bwd(model, batch):
    model.zero_grad(set_to_none=True)
    hidden = model(**batch).last_hidden_state
    loss = (hidden.float() @ probe(model)).pow(2).mean()
    loss.backward()
    return loss.detach(), model.embed_tokens.weight.grad


def backends_used(fn) -> list[str]:
    """The document_attention backends one call of `fn` ran (recorded from select_backend as it
    returns: the layout of the real q/k decides, which a probe tensor cannot stand in for)."""
    import sys

    module = sys.modules["fastkern.ops.document_attention"]
    real, seen = module.select_backend, set()

    def recording(*args, **kwargs):
        chosen = real(*args, **kwargs)
        seen.add(chosen)
        return chosen

    module.select_backend = recording
    try:
        fn()
    finally:
        module.select_backend = real
    return sorted(seen) or ["none (no packed attention call)"]


def run(bench) -> None:
    import fastkern

    shape, device, dtype = (SMOKE if bench.tiny else FULL), bench.device, bench.dtype
    model = build_model(shape, dtype, device)
    batch, lengths = make_batch(shape, device)
    reference = per_document_reference(model, batch, lengths)
    tol = 5e-2 if dtype != torch.float32 else 1e-4
    variants = {"transformers sdpa": None, "fastkern packing": dict(rope=False),
                "fastkern packing + rope": dict(rope=True)}
    for label, options in variants.items():
        note = "block-diagonal [1, 1, T, T] mask"
        if options is not None:
            fastkern.unpatch_model(model)
            fastkern.patch_model(model, packing=True, mlp=False, lora=False, loss=False, **options)
            note = "backend: " + ", ".join(backends_used(lambda: fwd_bwd(model, batch)))
        loss, grad = fwd_bwd(model, batch)
        rel = ((grad.float() - reference[1]).norm() / reference[1].norm()).item()
        loss_ok = torch.allclose(loss.float(), reference[0].float(), rtol=tol)
        print(f"{label}: loss {loss.item():.6f} vs per-document {reference[0].item():.6f}, grad rel err {rel:.2e}")
        if options is not None and not (loss_ok and rel < tol):
            raise AssertionError(f"{label}: disagrees with the per-document reference (tolerance {tol:g})")
        ms = bench.ms(lambda: fwd_bwd(model, batch), warmup=3, rep=200)
        mib = bench.peak_mib(lambda: fwd_bwd(model, batch))
        bench.add("packed_attention", "2 layers fwd+bwd", f"1x{shape['tokens']} tokens, {len(lengths)} documents "
                  f"(longest {max(lengths)})", label, ms=ms, peak_mib=mib, grad_rel_err=rel, note=note)
    fastkern.unpatch_model(model)
