"""Capacity planning: predicted device and host peak of one training step, and the longest sequence that fits.

:func:`plan_memory` evaluates the per-token memory model of docs/long_context.md ("Capacity planning")
term by term, from the model's shape alone (a transformers config, a model, or a size name). It is a
prediction; each term below says what it stands for so a measurement can confirm or correct it. Checked
on an H200 with offloaded checkpoints and the tiled MLP (Llama-3.1-8B QLoRA at 2, 4 and 32 layers, 131K-524K
tokens; Llama-3.2-1B LoRA at 2 and 4 layers, 1M tokens: 1-8% above the measured peak allocated, which
leaves out the CUDA context this prediction includes; docs/long_context.md "Capacity planning"); the other
shapes and options are unchecked.

Scope: decoder-only Llama-style models (Llama, Mistral, Qwen2/Qwen3 shapes: RMSNorm, rotary positions,
GQA attention, GLU MLP), bf16 activations, a FlashAttention-class attention backward, fastkern's
chunked loss, one training step with AdamW.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .offload.offloader import DEFAULT_MIN_BYTES
from .ops.linear_cross_entropy import CHUNK_BYTES_CAP
from .ops.tiled_mlp import DEFAULT_TILE_BYTES, ROW_MULTIPLE
from .patching.tiled_mlp import AUTO_BYTES

GIB = 1 << 30
# Activations and unquantized weights are bf16.
ACT_BYTES = 2
# bitsandbytes NF4 with double quantization (blocksize 64; absmax quantized to uint8 in blocks of 256):
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256
# Per-weight constants of a QuantState: the 16-entry fp32 NF4 code, the fp32 offset, the 256-entry
# fp32 code of the nested quantization.
NF4_CONSTANT_BYTES = 16 * 4 + 4 + 256 * 4
# LoRA parameters are fp32 (PEFT's default autocast_adapter_dtype); per parameter: the weight, its
# gradient and AdamW's two moments, all fp32.
LORA_BYTES_PER_PARAM = 4 + 4 + 4 + 4
# Full fine-tuning of a bf16 model: bf16 weight and gradient, fp32 AdamW moments (no fp32 master copy).
FULL_FT_STATE_BYTES_PER_PARAM = 2 + 8
# Device memory outside the activations that the model cannot see: the CUDA context (not counted by
# torch's allocator but part of the GPU's memory) and cuBLAS/cuDNN workspaces. Estimates, not measured.
CUDA_CONTEXT_BYTES = 600 << 20
WORKSPACE_BYTES = 256 << 20

# Model shapes by name (the CLI's --size): Llama-3.1-8B, Llama-3.2-1B, Qwen3-8B.
SIZES: dict[str, dict[str, Any]] = {
    "8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=False),
}

DEFAULT_OPTIONS = {"checkpointing": "offload", "tiled_mlp": "auto", "mlp": True, "loss": True}
# Without the fused loss (transformers' own: lm_head then cross_entropy on fp32 logits), bytes per [T, V]
# element at the loss's peak, in backward: the bf16 logits the output holds (2), log_softmax's saved fp32
# output (4), the fp32 gradient of the loss w.r.t. it (4) and the fp32 gradient of the logits (4) before
# it is cast to bf16.
UNFUSED_LOSS_BYTES_PER_LOGIT = 14


@dataclasses.dataclass(frozen=True)
class Shape:
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def of(cls, model_or_config) -> "Shape":
        """From a size name (``SIZES``), a transformers config, a model or a PEFT model wrapping one."""
        if isinstance(model_or_config, str):
            if model_or_config not in SIZES:
                raise ValueError(f"fastkern.plan_memory: unknown size {model_or_config!r}; known: {sorted(SIZES)}")
            cfg = dict(SIZES[model_or_config])
        else:
            config = getattr(model_or_config, "config", model_or_config)
            config = getattr(config, "get_text_config", lambda: config)()
            needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            missing = [k for k in needed if not isinstance(getattr(config, k, None), int)]
            if missing:
                raise ValueError(
                    f"fastkern.plan_memory: expected a size name {sorted(SIZES)}, a transformers config or a model "
                    f"with one; {type(model_or_config).__name__} lacks {missing}"
                )
            cfg = {k: getattr(config, k) for k in needed}
            cfg.update(model_type=getattr(config, "model_type", ""),
                       num_key_value_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                       head_dim=getattr(config, "head_dim", None),
                       tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                       attention_bias=bool(getattr(config, "attention_bias", False)),
                       mlp_bias=bool(getattr(config, "mlp_bias", False)))
        heads = cfg["num_attention_heads"]
        return cls(model_type=cfg["model_type"], hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                   layers=cfg["num_hidden_layers"], heads=heads, kv_heads=cfg["num_key_value_heads"],
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
                   tied=cfg["tie_word_embeddings"], attention_bias=cfg.get("attention_bias", False),
                   mlp_bias=cfg.get("mlp_bias", False))

    def linears(self) -> list[tuple[int, int, bool]]:
        """(in_features, out_features, has_bias) of one decoder layer's Linear modules."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        qkv_bias = self.attention_bias or self.model_type == "qwen2"  # Qwen2 has q/k/v biases, no o bias
        o_bias = self.attention_bias and self.model_type != "qwen2"
        return [(h, q, qkv_bias), (h, kv, qkv_bias), (h, kv, qkv_bias), (q, h, o_bias),
                (h, i, self.mlp_bias), (h, i, self.mlp_bias), (i, h, self.mlp_bias)]


def nf4_bytes(n: int) -> int:
    """Storage of one bitsandbytes NF4 weight of ``n`` elements with double quantization: two 4-bit codes
    per byte, one uint8 absmax per 64-element block, one fp32 absmax per 256 blocks, and the constants."""
    blocks = -(-n // NF4_BLOCK)
    return -(-n // 2) + blocks + 4 * -(-blocks // NF4_NESTED_BLOCK) + NF4_CONSTANT_BYTES


def pinned_bytes(nbytes: int) -> int:
    """Host memory one pinned buffer of ``nbytes`` costs: PyTorch's pinned allocator rounds to a power of
    two, and the offloader's pool allocates that size (fastkern/offload/pool.py)."""
    return 1 << max(nbytes - 1, 1).bit_length()


def weight_bytes(shape: Shape, qlora: bool = False) -> int:
    """Bytes of the model's parameters: bf16, or with ``qlora`` every decoder Linear weight in NF4
    (biases, norms, embedding and LM head stay bf16, as bitsandbytes and PEFT leave them)."""
    a, h = ACT_BYTES, shape.hidden
    total = shape.vocab * h * a * (1 if shape.tied else 2)  # embedding (+ LM head unless tied)
    total += h * a  # final norm
    per_layer = 2 * h * a  # input and post-attention RMSNorm
    if shape.model_type == "qwen3":
        per_layer += 2 * shape.head_dim * a  # q_norm, k_norm
    for fan_in, fan_out, bias in shape.linears():
        per_layer += nf4_bytes(fan_in * fan_out) if qlora else fan_in * fan_out * a
        per_layer += fan_out * a if bias else 0
    return total + shape.layers * per_layer


def lora_params(shape: Shape, rank: int) -> int:
    """LoRA parameters on every decoder Linear (PEFT's "all-linear"): rank x (in + out) each."""
    return shape.layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out, _ in shape.linears())


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Predicted memory of one training step (bytes). ``terms`` lists every contribution by name; the
    device peak is the sum of the fixed terms, the step-long per-token terms, the checkpoints that stay
    on the device and the larger of the two transient phases (loss, one layer's backward)."""

    seq_len: int
    batch: int
    device_peak_bytes: int
    host_peak_bytes: int
    layers_on_host: int
    layers_on_device: int
    tiled_mlp: bool
    terms: dict[str, int]
    device_bytes: int | None = None
    host_bytes: int | None = None
    max_seq_len: int | None = None  # longest seq_len (this batch) whose device peak fits device_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.device_peak_bytes <= self.device_bytes

    def __str__(self) -> str:
        g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
        lines = [f"plan_memory: batch {self.batch} x {self.seq_len} tokens (prediction, not a measurement)"]
        lines += [f"  {name:<40} {g(v)}" for name, v in self.terms.items()]
        lines.append(f"  {'device peak':<40} {g(self.device_peak_bytes)}"
                     + (f"  (budget {g(self.device_bytes).strip()}: {'fits' if self.fits else 'does not fit'})"
                        if self.device_bytes is not None else ""))
        lines.append(f"  {'host peak (offloaded checkpoints)':<40} {g(self.host_peak_bytes)}  "
                     f"({self.layers_on_host} layers on the host, {self.layers_on_device} on the device)")
        if self.max_seq_len is not None:
            lines.append(f"  longest sequence that fits: {self.max_seq_len} tokens (batch {self.batch})")
        return "\n".join(lines)


def _check_int(name: str, value, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"None or an int >= {minimum}" if optional else f"an int >= {minimum}"
        raise ValueError(f"fastkern.plan_memory: {name} must be {what}, got {value!r}")


def _options(options: dict | None) -> tuple[str | None, Any, bool, int | None, bool, int]:
    """(checkpointing: "offload" / "device" / None, tiled_mlp, fused mlp, host_bytes from the option, fused
    loss, min_bytes from the option). patch_model's "recompute" keeps the checkpoints on the device: "device"
    here."""
    merged = {**DEFAULT_OPTIONS, **(options or {})}
    unknown = set(merged) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"fastkern.plan_memory: unknown options {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}")
    ckpt, option_host, option_min = merged["checkpointing"], None, DEFAULT_MIN_BYTES
    if isinstance(ckpt, dict):
        from .patching.checkpointing import _offloader_kwargs

        kwargs = _offloader_kwargs(ckpt)  # validates like patch_model
        option_host, option_min = kwargs.get("host_bytes"), kwargs.get("min_bytes", DEFAULT_MIN_BYTES)
        ckpt = "offload"
    if ckpt == "recompute":
        ckpt = "device"
    if ckpt not in ("offload", "device", None, False):
        raise ValueError('fastkern.plan_memory: options["checkpointing"] must be "offload", "device" or "recompute" '
                         f"(inputs kept on the GPU), None (no checkpointing) or patch_model's dict form, got {ckpt!r}")
    if merged["loss"] not in (True, False, None):
        raise ValueError(f'fastkern.plan_memory: options["loss"] must be True or False, got {merged["loss"]!r}')
    tiled = merged["tiled_mlp"]
    if not (tiled in ("auto", True, False, None) or (isinstance(tiled, int) and not isinstance(tiled, bool) and tiled >= 0)):
        raise ValueError(f'fastkern.plan_memory: options["tiled_mlp"] must be "auto", True, False or an int >= 0, got {tiled!r}')
    return (ckpt or None), tiled, bool(merged["mlp"]), option_host, bool(merged["loss"]), option_min


def _tiled(tiled, tokens: int, shape: Shape) -> bool:
    """Whether the MLP call over ``tokens`` tokens runs tiled (the rule of fastkern/patching/tiled_mlp.py)."""
    if tiled == "auto":
        return tokens * shape.intermediate * ACT_BYTES > AUTO_BYTES
    if isinstance(tiled, bool) or tiled is None:
        return bool(tiled)
    return tokens > tiled


def _tiling_threshold(tiled, shape: Shape) -> int | None:
    """The largest token count that runs untiled when tiling switches on past it (None: no switch)."""
    if tiled == "auto":
        return AUTO_BYTES // (shape.intermediate * ACT_BYTES)
    if isinstance(tiled, bool) or tiled is None:
        return None
    return tiled


def _evaluate(shape: Shape, seq_len: int, batch: int, rank: int | None, qlora: bool, ckpt: str | None, tiled_opt,
              fused_mlp: bool, host_bytes: int | None, fused_loss: bool = True,
              min_bytes: int = 0) -> tuple[int, int, int, bool, dict[str, int]]:
    a, h, i, hd = ACT_BYTES, shape.hidden, shape.intermediate, shape.head_dim
    q_width, kv_width = shape.heads * hd, shape.kv_heads * hd
    t = batch * seq_len  # one padding-free row or a batch: what counts is the tokens per step
    tiled = _tiled(tiled_opt, t, shape)
    terms: dict[str, int] = {}

    # --- fixed: weights, trainable state, runtime ---
    terms["weights"] = weight_bytes(shape, qlora)
    if rank is not None:
        terms["LoRA params + grads + AdamW (fp32)"] = lora_params(shape, rank) * LORA_BYTES_PER_PARAM
    else:  # full fine-tune: every parameter trains
        terms["grads + AdamW (full fine-tune)"] = (weight_bytes(shape) // a) * FULL_FT_STATE_BYTES_PER_PARAM
    terms["CUDA context + workspaces (estimate)"] = CUDA_CONTEXT_BYTES + WORKSPACE_BYTES
    if qlora:  # the largest decoder weight dequantized to bf16 for one matmul (transient, one at a time)
        terms["NF4 dequantized weight"] = max(fi * fo for fi, fo, _ in shape.linears()) * a

    # --- per token for the whole step ---
    # cos/sin tables [T, head_dim] in bf16, and input ids, labels, position ids (int64).
    terms["positions, ids, labels"] = t * (2 * hd * a + 3 * 8)

    # --- checkpointed layer inputs: one [T, H] per layer ---
    # One layer's saved tensors when it runs with grad: attention norm out, q, k, v, attention out, residual
    # after attention, MLP norm out (bf16), two fp32 rstd rows and the fp32 log-sum-exp per head. The
    # layer's input is not counted here. With checkpoints on the device it is the checkpoint counted below;
    # offloaded, a count that included its copy back stood one T x H x a above every peak measured with the
    # offload mode's embedding hook (H200, 2026-12-06: 8B QLoRA at 2, 4 and 32 layers, 131K-524K tokens;
    # 1B LoRA at 2 and 4 layers, 1M tokens; docs/long_context.md "Capacity planning").
    layer_saved = t * ((3 * h + 2 * q_width + 2 * kv_width) * a + 2 * 4 + shape.heads * 4)
    if not tiled:  # the untiled MLP also saves gate, up and the GLU output ([T, I] each)
        layer_saved += t * 3 * i * a
    checkpoint = t * h * a
    layers_on_host = 0
    if ckpt == "offload" and checkpoint < min_bytes:
        ckpt = "device"  # the offloader keeps saved tensors below min_bytes on the device
    if ckpt == "offload":
        per_layer_host = pinned_bytes(checkpoint)
        layers_on_host = shape.layers if host_bytes is None else min(shape.layers, host_bytes // per_layer_host)
        terms["checkpoints on device"] = (shape.layers - layers_on_host) * checkpoint
    elif ckpt == "device":
        terms["checkpoints on device"] = shape.layers * checkpoint
    else:  # no checkpointing: every layer keeps its saved tensors until its backward
        terms["saved activations (no checkpointing)"] = (shape.layers - 1) * layer_saved
    host = layers_on_host * pinned_bytes(checkpoint) if ckpt == "offload" else 0

    # --- transient phase 1: the loss (end of forward) ---
    # Final hidden state and its norm (bf16), the gradient w.r.t. the hidden state (bf16, written per chunk),
    # and one logits chunk with its gradient (fastkern's fused linear cross-entropy caps a chunk at 512 MiB).
    chunk = min(CHUNK_BYTES_CAP, t * shape.vocab * a)
    loss_phase = t * 3 * h * a + (2 * chunk if fused_loss else t * shape.vocab * UNFUSED_LOSS_BYTES_PER_LOGIT)

    # --- transient phase 2: one layer's recompute and backward ---
    residual_grad = t * h * a  # gradient of the residual stream flowing down the layers
    attn_bwd = t * (2 * q_width * a  # d(out), dq
                    + 2 * kv_width * a  # dk, dv
                    + q_width * 4  # FA2-class fp32 dq accumulator
                    + (2 * q_width * a if shape.kv_heads < shape.heads else 0))  # GQA-expanded dk, dv
    if tiled:
        # Tiled MLP: its output and the input gradient per token, plus a fixed tile transient of
        # [rows, I] tensors (4 with fastkern's fused GLU, 6 with transformers' MLP), rows bounded from above
        # (tile_rows balances tiles; the bound keeps the prediction monotone in T).
        max_rows = max(1, DEFAULT_TILE_BYTES // (i * a))
        rows = min(t, -(-max_rows // ROW_MULTIPLE) * ROW_MULTIPLE)
        mlp_bwd = t * 2 * h * a + (4 if fused_mlp else 6) * rows * i * a
    else:  # untiled: d(GLU out), d(gate), d(up) over the saved gate/up/GLU out
        mlp_bwd = t * 3 * i * a
    layer_phase = residual_grad + layer_saved + max(attn_bwd, mlp_bwd)
    terms["peak transient (max of loss, layer bwd)"] = max(loss_phase, layer_phase)
    device = sum(terms.values())
    return device, host, layers_on_host, tiled, terms


def plan_memory(model_or_config, seq_len: int, *, batch: int = 1, lora_rank: int | None = None, qlora: bool = False,
                options: dict | None = None, device_bytes: int | None = None,
                host_bytes: int | None = None) -> MemoryPlan:
    """Predict the device and host peak of one training step, and the longest sequence that fits.

    Args:
        model_or_config: a size name ("8b", "1b", "qwen3-8b"), a transformers config, or a model
            (PEFT-wrapped too) whose ``config`` gives the shape.
        seq_len: tokens per sequence; ``batch`` sequences per step (padding-free: batch x seq_len tokens).
        lora_rank: LoRA rank on every decoder Linear; None means a full fine-tune (not with ``qlora``).
        qlora: decoder Linear weights in bitsandbytes NF4 with double quantization.
        options: patch_model options that change memory: ``checkpointing`` ("offload" (default), its dict
            form, "device" or "recompute" for checkpoints kept on the GPU, None for no checkpointing),
            ``tiled_mlp`` ("auto" (default), True, False, an int), ``mlp`` (fused GLU, default True) and
            ``loss`` (fused chunked loss, default True; False: transformers' loss over materialized
            fp32 [T, V] logits, as an unpatched model computes it).
        device_bytes: device budget; the plan then says whether it fits and the longest seq_len that does.
        host_bytes: the offloaded checkpoints' host budget (``checkpointing={"offload": True, "host_bytes":
            N}``); checkpoints past it stay on the device. None: host memory unconstrained.

    A prediction from docs/long_context.md's memory model. Checked on an H200 for the Llama-3.1-8B
    QLoRA step (2 to 32 layers, 131K-524K tokens) and the 1B LoRA step (1M tokens) with offloaded
    checkpoints and the tiled MLP: 1-8% above the measured peaks; unchecked for other shapes and options.
    """
    shape = Shape.of(model_or_config)
    _check_int("seq_len", seq_len, 1)
    _check_int("batch", batch, 1)
    _check_int("lora_rank", lora_rank, 1, optional=True)
    _check_int("device_bytes", device_bytes, 0, optional=True)
    _check_int("host_bytes", host_bytes, 0, optional=True)
    if qlora and lora_rank is None:
        raise ValueError("fastkern.plan_memory: qlora=True trains LoRA adapters on the NF4 weights; pass lora_rank")
    ckpt, tiled_opt, fused, option_host, fused_loss, min_bytes = _options(options)
    if host_bytes is None:
        host_bytes = option_host

    def evaluate(length: int):
        return _evaluate(shape, length, batch, lora_rank, qlora, ckpt, tiled_opt, fused, host_bytes, fused_loss,
                         min_bytes)

    device, host, on_host, tiled, terms = evaluate(seq_len)
    longest = None
    if device_bytes is not None:
        # The prediction drops where the MLP starts tiling and where offloading starts (the layer inputs
        # reach min_bytes): the last token counts before each switch.
        switches = [_tiling_threshold(tiled_opt, shape)]
        if ckpt == "offload" and min_bytes > 0:
            switches.append((min_bytes - 1) // (shape.hidden * ACT_BYTES))
        longest = _longest(lambda n: evaluate(n)[0] <= device_bytes, switches, batch)
    return MemoryPlan(seq_len=seq_len, batch=batch, device_peak_bytes=device, host_peak_bytes=host,
                      layers_on_host=on_host, layers_on_device=shape.layers - on_host if ckpt == "offload" else
                      (shape.layers if ckpt == "device" else 0), tiled_mlp=tiled, terms=terms,
                      device_bytes=device_bytes, host_bytes=host_bytes, max_seq_len=longest)


# Past this many tokens per sequence the search stops (2^31: beyond any single-GPU step).
SEARCH_LIMIT = 1 << 31


def _longest(fits, threshold_tokens: list[int | None], batch: int) -> int:
    """Largest seq_len in [1, SEARCH_LIMIT] with ``fits``, 0 if none. ``fits`` is monotone (true then false)
    between the switches where the prediction drops (the tiled-MLP switch: the MLP stops holding [T, I]
    tensors; the offload switch: the checkpoints leave the device), so each piece is searched on its own and
    the longest answer is kept. ``threshold_tokens``: the last token count before each switch (None: none)."""
    # the last seq_len whose batch x seq_len tokens are before each switch
    cuts = sorted({t // batch for t in threshold_tokens if t is not None and 1 <= t // batch < SEARCH_LIMIT})
    starts = [1] + [c + 1 for c in cuts]
    pieces = list(zip(starts, cuts + [SEARCH_LIMIT]))
    best = 0
    for lo, hi in pieces:
        if lo > hi or not fits(lo):
            continue
        good, step = lo, 1  # gallop up from lo, then bisect between the last fit and the first miss
        while good + step <= hi and fits(good + step):
            good, step = good + step, step * 2
        bad = min(good + step, hi + 1)
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if fits(mid) else (good, mid)
        best = max(best, good)
    return best
