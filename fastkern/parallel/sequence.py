"""Sequence parallelism, DeepSpeed-Ulysses style: N ranks share one long sequence, T/N tokens each.

A training step on each rank of the sequence-parallel group (the same batch on every rank beforehand):

    sp = enable_sequence_parallel(model, group)            # once; sp.undo() restores the model
    shard = shard_sequence(input_ids, labels, position_ids, group=group)
    out = model(**shard.model_inputs())                     # out.loss: summed token loss of this shard
    loss = sequence_parallel_loss(out.loss, shard.token_count, group)   # = the one-process loss, every rank
    loss.backward()
    sync_gradients(model, group)                            # sum of the ranks' gradients = one-process gradient
    optimizer.step()

Why it is exact. Everything in a decoder layer but attention works token by token: embeddings, norms, MLP
(tiled or not), RoPE (each token rotates by its own position, so the shard carries the *global*
position_ids), the head and the cross-entropy of each position against its next token. Attention mixes
tokens, but each head independently: before it, an all-to-all turns this rank's q, k, v [B, T/N, H, D]
(all heads, its tokens) into [B, T, H/N, D] (all tokens, its heads); ordinary causal attention, per
document for packed rows, runs on those heads over the whole sequence; a second all-to-all turns the
output back into [B, T/N, H, D]. Each head's output is what one process computes.

The loss. transformers' causal loss compares position t with label t + 1; at a shard's last position the
next label lives on the next rank, so labels are shifted over the whole sequence *before* sharding
(``shift_labels``, which transformers' loss and fastkern's fused loss take as given). The one-process loss
is S / C (S: summed token loss, C: labelled tokens, over the whole sequence) = (sum_r S_r) / (sum_r C_r):
``sequence_parallel_loss`` sums both over the ranks. Its backward hands each rank dS_r / C. The
all-to-all's backward carries every rank's part of dL/d(activations) to the rank that holds those
tokens, so after backward rank r holds the gradient of L through its own tokens' uses of the weights;
their sum over the ranks (``sync_gradients``: all-reduce SUM) is dL/dW. DDP over the same group instead
averages: multiply the loss by N there.

How attention is routed. ``enable_sequence_parallel`` registers an attention function under a name of
its own in transformers' ``AttentionInterface`` (``fastkern_ulysses_<k>``, one per enabled model, which
also keeps transformers from building a [T/N, T/N] mask: the name has no mask function) and sets the
model's ``config._attn_implementation`` to it. transformers' attention modules and fastkern's patched
ones both look the function up per call by that name, so this works with and without
``fastkern.patch_model`` (fastkern's packing step sees an implementation it does not pack and stands
aside; the documents are found here, on the gathered position_ids). The wrapped implementation decides
how the local heads attend: "sdpa" and "flash_attention_*" -> ``fastkern.ops.document_attention``
backend "auto" (varlen flash attention on CUDA fp16/bf16, SDPA per document elsewhere), "eager" -> its
eager backend (fp32 softmax, softcap). A forward pre-hook on the decoder backbone checks each call.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..ops.document_attention import document_attention
from ..patching.packing import PackedDocuments, find_documents
from .collectives import all_to_all, group_size_and_rank, sum_over_ranks

IGNORE_INDEX = -100
# Implementations whose attention this wrapper reproduces, and the document_attention backend for each.
_BACKEND_FOR = {"sdpa": "auto", "eager": "eager", "flash_attention_2": "auto", "flash_attention_3": "auto"}
_names = itertools.count(1)


# ---------------------------------------------------------------------------------------------------
# Sharding a batch.


@dataclass(frozen=True)
class SequenceShard:
    """This rank's contiguous slice [start, stop) of a [B, T] batch padded to a multiple of N tokens."""

    input_ids: torch.Tensor  # [B, S], S = padded T / N
    position_ids: torch.Tensor  # [B, S] global positions (RoPE and document boundaries depend on them)
    labels: torch.Tensor | None  # [B, S] labels as given (transformers computes a loss only when labels is set)
    shift_labels: torch.Tensor | None  # [B, S] target of each position: the label of the next token, -100 last
    token_count: int  # labelled targets in this shard (shift_labels != ignore_index)
    start: int
    stop: int
    padding: int  # tokens appended at the end of every row before sharding

    def model_inputs(self) -> dict:
        """Keyword arguments for the model's forward. ``num_items_in_batch=1`` makes transformers' loss and
        fastkern's fused loss return the *summed* token loss of this shard (they divide a sum by it), the
        ``loss_sum`` that sequence_parallel_loss normalises over all ranks."""
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.shift_labels is not None:
            inputs.update(labels=self.labels, shift_labels=self.shift_labels, num_items_in_batch=1)
        return inputs


def _padded_length(length: int, world: int) -> int:
    return -(-length // world) * world


def shard_sequence(input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None, *, group=None, pad_token_id: int = 0,
                   ignore_index: int = IGNORE_INDEX) -> SequenceShard:
    """Split the sequence dimension of a [B, T] batch into N contiguous shards; return this rank's.

    Every rank passes the same whole batch. position_ids default to 0..T-1 per row; packed rows pass
    theirs (restarting at each document), which also mark the document boundaries attention keeps.

    Padding rule: T is padded at the end of every row to the next multiple of N with ``pad_token_id``,
    labels ``ignore_index`` and positions that continue the row's last position (+1, +2, ...). Appended
    after the last token, under causal attention they are never attended to by a real token, and as a
    continuation of the last document they add no document; they carry no label and are not predicted
    from (the last real token's target stays ignore_index, as without padding). So the loss and every
    gradient are those of the unpadded batch.
    """
    world, rank = group_size_and_rank(group)
    if input_ids.dim() != 2:
        raise ValueError(f"fastkern.parallel.shard_sequence: input_ids must be [batch, seq_len], got "
                         f"{tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if length == 0:
        raise ValueError("fastkern.parallel.shard_sequence: empty sequence")
    for name, t in (("labels", labels), ("position_ids", position_ids)):
        if t is not None and (t.dim() != 2 or t.shape[-1] != length or t.shape[0] not in (1, batch)):
            raise ValueError(f"fastkern.parallel.shard_sequence: {name} must be [{batch}, {length}], got "
                             f"{tuple(t.shape)}")
    if position_ids is None:
        position_ids = torch.arange(length, device=input_ids.device)
    position_ids = position_ids.expand(batch, length)
    padded = _padded_length(length, world)
    padding = padded - length
    if padding:
        steps = torch.arange(1, padding + 1, device=position_ids.device, dtype=position_ids.dtype)
        input_ids = torch.cat([input_ids, input_ids.new_full((batch, padding), pad_token_id)], dim=1)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + steps], dim=1)
    shift_labels = None
    if labels is not None:
        labels = labels.expand(batch, length)
        labels = torch.cat([labels, labels.new_full((batch, padding), ignore_index)], dim=1)
        # Position t predicts token t + 1 (transformers' ForCausalLMLoss): shift over the whole sequence
        # here, where the next token of a shard's last position is still at hand.
        shift_labels = torch.cat([labels[:, 1:], labels.new_full((batch, 1), ignore_index)], dim=1)
    size = padded // world
    start, stop = rank * size, (rank + 1) * size

    def local(t):
        return None if t is None else t[:, start:stop].contiguous()

    local_shift = local(shift_labels)
    count = 0 if local_shift is None else int((local_shift != ignore_index).sum())
    return SequenceShard(local(input_ids), local(position_ids), local(labels), local_shift, count, start, stop,
                         padding)


# ---------------------------------------------------------------------------------------------------
# The loss and the gradients.


def sequence_parallel_loss(loss_sum: torch.Tensor, token_count, group=None) -> torch.Tensor:
    """(sum over ranks of loss_sum) / (sum over ranks of token_count): the one-process mean token loss, the
    same value on every rank. ``loss_sum`` is this rank's summed token loss (``SequenceShard.model_inputs``
    makes the model return it), ``token_count`` its labelled tokens (int or tensor). Backward gives each
    rank d(loss_sum_r) / C, C the global count; one all-reduce carries both sums."""
    if loss_sum.dim() != 0:
        raise ValueError(f"fastkern.parallel.sequence_parallel_loss: loss_sum must be a scalar, got "
                         f"{tuple(loss_sum.shape)}")
    count = torch.as_tensor(token_count, dtype=torch.float64, device=loss_sum.device).reshape(())
    # float64: the count stays exact past 2^24 tokens, and the summed loss keeps its digits.
    totals = sum_over_ranks(torch.stack([loss_sum.to(torch.float64), count]), group)
    # No labelled token on any rank: 0 (and zero gradients) rather than 0/0.
    return (totals[0] / totals[1].clamp_min(1.0)).to(loss_sum.dtype)


_BUCKET_ELEMENTS = 1 << 25  # 32M elements (128 MB in fp32) per all-reduce: bounded extra memory


def sync_gradients(model: nn.Module, group=None) -> None:
    """All-reduce (SUM) the gradient of every trainable parameter over the group (see the module docstring
    for why a sum). Parameters that got no gradient on this rank count as zeros, so every rank sends the
    same buffers. Gradients are packed into flat buckets per device and dtype, one all-reduce each."""
    world, _ = group_size_and_rank(group)
    if world == 1:
        return
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    if any(isinstance(p, DTensor) or isinstance(p.grad, DTensor) for p in params):
        raise NotImplementedError("fastkern.parallel.sync_gradients: DTensor (FSDP2/TP) parameters; sequence "
                                  "parallelism composed with FSDP2 is not built (docs/multi_gpu.md)")
    buckets: dict[tuple, list[list[nn.Parameter]]] = {}
    for p in params:
        lists = buckets.setdefault((p.device, p.dtype), [[]])
        if sum(q.numel() for q in lists[-1]) + p.numel() > _BUCKET_ELEMENTS and lists[-1]:
            lists.append([])
        lists[-1].append(p)
    for lists in buckets.values():
        for bucket in lists:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            for p, summed in zip(bucket, flat.split([p.numel() for p in bucket])):
                if p.grad is None:
                    p.grad = summed.view_as(p).clone()
                else:
                    p.grad.copy_(summed.view_as(p))


# ---------------------------------------------------------------------------------------------------
# Attention.


def kv_repeat_factor(heads: int, kv_heads: int, world: int) -> int:
    """How many times each kv head is repeated before the all-to-all so that the kv heads split evenly
    over ``world`` ranks, each rank keeping the kv heads of its own q heads.

    Rank r gets q heads [r H/N, (r+1) H/N); q head h reads kv head h // (H / Hkv). Repeating each kv head f
    times in place (repeat_interleave) keeps that map: h // (H / (Hkv f)) // f = h // (H / Hkv). The
    smallest f with Hkv f divisible by N is N / gcd(Hkv, N), and it divides the group size H / Hkv
    whenever N divides H. Costs f times the k, v exchange; f = 1 when N divides Hkv."""
    if heads % world:
        raise ValueError(f"fastkern.parallel: {heads} attention heads do not split over {world} ranks; "
                         "sequence parallelism needs num_attention_heads divisible by the group size")
    if kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"fastkern.parallel: {heads} attention heads are not a multiple of {kv_heads} kv heads")
    return world // math.gcd(kv_heads, world)


def _one_document_per_row(batch: int, length: int, device) -> PackedDocuments:
    bounds = tuple(r * length for r in range(batch + 1))
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True)
    return PackedDocuments(batch, length, bounds, cu_seqlens, length)


class UlyssesAttention:
    """The attention function registered for one model (transformers' calling convention):
    (module, q [B, H, S, D], k, v [B, Hkv, S, D], mask, dropout, scaling, **kw) -> ([B, S, H, D], None)."""

    def __init__(self, group, world: int, rank: int, wrapped: str, heads: int, kv_heads: int):
        self.group, self.world, self.rank, self.wrapped = group, world, rank, wrapped
        self.backend = _BACKEND_FOR[wrapped]
        self.heads, self.kv_heads = heads, kv_heads
        self.kv_repeat = kv_repeat_factor(heads, kv_heads, world)
        self._documents_of_call: tuple | None = None  # (local position_ids tensor, its _version, documents)

    def documents(self, position_ids: torch.Tensor, batch: int, local_length: int) -> PackedDocuments:
        """Document boundaries of the whole sequence, from every rank's position_ids: one all-gather per
        step. All layers (and checkpoint recomputations) of a step get the same position_ids tensor from
        the backbone, so the answer is kept for that tensor, unless it was modified in place since."""
        cached = self._documents_of_call
        if cached is not None and cached[0] is position_ids and cached[1] == position_ids._version:
            return cached[2]
        if position_ids.dim() != 2 or position_ids.shape[-1] != local_length or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"fastkern.parallel: position_ids {tuple(position_ids.shape)} do not match the "
                             f"attention input [{batch}, {local_length}]")
        local = position_ids.expand(batch, local_length).contiguous()
        # Shapes first: ranks with different shard lengths would otherwise fail (or hang) in the all-to-all.
        shapes = [torch.empty(2, dtype=torch.int64, device=local.device) for _ in range(self.world)]
        dist.all_gather(shapes, torch.tensor([batch, local_length], device=local.device), group=self.group)
        if any(s.tolist() != [batch, local_length] for s in shapes):
            raise ValueError("fastkern.parallel: the ranks hold different [batch, shard length]: "
                             f"{[s.tolist() for s in shapes]}; shard with shard_sequence (equal shards)")
        pieces = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(pieces, local, group=self.group)
        full = torch.cat(pieces, dim=1)  # shards are contiguous and in rank order
        length = full.shape[1]
        documents = find_documents(batch, length, local.device, position_ids=full)
        if documents is None:
            documents = _one_document_per_row(batch, length, local.device)
        self._documents_of_call = (position_ids, position_ids._version, documents)
        return documents

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if attention_mask is not None:
            raise RuntimeError("fastkern.parallel: an attention mask reached sequence-parallel attention; a mask "
                               "over this rank's tokens cannot describe attention over the whole sequence")
        if kwargs.get("s_aux") is not None:
            raise NotImplementedError("fastkern.parallel: attention sinks (s_aux, gpt-oss) are not supported "
                                      "under sequence parallelism")
        if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
            raise ValueError("fastkern.parallel: sequence parallelism runs causal attention; this layer is "
                             "bidirectional")
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise RuntimeError("fastkern.parallel: the attention call got no position_ids (the decoder layers of "
                               f"{type(module).__name__}'s model do not pass them on)")
        batch, heads, local_length, head_dim = query.shape
        kv_heads = key.shape[1]
        if key.shape[2] != local_length:
            raise RuntimeError(f"fastkern.parallel: k holds {key.shape[2]} positions for {local_length} queries "
                               "(a KV cache?); sequence parallelism is for training forwards without a cache")
        if (heads, kv_heads) != (self.heads, self.kv_heads):
            raise RuntimeError(f"fastkern.parallel: attention got {heads} q / {kv_heads} kv heads, the model "
                               f"config says {self.heads} / {self.kv_heads}")
        documents = self.documents(position_ids, batch, local_length)
        if self.kv_repeat > 1:
            key = key.repeat_interleave(self.kv_repeat, dim=1)
            value = value.repeat_interleave(self.kv_repeat, dim=1)

        # [B, H, S, D] (a transposed view of the projection) -> [B, S, H, D] -> all-to-all over heads and
        # sequence -> [B, T, H/N, D], contiguous, token-major: the [B*T, H/N, D] layout document_attention
        # (and varlen flash attention) reads, as a view.
        def gather_sequence(t):
            t = all_to_all(t.transpose(1, 2), scatter_dim=2, gather_dim=1, group=self.group)
            return t.reshape(batch * documents.length, t.shape[2], head_dim)

        q, k, v = gather_sequence(query), gather_sequence(key), gather_sequence(value)
        out = document_attention(
            q, k, v, documents.cu_seqlens, bounds=list(documents.bounds), max_seqlen=documents.max_seqlen,
            scale=scaling, sliding_window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap"),
            dropout_p=dropout, backend=self.backend,
        )
        out = out.reshape(batch, documents.length, heads // self.world, out.shape[-1])
        # [B, T, H/N, D] -> [B, S, H, D]: what transformers' attention functions return.
        return all_to_all(out, scatter_dim=1, gather_dim=2, group=self.group), None


# ---------------------------------------------------------------------------------------------------
# Enabling it on a model.


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder backbone (builds the mask, passes position_ids to the layers), under PEFT too."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if not isinstance(decoder, nn.Module) or not hasattr(decoder, "config"):
        raise ValueError(f"fastkern.parallel: cannot find the decoder backbone of {type(model).__name__} "
                         "(expected a transformers model with get_decoder())")
    return decoder


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


class SequenceParallel:
    """What ``enable_sequence_parallel`` did to one model. ``undo()`` restores it; ``str()`` reports it."""

    def __init__(self, model: nn.Module, group, world: int, rank: int):
        self.model, self.group, self.world, self.rank = model, group, world, rank
        self.name: str | None = None  # the registered attention implementation
        self.wrapped: str | None = None
        self.attention: UlyssesAttention | None = None
        self.lines: list[str] = []
        self._configs: list = []
        self._hook = None

    @property
    def active(self) -> bool:
        return self.name is not None

    def __str__(self) -> str:
        return "\n".join([f"fastkern sequence parallel (rank {self.rank} of {self.world}):", *self.lines])

    def _check_call(self, backbone, args, kwargs):
        """Forward pre-hook of the backbone: the call must be one sequence-parallel attention can run."""
        if backbone.config._attn_implementation != self.name:
            raise RuntimeError(f"fastkern.parallel: config._attn_implementation became "
                               f"{backbone.config._attn_implementation!r} after enable_sequence_parallel set "
                               f"{self.name!r}; call undo() before changing it")
        # Everything as keywords: transformers' forward decorators fill some arguments (use_cache) from the
        # config as keywords, which would clash with the same argument passed by position.
        signature = _forward_signature(type(backbone))
        bound = signature.bind(backbone, *args, **kwargs)
        call = {}
        for name, value in list(bound.arguments.items())[1:]:
            kind = signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                raise ValueError(f"fastkern.parallel: {type(backbone).__name__}.forward takes *{name}; not supported")
            call.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
        get = call.get

        if get("position_ids") is None:
            raise ValueError("fastkern.parallel: pass position_ids (SequenceShard.model_inputs() does): without "
                             "them every rank would number its shard from 0")
        mask = get("attention_mask")
        if mask is not None:
            if mask.dim() != 2 or not bool(mask.all()):
                raise ValueError("fastkern.parallel: a padding attention_mask cannot be split over ranks; pack "
                                 "rows (position_ids restarting per document) and let shard_sequence pad the end")
            call["attention_mask"] = None
        for name in ("cache", "past_key_values"):
            cache = get(name)
            if cache is not None and (not hasattr(cache, "get_seq_length") or cache.get_seq_length() > 0):
                raise ValueError("fastkern.parallel: sequence parallelism is for training forwards; got a KV cache")
        if "use_cache" in signature.parameters:
            call["use_cache"] = False  # a cache would hold this rank's shard only
        return (), call

    def undo(self) -> None:
        """Restore the attention implementation, drop the pre-hook and the registered function."""
        if not self.active:
            return
        from transformers import AttentionInterface

        for config, previous in self._configs:
            if config._attn_implementation == self.name:
                config._attn_implementation = previous
        if self._hook is not None:
            self._hook.remove()
        AttentionInterface._global_mapping.pop(self.name, None)
        self.lines.append(f"undone: attention back to {self.wrapped!r}")
        self.name = self.attention = self._hook = None
        self._configs = []


def enable_sequence_parallel(model: nn.Module, group=None) -> SequenceParallel:
    """Make ``model``'s attention sequence-parallel over ``group`` (None: the default group); returns the
    handle (``undo()``, report in ``str()``). A group of one rank changes nothing.

    Needs num_attention_heads divisible by the group size (ValueError otherwise); kv heads fewer than (or
    not divisible by) the ranks are repeated before the all-to-all (``kv_repeat_factor``). Works before or
    after ``fastkern.patch_model``; the wrapped implementation (sdpa, eager, flash_attention_2/3) is the
    one the model has now."""
    from transformers import AttentionInterface, PretrainedConfig

    world, rank = group_size_and_rank(group)
    handle = SequenceParallel(model, group, world, rank)
    if world == 1:
        handle.lines.append("group of one rank: nothing to do")
        return handle
    decoder = _decoder(model)
    config = decoder.config
    wrapped = config._attn_implementation
    if isinstance(wrapped, str) and wrapped.startswith("fastkern_ulysses"):
        raise ValueError("fastkern.parallel: sequence parallelism is already enabled on this model")
    if wrapped not in _BACKEND_FOR:
        raise ValueError(f"fastkern.parallel: attention implementation {wrapped!r} is not one sequence "
                         f"parallelism wraps ({sorted(_BACKEND_FOR)}); set one with model.set_attn_implementation")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    attention = UlyssesAttention(group, world, rank, wrapped, heads, kv_heads)  # raises on heads % world
    name = f"fastkern_ulysses_{next(_names)}"
    AttentionInterface.register(name, attention)
    configs = {id(m.config): m.config for m in decoder.modules() if isinstance(getattr(m, "config", None), PretrainedConfig)}
    for cfg in configs.values():
        handle._configs.append((cfg, cfg._attn_implementation))
        cfg._attn_implementation = name
    handle.name, handle.wrapped, handle.attention = name, wrapped, attention
    handle._hook = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: handle._check_call(module, args, kwargs), with_kwargs=True)
    layers = sum(1 for m in decoder.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim"))
    handle.lines += [
        f"attention ({layers} layers) -> {name}: all-to-all [B, T/{world}, {heads}, D] -> [B, T, {heads // world}, D], "
        f"{wrapped} as fastkern.ops.document_attention backend {attention.backend!r}, all-to-all back",
        f"{type(decoder).__name__}: forward pre-hook requires position_ids, drops an all-ones attention_mask, "
        "refuses padding masks and KV caches, turns use_cache off",
    ]
    if attention.kv_repeat > 1:
        handle.lines.append(f"{kv_heads} kv heads repeated x{attention.kv_repeat} before the all-to-all "
                            f"({kv_heads} does not split over {world} ranks)")
    return handle
