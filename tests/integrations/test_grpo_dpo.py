"""TRL 1.16 GRPO and DPO with fastkern patched in train exactly like plain TRL, and their log-probs
come from fastkern.

Two kinds of checks:
- model level: TRL's fused head (``add_fused_lm_head``) on a patched tiny model of every family returns
  ``log_softmax(logits / T)`` gathered at the labels, and the entropy of that distribution, with
  gradients, against a float64 run of the unpatched model (tests/oracle.py, model-level criterion);
- trainer level: a few GRPOTrainer / DPOTrainer steps on a patched model (patch_model's defaults)
  train as accurately as on an unpatched copy, judged against the same steps in float64
  (tests/oracle.py, ``assert_within_reference_rule``: the patched run's deviation from the float64 run,
  for each logged metric over the steps and for the parameter updates, is at most 1.05x the unpatched
  run's plus a small floor). The runs are seeded identically; a generation only diverges if a sampling
  draw lands within float noise of a boundary, which the comparison of completion tokens would report.
  The optimizer is SGD so that parameter updates are proportional to the gradients (Adam's
  normalisation turns float noise in near-zero gradients into lr-sized steps).

Each trainer configuration runs once per module (cached) and several tests read its results. The
"routed" tests count calls into TRL's own ChunkedLogProbFunction: with every model patched there must
be none, i.e. fastkern computed every policy, old-policy and reference log-prob.
"""

import copy
import functools
import importlib.util
import math
import tempfile
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

import fastkern  # noqa: E402
from tests.models import FLOAT64_FAMILIES, tiny_model  # noqa: E402
from tests.oracle import RULE_FLOOR, assert_close, assert_within_reference_rule, rel_err  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PATCH = {}  # patch_model's defaults (the fused loss/log-probs, lora, norm, mlp, rope, packing)


def _example(name):
    spec = importlib.util.spec_from_file_location(f"fastkern_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TRLKernelCalls:
    """Counts calls into TRL's own chunked log-prob function (wherever the trainer reaches it from)."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        from trl.kernels import ChunkedLogProbFunction as cls

        # `apply` is inherited from torch.autograd.Function: shadow it on the class, delete on exit.
        self.cls, self.had_own = cls, "apply" in cls.__dict__
        self.original = cls.__dict__.get("apply")
        bound = cls.apply

        def counting_apply(*args):
            self.count += 1
            return bound(*args)

        cls.apply = staticmethod(counting_apply)
        return self

    def __exit__(self, *exc):
        if self.had_own:
            self.cls.apply = self.original
        else:
            del self.cls.apply


# ---------------------------------------------------------------------------------------------------
# Model level: per-token log-probs and entropy of the patched model, every family


def _reference_logprobs(model, ids, labels, temperature):
    """float64 log_softmax(logits / T) at the next-token labels, and the entropy, from the HF forward."""
    logits = model(ids).logits[:, :-1] / temperature
    logp_all = torch.log_softmax(logits, -1)
    targets = labels[:, 1:]
    mask = targets != -100
    logp = logp_all.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
    entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
    return logp, entropy


# TRL 1.16's fused head runs `model.base_model` as the backbone; Llama4ForCausalLM's base_model_prefix
# ("language_model") names no attribute of it, so base_model is the whole model and TRL's forward fails
# on it, patched or not (AttributeError: no last_hidden_state).
TRL_FUSED_HEAD_FAMILIES = [f for f in FLOAT64_FAMILIES if f != "llama4"]


@pytest.mark.parametrize("family", TRL_FUSED_HEAD_FAMILIES)
def test_fused_head_logprobs_match_log_softmax(family):
    from trl.trainer.utils import add_fused_lm_head

    temperature = 0.7
    base = tiny_model(family).train()  # dropout is 0 in these configs; train() as under a trainer
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 13), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt positions, as GRPO and DPO mask them
    labels[1, -2:] = -100  # right padding
    w_lp, w_ent = torch.randn(2, 12, generator=g), torch.randn(2, 12, generator=g)

    oracle_model = copy.deepcopy(base).double()
    lp64, ent64 = _reference_logprobs(oracle_model, ids, labels, temperature)
    ((lp64 * w_lp.double()).sum() + (ent64 * w_ent.double()).sum()).backward()

    plain = copy.deepcopy(base)
    lp32, ent32 = _reference_logprobs(plain, ids, labels, temperature)
    ((lp32 * w_lp).sum() + (ent32 * w_ent).sum()).backward()

    patched = copy.deepcopy(base)
    fastkern.patch_model(patched, **PATCH)
    add_fused_lm_head(patched, temperature=temperature, outputs=("log_probs", "entropy"))
    with TRLKernelCalls() as calls:
        out = patched(ids, labels=labels, fused_lm_head=True)
    ((out.log_probs * w_lp).sum() + (out.entropy * w_ent).sum()).backward()
    fastkern.unpatch_model(patched)

    assert calls.count == 0, "TRL's own ChunkedLogProbFunction ran: fastkern did not compute these log-probs"
    assert_close(out.log_probs, lp64, torch.float32, lp32, name=f"{family} log_probs", model_level=True)
    assert_close(out.entropy, ent64, torch.float32, ent32, name=f"{family} entropy", model_level=True)
    # Parameter gradients: a model-level result, and some are ill-conditioned (qwen3_5's Gated DeltaNet
    # decay parameters A_log and dt_bias amplify rounding in the hidden-state gradient; over seeds 3-8 the
    # unpatched fp32 log_softmax path deviates 2.8e-6 to 2.3e-5 from float64 on them, TRL's own fused head
    # 2.6e-6 to 1.5e-5, with no order between the two). So PyTorch's own error is taken as the larger of the
    # two unpatched fp32 computations of the same quantity, plus the model-level floor of the accuracy rule.
    trl_plain = copy.deepcopy(base)
    add_fused_lm_head(trl_plain, temperature=temperature, outputs=("log_probs", "entropy"))
    out_trl = trl_plain(ids, labels=labels, fused_lm_head=True)
    ((out_trl.log_probs * w_lp).sum() + (out_trl.entropy * w_ent).sum()).backward()
    params64 = dict(oracle_model.named_parameters())
    unpatched = (dict(plain.named_parameters()), dict(trl_plain.named_parameters()))
    for name, p in patched.named_parameters():
        oracle_grad = params64[name].grad
        baseline = max((run[name].grad for run in unpatched), key=lambda g: rel_err(g, oracle_grad))
        assert_close(p.grad, oracle_grad, torch.float32, baseline, name=f"{family} grad {name}", model_level=True,
                     floor=RULE_FLOOR[torch.float32])


# ---------------------------------------------------------------------------------------------------
# Trainer level


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)  # the same adapter init in every run, whatever drew random numbers before
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                                            init_lora_weights=False))


@functools.lru_cache(maxsize=None)
def grpo_run(patch, lora, loss_type, beta, num_iterations, level, steps=2, dtype=torch.float32):
    from trl import GRPOConfig, GRPOTrainer

    ex = _example("grpo")
    tokenizer = ex.build_tokenizer()
    dataset = ex.build_dataset(8, seed=1)
    model = tiny_model("llama", seed=0, dtype=dtype).train()
    if lora:
        model = _lora(model)
    if patch:
        fastkern.patch_model(model, **PATCH)
    before = _trainable(model)
    sampled = []

    def even_token_reward(prompts, completions, completion_ids, **kw):
        """Fraction of even token ids: dense signal from an untrained model over the whole vocabulary."""
        sampled.extend(tuple(c) for c in completion_ids)
        return [sum(t % 2 == 0 for t in c) / max(len(c), 1) for c in completion_ids]

    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, max_steps=steps, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
            per_device_train_batch_size=4, num_generations=4, max_completion_length=6, temperature=0.9,
            beta=beta, loss_type=loss_type, num_iterations=num_iterations, importance_sampling_level=level,
            entropy_coef=0.01 if lora else 0.0, logging_steps=1, save_strategy="no", report_to="none", seed=0,
            data_seed=0, use_cpu=True, bf16=False, gradient_checkpointing=False, disable_tqdm=True,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=even_token_reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
        with TRLKernelCalls() as calls:
            trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    after = _trainable(model)
    if patch:
        fastkern.unpatch_model(model)
    return dict(logs=logs, updates={n: after[n] - before[n] for n in before}, completions=sampled,
                trl_calls=calls.count)


def _nf4_model(family, dtype=torch.float32):
    """A tiny model loaded back in bitsandbytes NF4 (double quant), as QLoRA users load checkpoints. With
    dtype float64: the high-precision reference of that model, its NF4 weights dequantized into plain
    float64 Linear layers (the quantization is part of the model, not an error of the run)."""
    if dtype == torch.float64:
        from tests.bnb_reference import bnb_dequantize_4bit

        model = _nf4_model(family)
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child).__name__ == "Linear4bit":
                    dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                    dense.weight.data = bnb_dequantize_4bit(child.weight.data, child.weight.quant_state).double()
                    dense.weight.requires_grad_(False)
                    if child.bias is not None:
                        dense.bias.data = child.bias.data.double()
                    setattr(module, name, dense)
        return model.double()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        tiny_model(family, seed=0).save_pretrained(d)
        return AutoModelForCausalLM.from_pretrained(d, quantization_config=quant, dtype=torch.float32,
                                                    device_map={"": "cpu"})


@functools.lru_cache(maxsize=None)
def dpo_run(patch, lora, steps=3, dtype=torch.float32):
    """lora: False (full fine-tuning, separate reference model), True, or "qlora" (NF4 base)."""
    from trl import DPOConfig, DPOTrainer

    ex = _example("dpo")
    tokenizer = ex.build_tokenizer()
    dataset = ex.build_dataset(steps * 2, seed=1)
    model = (_nf4_model("qwen3", dtype) if lora == "qlora" else tiny_model("qwen3", seed=0, dtype=dtype)).train()
    ref_model = None
    if lora:
        model = _lora(model)  # reference: the same model under disable_adapter()
    else:
        ref_model = tiny_model("qwen3", seed=0, dtype=dtype).eval()
        if patch:
            fastkern.patch_model(ref_model, **PATCH)
    if patch:
        fastkern.patch_model(model, **PATCH)
    with tempfile.TemporaryDirectory() as out_dir:
        args = DPOConfig(
            output_dir=out_dir, max_steps=steps, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
            per_device_train_batch_size=2, beta=0.1, loss_type=["sigmoid"], max_length=32, logging_steps=1,
            save_strategy="no", report_to="none", seed=0, data_seed=0, use_cpu=True, bf16=False,
            gradient_checkpointing=False, disable_tqdm=True,
        )
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
        if lora == "qlora":
            # TRL casts QLoRA adapters to bf16; PEFT then computes the adapter path in bf16 (3e-3 relative
            # error vs float64 per layer) while fastkern keeps fp32 (2e-7), so the two runs would differ at bf16
            # level. Back to fp32 (before the optimizer exists) to compare the NF4 + LoRA path at fp32 precision.
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.to(dtype)
        before = _trainable(model)
        with TRLKernelCalls() as calls:
            trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    after = _trainable(model)
    if patch:
        fastkern.unpatch_model(model)
        if ref_model is not None:
            fastkern.unpatch_model(ref_model)
    return dict(logs=logs, updates={n: after[n] - before[n] for n in before}, trl_calls=calls.count)


def _assert_trains_as_accurately(plain, patched, reference, keys):
    """Patched vs unpatched fp32 training, each judged by its deviation from the float64 run."""
    assert len(plain["logs"]) == len(patched["logs"]) == len(reference["logs"]) > 0
    runs = (reference, plain, patched)
    metrics = [{} for _ in runs]
    for step, rows in enumerate(zip(*(r["logs"] for r in runs)), 1):
        present = set(keys) & set(rows[0])
        assert all(present == set(keys) & set(row) for row in rows)  # e.g. rewards on generation steps only
        for key in present:
            assert math.isfinite(rows[2][key]), (step, key, rows[2][key])
            for m, row in zip(metrics, rows):
                m.setdefault(key, []).append(row[key])
    vectors = [{k: torch.tensor(v, dtype=torch.float64) for k, v in m.items()} for m in metrics]
    # Metrics that are exactly 0 in the reference at every step (DPO rewards at step 1 of a 1-step run):
    # nothing to compare relatively; they must be 0 up to the floor in both runs.
    for key in [k for k, v in vectors[0].items() if v.norm() == 0]:
        for v in vectors[1:]:
            assert v.pop(key).abs().max() <= 1e-6, key
        vectors[0].pop(key)
    for v, run in zip(vectors, runs):
        v["updates"] = torch.cat([run["updates"][n].double().flatten() for n in reference["updates"]])
    assert vectors[0]["updates"].norm() > 0, "training did not change the parameters: the comparison would be empty"
    assert_within_reference_rule(vectors[2], vectors[1], vectors[0], torch.float32)


GRPO_CASES = {
    # (lora, loss_type, beta, num_iterations, importance_sampling_level)
    "full-dapo-beta0-iter1-token": (False, "dapo", 0.0, 1, "token"),
    "full-grpo-beta0-iter2-token": (False, "grpo", 0.0, 2, "token"),
    # reference = the same PEFT model under disable_adapter(); old policy recomputed; entropy bonus
    "lora-grpo-beta0.04-iter2-sequence": (True, "grpo", 0.04, 2, "sequence"),
}
GRPO_KEYS = ["loss", "grad_norm", "entropy", "reward", "reward_std"]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_patched_trains_like_trl(case):
    plain, patched = grpo_run(False, *GRPO_CASES[case]), grpo_run(True, *GRPO_CASES[case])
    reference = grpo_run(False, *GRPO_CASES[case], dtype=torch.float64)
    assert len(plain["completions"]) >= 4, "no generations"
    assert patched["completions"] == plain["completions"] == reference["completions"], "generations diverged"
    keys = GRPO_KEYS + (["kl"] if GRPO_CASES[case][2] > 0 else [])
    _assert_trains_as_accurately(plain, patched, reference, keys)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_logprobs_routed_to_fastkern(case):
    assert grpo_run(False, *GRPO_CASES[case])["trl_calls"] > 0  # the counter sees TRL's kernel
    assert grpo_run(True, *GRPO_CASES[case])["trl_calls"] == 0, "TRL's own log-prob kernel ran for a patched model"


DPO_KEYS = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
            "logps/rejected"]


DPO_CASES = dict(argvalues=[False, True, pytest.param("qlora", marks=pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed"))],
    ids=["full-separate-ref", "lora-disable-adapter-ref", "qlora-nf4-disable-adapter-ref"])


@pytest.mark.slow
@pytest.mark.parametrize("lora", **DPO_CASES)
def test_dpo_patched_trains_like_trl(lora):
    plain, patched = dpo_run(False, lora), dpo_run(True, lora)
    reference = dpo_run(False, lora, dtype=torch.float64)
    if not lora:  # policy == reference at step 1 (the adapters are random-init, init_lora_weights=False)
        assert plain["logs"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    _assert_trains_as_accurately(plain, patched, reference, DPO_KEYS)


@pytest.mark.slow
@pytest.mark.parametrize("lora", **DPO_CASES)
def test_dpo_logprobs_routed_to_fastkern(lora):
    assert dpo_run(False, lora)["trl_calls"] > 0
    assert dpo_run(True, lora)["trl_calls"] == 0, "TRL's own log-prob kernel ran for a patched model"


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_fused_head_logprobs_real_vocab_bf16_gpu(family):
    """Real vocabularies in bf16 on the device: Qwen3 (151936) and Gemma2 (256000, softcap 30)."""
    from trl.trainer.utils import add_fused_lm_head

    vocab = 151936 if family == "qwen3" else 256000
    temperature = 0.9
    base = tiny_model(family, vocab_size=vocab, hidden_size=256, intermediate_size=512).cuda().train()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (4, 300), generator=g).cuda()
    labels = ids.clone()
    labels[:, :40] = -100
    oracle_model = copy.deepcopy(base).double()
    with torch.no_grad():
        lp64, ent64 = _reference_logprobs(oracle_model, ids, labels, temperature)
    del oracle_model
    plain = copy.deepcopy(base).bfloat16()
    with torch.no_grad():
        lp16, ent16 = _reference_logprobs(plain, ids, labels, temperature)
    patched = copy.deepcopy(base).bfloat16()
    fastkern.patch_model(patched, **PATCH)
    add_fused_lm_head(patched, temperature=temperature, outputs=("log_probs", "entropy"))
    with TRLKernelCalls() as calls:
        out = patched(ids, labels=labels, fused_lm_head=True)
    assert calls.count == 0
    assert_close(out.log_probs, lp64, torch.bfloat16, lp16, name="log_probs", model_level=True)
    assert_close(out.entropy, ent64, torch.bfloat16, ent16, name="entropy", model_level=True)
