"""patch_model(packing=True): a packed batch gives what each document gives alone; no [T, T] mask; other
batches unchanged; per instance; reversible; TRL padding_free training matches padded training."""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastkern
from fastkern.patching import packing as packing_module
from fastkern.patching.core import fastkern_forward_kind
from tests.models import EAGER_ONLY, FAMILIES, cache_kwargs, families_with, output_cache, tiny_model
from tests.oracle import assert_same_fp32_run

# The other options off: these tests compare logits of training-mode calls (the loss option skips them there)
# and some compare bit for bit with transformers' own path; they are about packing alone.
PACKING_ONLY = dict(mlp=False, loss=False, norm=False)
LENGTHS = [5, 1, 9, 3, 1, 6]  # includes length-1 documents; longer than the sliding windows below
# The first seven families under sdpa and eager; the families added after them under sdpa only (eager where
# sdpa does not apply): the packed eager path is family-independent and the interpreter makes each case cost.
_FIRST = FAMILIES[:7]
CASES = [(f, a) for f in families_with("packing") for a in ("sdpa", "eager")
         if not (f in EAGER_ONLY and a == "sdpa") and (f in _FIRST or f in EAGER_ONLY or a == "sdpa")]


def make(family, attn, **overrides):
    model = tiny_model(family, **overrides)
    model.config._attn_implementation = attn
    return model.train()  # dropout is 0 in these configs; train mode is the training branch


def documents(lengths=LENGTHS, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 131, (1, n), generator=g) for n in lengths]


def packed_inputs(docs):
    ids = torch.cat(docs, dim=1)
    position_ids = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    labels = ids.clone()
    labels[position_ids == 0] = -100  # as TRL's padding-free collator: no target across a boundary
    return ids, position_ids, labels


def weighted_loss(out, count, total):
    return out.loss * (count / total)


def run_alone(model, docs, use_cache):
    """Per-token logits of each document run alone, and grads of the token-weighted mean loss."""
    model.zero_grad(set_to_none=True)
    total = sum(d.shape[1] - 1 for d in docs)
    logits, loss = [], 0.0
    for d in docs:
        out = model(input_ids=d, labels=d if d.shape[1] > 1 else None, use_cache=use_cache)
        logits.append(out.logits.detach())
        if d.shape[1] > 1:
            loss = loss + weighted_loss(out, d.shape[1] - 1, total)
    loss.backward()
    return torch.cat(logits, dim=1), loss.detach(), grads_of(model)


def run_packed(model, docs, use_cache, **extra):
    model.zero_grad(set_to_none=True)
    ids, position_ids, labels = packed_inputs(docs)
    out = model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=use_cache, **extra)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), grads_of(model)


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, want, grad_tol=1e-4):
    assert_same_fp32_run(got, want, loss_rtol=1e-5, grad_rtol=grad_tol)


def decode_last(model, ids):
    """{cache keyword: logits of the last token of ids decoded against a cache of the others}, for each name
    the installed transformers takes the cache under (`cache` from 5.25 on, `past_key_values`)."""
    logits = {}
    for name in cache_kwargs():
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        logits[name] = model(input_ids=ids[:, -1:], use_cache=True, **{name: output_cache(prefix)}).logits
    return logits


# The deprecated name is still tested where transformers (5.25+) warns about it.
DEPRECATED_CACHE_NAME = "ignore:`past_key_values` is deprecated:FutureWarning"


@pytest.mark.parametrize("use_cache", [False, True], ids=["nocache", "cache"])
@pytest.mark.parametrize("family,attn", CASES)
def test_packed_batch_equals_documents_alone(family, attn, use_cache):
    model = make(family, attn)
    docs = documents()
    want = run_alone(model, docs, use_cache)
    report = fastkern.patch_model(model, **PACKING_ONLY)
    assert report.patched_names("packing") == ["model"] and not report.skipped and not report.problems, report
    assert model.config._attn_implementation == attn  # what the user set, read by transformers and by us
    assert_same(run_packed(model, docs, use_cache), want)
    if use_cache:
        # The bug fixed here: unpatched transformers lets documents see each other when the cache is on.
        fastkern.unpatch_model(model)
        plain_logits = run_packed(model, docs, use_cache)[0]
        assert (plain_logits - want[0]).abs().max() > 1e-2


WINDOWED = [
    ("mistral", dict(sliding_window=3)),
    ("qwen2", dict(sliding_window=3, use_sliding_window=True, max_window_layers=0)),
    ("gemma2", dict(sliding_window=3)),
    ("gemma3", dict(sliding_window=3)),
    # sliding layer 0, full layer 1: the window reaches the attention function in layer 0 only (sliding_window_if)
    ("exaone4", dict(sliding_window=3)),
]


@pytest.mark.parametrize("use_cache", [False, True], ids=["nocache", "cache"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family,overrides", WINDOWED, ids=[w[0] for w in WINDOWED])
def test_sliding_window_shorter_than_documents(family, overrides, attn, use_cache):
    if family == "gemma2" and attn == "sdpa":
        pytest.skip("transformers' sdpa refuses Gemma2's logit softcap, patched or not")
    model = make(family, attn, **overrides)
    docs = documents()
    want = run_alone(model, docs, use_cache=use_cache)
    fastkern.patch_model(model, **PACKING_ONLY)
    assert_same(run_packed(model, docs, use_cache=use_cache), want)


def test_trl_kwargs_cu_seq_lens_and_batch_of_two_rows():
    model = make("qwen3", "sdpa")
    docs = documents()
    want = run_alone(model, docs, use_cache=False)
    fastkern.patch_model(model, **PACKING_ONLY)
    ids, position_ids, _ = packed_inputs(docs)
    starts = (position_ids[0] == 0).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([ids.shape[1]])]).to(torch.int32)
    seq_idx = torch.repeat_interleave(torch.arange(len(docs), dtype=torch.int32), cu.diff())[None]
    trl_kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(cu.diff().max()),
                      max_length_k=int(cu.diff().max()), seq_idx=seq_idx)
    assert_same(run_packed(model, docs, use_cache=False, **trl_kwargs), want)
    # Two rows of three documents each: every row is packed on its own.
    with torch.no_grad():
        rows = [packed_inputs(docs[:3]), packed_inputs(docs[3:])]
        width = max(r[0].shape[1] for r in rows)
        pad = [width - r[0].shape[1] for r in rows]
        # Pad each row with one extra "document" of filler tokens (positions restart), as TRL pads.
        ids2 = torch.cat([torch.cat([r[0], torch.full((1, p), 7)], 1) for r, p in zip(rows, pad)])
        pos2 = torch.cat([torch.cat([r[1], torch.arange(p)[None]], 1) for r, p in zip(rows, pad)])
        got = model(input_ids=ids2, position_ids=pos2).logits
        for row, (r, p) in enumerate(zip(rows, pad)):
            alone = torch.cat([model(input_ids=d).logits for d in (docs[:3] if row == 0 else docs[3:])], 1)
            torch.testing.assert_close(got[row, : width - p], alone[0], rtol=1e-5, atol=1e-5)
    bad = torch.tensor([0, 3, 2, ids.shape[1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q must rise from 0"):
        model(input_ids=ids, position_ids=position_ids, cu_seq_lens_q=bad)


class LargeTensorRecorder(TorchDispatchMode):
    """Records every op output whose two trailing dims are both `size` (a [.., T, T] mask or score matrix)."""

    def __init__(self, size):
        super().__init__()
        self.size, self.seen = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-2:] == (self.size, self.size):
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("use_cache", [False, True], ids=["nocache", "cache"])
@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("gemma3", "sdpa"), ("gemma2", "eager")])
def test_no_dense_mask_on_the_packed_path(family, attn, use_cache, monkeypatch):
    model = make(family, attn, **({"sliding_window": 4} if family.startswith("gemma") else {}))
    docs = documents()
    ids, position_ids, labels = packed_inputs(docs)
    total = ids.shape[1]  # 25; the longest document has 9 tokens

    def forward_backward():
        recorder = LargeTensorRecorder(total)
        with recorder:
            model(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=use_cache).loss.backward()
        return recorder.seen

    # The recorder does see transformers' own [B, 1, T, T] mask (and eager's [B, H, T, T] scores) ...
    unpatched = forward_backward()
    if attn == "eager" or not use_cache or family == "gemma3":
        assert unpatched, "the recorder missed the dense mask of the unpatched model"
    # (sdpa with the cache on and no window builds no mask at all: it lets documents see each other.)
    fastkern.patch_model(model, **PACKING_ONLY)
    # ... and nothing of that size once patched, in forward or backward; the mask builders are not called.
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    calls = []
    for name in ("sdpa", "eager"):
        original = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[name]
        monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name,
                            lambda *a, _f=original, **k: calls.append(k.get("q_length")) or _f(*a, **k))
    assert forward_backward() == []
    assert calls == []
    # A normal batch still goes through transformers' mask builder (the spy works).
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert calls


@pytest.mark.filterwarnings(DEPRECATED_CACHE_NAME)
@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("mistral", "eager"), ("gemma2", "eager"), ("qwen3", "sdpa")])
def test_padded_and_unpacked_batches_unchanged(family, attn):
    model = make(family, attn, **({"sliding_window": 4} if family in ("mistral", "gemma2") else {}))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 131, (3, 10), generator=g)
    left = torch.ones_like(ids)
    left[0, :4] = 0
    left[2, :1] = 0
    right = torch.ones_like(ids)
    right[1, 6:] = 0
    calls = [dict(attention_mask=left), dict(attention_mask=right), dict(), dict(position_ids=torch.arange(10)[None]),
             dict(use_cache=True)]
    with torch.no_grad():
        want = [model(input_ids=ids, **kw).logits for kw in calls]
        fastkern.patch_model(model, **PACKING_ONLY)
        got = [model(input_ids=ids, **kw).logits for kw in calls]
        # Decoding one token against a cache (generation) is unchanged too.
        got_next = decode_last(model, ids)
        fastkern.unpatch_model(model)
        want_next = decode_last(model, ids)
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=0, atol=0)
    for name in cache_kwargs():
        torch.testing.assert_close(got_next[name], want_next[name], rtol=0, atol=0, msg=lambda m: f"{name}=: {m}")


@pytest.mark.filterwarnings(DEPRECATED_CACHE_NAME)
@pytest.mark.parametrize("name", cache_kwargs())
def test_chunk_continuing_a_cache_is_not_a_packed_batch(name, monkeypatch):
    """A chunk run against a non-empty cache is one sequence per row even where its position_ids do not step
    by 1 (transformers detects packing only without a cache): transformers' path, under either cache name."""
    looked = []
    monkeypatch.setattr(packing_module, "find_documents",
                        lambda *a, _f=packing_module.find_documents, **k: looked.append(1) or _f(*a, **k))
    model = make("llama", "sdpa")
    ids = torch.randint(3, 131, (1, 10), generator=torch.Generator().manual_seed(7))
    position_ids = torch.tensor([[6, 7, 0, 1]])

    def chunk():
        with torch.no_grad():
            prefix = model.model(input_ids=ids[:, :6], use_cache=True)
            return model.model(input_ids=ids[:, 6:], position_ids=position_ids, use_cache=True,
                               **{name: output_cache(prefix)}).last_hidden_state

    want = chunk()
    fastkern.patch_model(model, **PACKING_ONLY, rope=False)
    got = chunk()
    assert len(looked) == 1, "the chunk after the cache was searched for documents: the cache went unseen"
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_with_rope_patch_and_gradient_checkpointing():
    model = make("qwen3", "sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    docs = documents()
    want = run_alone(model, docs, use_cache=False)
    report = fastkern.patch_model(model, **PACKING_ONLY, rope=True)
    assert len(report.patched_names("rope")) == 2 and report.patched_names("packing") == ["model"], report
    assert_same(run_packed(model, docs, use_cache=False), want)


def test_unpatch_restores_and_other_instances_untouched():
    a, b = make("llama", "eager"), make("llama", "eager")
    report = fastkern.patch_model(a, **PACKING_ONLY)
    assert fastkern_forward_kind(a.model) == "packing"
    assert a.config._attn_implementation == b.config._attn_implementation == "eager"
    assert fastkern_forward_kind(b.model) is None
    again = fastkern.patch_model(a, **PACKING_ONLY)
    assert not again.patched_names("packing") and {e.detail for e in again.skipped} == {"already patched"}
    restored = fastkern.unpatch_model(a)
    assert "model: original forward restored" in str(restored).replace("packing ", ""), restored
    assert a.config._attn_implementation == "eager" and "forward" not in a.model.__dict__
    # The unpatched model is back to transformers' behaviour: a packed batch builds its mask again.
    ids, position_ids, _ = packed_inputs(documents())
    recorder = LargeTensorRecorder(ids.shape[1])
    with recorder, torch.no_grad():
        a(input_ids=ids, position_ids=position_ids, use_cache=False)
    assert recorder.seen
    # report text and options
    assert report.options["packing"] is True
    with pytest.raises(ValueError, match="packing must be True or False"):
        fastkern.patch_model(make("llama", "sdpa"), packing="yes")


def test_flash_attention_is_left_alone():
    model = make("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"  # not installed here: only the report is checked
    report = fastkern.patch_model(model, **PACKING_ONLY)
    assert not report.patched_names("packing")
    assert "already runs packed batches varlen" in next(e for e in report.skipped if e.kind == "packing").detail
    assert model.config._attn_implementation == "flash_attention_2" and "forward" not in model.model.__dict__


def test_missing_boundaries_fail_loudly():
    """If transformers stopped passing keyword arguments to attention, the packed path must not run silently."""
    model = make("llama", "eager")
    fastkern.patch_model(model, **PACKING_ONLY)
    ids, position_ids, _ = packed_inputs(documents())

    def drop_documents(self, *args, **kwargs):
        # The mask is skipped for a packed batch, but the boundaries never reach attention.
        documents = packing_module.find_documents(1, ids.shape[1], "cpu", position_ids)
        kwargs["attention_mask"] = packing_module.packed_mask(documents, "cpu")
        return type(self).forward(self, *args, **kwargs)

    model.model.forward = drop_documents.__get__(model.model)
    with pytest.raises(RuntimeError, match="did not receive the document boundaries"):
        model(input_ids=ids, position_ids=position_ids)
    # An attention that is not fastkern's (unpatched) fails on the empty mask's shape instead of mixing documents.
    fastkern.unpatch_model(model)
    model.model.forward = drop_documents.__get__(model.model)
    with pytest.raises(RuntimeError):
        model(input_ids=ids, position_ids=position_ids)


@pytest.mark.slow
def test_trl_sft_padding_free_matches_padded_training(monkeypatch):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fastkern.demo import DIGITS, build_tokenizer

    tokenizer = build_tokenizer()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(DIGITS) for _ in range(rng.randint(1, 14))) for _ in range(16)]
    dataset = Dataset.from_dict({"text": texts})

    def train(padding_free, patch):
        model = tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)
        if patch:
            fastkern.patch_model(model)
        import tempfile

        with tempfile.TemporaryDirectory() as out_dir:
            args = SFTConfig(
                output_dir=out_dir, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                max_length=None, padding_free=padding_free, bf16=False, use_cpu=True, seed=0, data_seed=0,
                dataloader_num_workers=0, disable_tqdm=True,
            )
            trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
            trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    padded = train(padding_free=False, patch=False)
    runs = []
    spy = packing_module.document_attention

    def counting(*args, **kwargs):
        runs.append(kwargs["bounds"])
        return spy(*args, **kwargs)

    monkeypatch.setattr(packing_module, "document_attention", counting)
    packed = train(padding_free=True, patch=True)
    assert runs and all(len(b) > 2 for b in runs)  # the packed path ran (several documents per row)
    assert len(padded) == len(packed) == 3
    assert packed == pytest.approx(padded, rel=1e-4), (packed, padded)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_phi3_fused_qkv_partial_rotary_and_window(attn):
    model = tiny_model("phi3", attn=attn).train()
    model.config.sliding_window = 3
    docs = documents()
    want = run_alone(model, docs, use_cache=True)
    report = fastkern.patch_model(model, **PACKING_ONLY, rope=True)
    assert report.patched_names("packing") == ["model"], report
    assert_same(run_packed(model, docs, use_cache=True), want)
