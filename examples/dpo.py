"""DPO with TRL's DPOTrainer on a small random-init Llama-style model, with fastkern patched in.

The preference data is built in code: the prompt is the start of an arithmetic progression of digits
modulo 10 ("3 5 7"), the chosen completion continues it ("9 1 3 5") and the rejected one is random digits.
The tokenizer is a word-level vocabulary made here, so nothing is downloaded.

    python examples/dpo.py                     # CPU: tiny model, a few steps, well under two minutes
    python examples/dpo.py --size small --steps 200 --lora 16     # GPU: bigger model, LoRA

With --lora the reference log-probs come from the same model under PEFT's disable_adapter(); without
it TRL loads a separate reference model from the checkpoint. The only fastkern line is
``fastkern.patch_model(model, loss=True)``; remove it to get plain TRL.
"""

import argparse
import random
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

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


def build_dataset(n_pairs, completion_tokens=4, seed=0):
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n_pairs):
        start, step = rng.randrange(10), rng.randrange(1, 10)
        seq = [DIGITS[(start + i * step) % 10] for i in range(3 + completion_tokens)]
        rows["prompt"].append(" ".join(seq[:3]))
        rows["chosen"].append(" " + " ".join(seq[3:]))
        rows["rejected"].append(" " + " ".join(rng.choice(DIGITS) for _ in range(completion_tokens)))
    return Dataset.from_dict(rows)


def dpo_config(out_dir, args):
    cuda = torch.cuda.is_available()
    return DPOConfig(
        output_dir=out_dir, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        per_device_train_batch_size=args.batch, beta=args.beta, loss_type=[args.loss_type],
        max_length=args.max_length, logging_steps=1, save_strategy="no", report_to="none", seed=args.seed,
        data_seed=args.seed, bf16=cuda, gradient_checkpointing=cuda, use_cpu=not cuda, disable_tqdm=True,
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
        trainer = DPOTrainer(model=model, args=dpo_config(out_dir, args), train_dataset=dataset,
                             processing_class=tokenizer)
        trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SIZES), default="small" if cuda else "tiny")
    p.add_argument("--steps", type=int, default=100 if cuda else 8)
    p.add_argument("--batch", type=int, default=16 if cuda else 4, help="preference pairs per device batch")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--vocab", type=int, default=32000 if cuda else 256,
                   help="model vocabulary (the task uses 14 tokens; a large vocab makes the head realistic)")
    p.add_argument("--lr", type=float, default=1e-4 if cuda else 2e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss-type", default="sigmoid")
    p.add_argument("--lora", type=int, default=None, help="LoRA rank on all linear layers (default: full fine-tuning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-patch", action="store_true", help="plain TRL, for comparison")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logs = train(args, patch=not args.no_patch)
    for h in logs:
        print(f"step {h['step']:>4}  loss {h['loss']:.5f}  margin {h['rewards/margins']:+.4f}  "
              f"accuracy {h['rewards/accuracies']:.2f}")
    return logs


if __name__ == "__main__":
    main()
