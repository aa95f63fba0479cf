"""GRPO with TRL's GRPOTrainer on a small random-init Llama-style model, with fastkern patched in.

The task is built in code: each prompt is the start of an arithmetic progression of digits modulo 10
("3 5 7"), and the reward is the fraction of the completion's first tokens that continue it ("9 1 3 ...").
The tokenizer is a word-level vocabulary made here, so nothing is downloaded.

    python examples/grpo.py                      # CPU: tiny model, a few steps, well under two minutes
    python examples/grpo.py --size small --steps 200 --lora 16     # GPU: bigger model, LoRA

The only fastkern line is ``fastkern.patch_model(model, loss=True)``; remove it to get plain TRL.
"""

import argparse
import random
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

import fastkern

DIGITS = [str(i) for i in range(10)]
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
}


def build_tokenizer():
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *DIGITS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def build_model(size, vocab_size, checkpoint_dir, seed=0):
    """A random-init model saved and loaded back as a checkpoint, standing in for a downloaded one
    (TRL loads its reference model for full fine-tuning with beta > 0 from the same path)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=1024, **SIZES[size])
    LlamaForCausalLM(config).save_pretrained(checkpoint_dir)
    # bf16 weights on a GPU (as a downloaded checkpoint would be loaded), fp32 on CPU.
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return LlamaForCausalLM.from_pretrained(checkpoint_dir, dtype=dtype)


def build_dataset(n_prompts, seed=0):
    """Prompts of three progression terms; `start` and `step` let the reward check the continuation."""
    rng = random.Random(seed)
    rows = {"prompt": [], "start": [], "step": []}
    for _ in range(n_prompts):
        start, step = rng.randrange(10), rng.randrange(1, 10)
        rows["prompt"].append(" ".join(DIGITS[(start + i * step) % 10] for i in range(3)))
        rows["start"].append(start)
        rows["step"].append(step)
    return Dataset.from_dict(rows)


def progression_reward(prompts, completions, start, step, **kwargs):
    """Per completion, the mean over its first four tokens of: 1 for the digit that continues the
    progression, 0.25 for another digit, 0 otherwise (graded, so an untrained model already sees signal)."""
    rewards = []
    for completion, a, d in zip(completions, start, step):
        expected = [DIGITS[(a + (3 + i) * d) % 10] for i in range(4)]
        got = completion.split()[:4]
        rewards.append(sum(1.0 if g == e else 0.25 if g in DIGITS else 0.0 for g, e in zip(got, expected)) / 4)
    return rewards


def grpo_config(out_dir, args):
    cuda = torch.cuda.is_available()
    return GRPOConfig(
        output_dir=out_dir, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        per_device_train_batch_size=args.batch, num_generations=args.generations,
        max_completion_length=args.completion_length, temperature=args.temperature, beta=args.beta,
        loss_type=args.loss_type, num_iterations=args.num_iterations,
        importance_sampling_level=args.importance_sampling_level,
        logging_steps=1, save_strategy="no", report_to="none", seed=args.seed, data_seed=args.seed,
        bf16=cuda, gradient_checkpointing=cuda, use_cpu=not cuda, disable_tqdm=True,
    )


def train(args, patch=True):
    """Build everything, train, return the trainer's log history (one dict per step)."""
    tokenizer = build_tokenizer()
    dataset = build_dataset(args.steps * args.batch, seed=args.seed)
    with tempfile.TemporaryDirectory() as out_dir:
        model = build_model(args.size, args.vocab, f"{out_dir}/init", seed=args.seed)
        if args.lora:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=args.lora, lora_alpha=2 * args.lora, target_modules="all-linear")
            model = get_peft_model(model, lora)
        if patch:
            fastkern.patch_model(model, loss=True)
        trainer = GRPOTrainer(model=model, reward_funcs=progression_reward, args=grpo_config(out_dir, args),
                              train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SIZES), default="small" if cuda else "tiny")
    p.add_argument("--steps", type=int, default=100 if cuda else 6)
    p.add_argument("--batch", type=int, default=16 if cuda else 4, help="completions per device batch")
    p.add_argument("--generations", type=int, default=8 if cuda else 4, help="completions per prompt")
    p.add_argument("--completion-length", type=int, default=16 if cuda else 8)
    p.add_argument("--vocab", type=int, default=32000 if cuda else 32,
                   help="model vocabulary (the task uses 14 tokens; a large vocab makes the head realistic)")
    p.add_argument("--lr", type=float, default=1e-4 if cuda else 1e-3)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient against the reference model (TRL default 0)")
    p.add_argument("--loss-type", default="dapo")
    p.add_argument("--num-iterations", type=int, default=1)
    p.add_argument("--importance-sampling-level", choices=["token", "sequence"], default="token")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lora", type=int, default=None, help="LoRA rank on all linear layers (default: full fine-tuning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-patch", action="store_true", help="plain TRL, for comparison")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logs = train(args, patch=not args.no_patch)
    for h in logs:
        print(f"step {h['step']:>4}  loss {h['loss']:+.5f}  reward {h['reward']:.3f}  "
              f"grad_norm {h['grad_norm']:.4f}  entropy {h['entropy']:.3f}")
    return logs


if __name__ == "__main__":
    main()
