"""Distil a causal LM inside TRL's ``SFTTrainer``: the distillkit objective replaces the SFT loss.

The mechanism is :class:`distillkit.hf.DistillationMixin` put before ``SFTTrainer`` in the bases: SFT keeps
its data preparation (tokenising ``text``, truncation, labels), the mixin runs the frozen teacher, the
objective (``kd`` + ``ce`` here) and logs each term. Tiny Llama models built from configs and a word-level
tokenizer keep it offline and quick::

    pip install --no-deps trl==1.16.0
    python examples/sft_distillation.py --steps 20 --output-dir runs/sft-distill
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from distillkit.hf import DistillationMixin

WORDS = "the a film story plot was is very quite good bad dull fine warm cold and but".split()


class DistillationSFTTrainer(DistillationMixin, SFTTrainer):
    """``SFTTrainer`` whose loss is a distillkit objective (``teacher=``, ``objective=`` as in the mixin)."""


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over :data:`WORDS` with pad, unknown, begin and end tokens."""
    vocab = {word: index for index, word in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llama(layers: int, hidden: int, vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def sentences(count: int, seed: int = 0) -> Dataset:
    """``count`` short texts of random words."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(5, 12))) for _ in range(count)]
    return Dataset.from_dict({"text": texts})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains and saves the student; returns the last training log record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", default="runs/sft-distill")
    options = parser.parse_args(argv)

    tokenizer = word_tokenizer()
    teacher = tiny_llama(layers=4, hidden=64, vocab_size=len(tokenizer), seed=1)
    student = tiny_llama(layers=2, hidden=32, vocab_size=len(tokenizer), seed=2)
    args = SFTConfig(
        output_dir=options.output_dir,
        max_steps=options.steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=5,
        max_length=16,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        seed=0,
    )
    trainer = DistillationSFTTrainer(
        model=student,
        teacher=teacher,
        objective=[{"loss": "kd", "weight": 1.0, "temperature": 2.0}, {"loss": "ce", "weight": 0.5}],
        args=args,
        train_dataset=sentences(96),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()  # the student, its tokenizer and its model card (README.md)
    last = next(record for record in reversed(trainer.state.log_history) if "loss_kd" in record)
    terms = f"kd {last['loss_kd']:.4f} + 0.5 x ce {last['loss_ce']:.4f}"
    print(f"step {last['step']}: loss {last['loss']:.4f} = {terms}")
    print(f"student saved to {options.output_dir}")
    return last


if __name__ == "__main__":
    main()
