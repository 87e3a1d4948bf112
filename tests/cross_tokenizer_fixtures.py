"""Student tokenizers for the tiny CSV's text: the WordPiece vocabulary permuted; a byte-level BPE."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from distillkit.config import config_from_dict
from distillkit.run.train_tokenizer import train_tokenizer
from tests.distill_fixtures import llama, text_config, write_vocab


def write_permuted_vocab(directory: Path, seed: int = 0) -> tuple[Path, list[int]]:
    """The fixtures' vocab.txt in another order: its path and ``perm`` (teacher id v -> student id)."""
    words = write_vocab(directory).read_text(encoding="utf-8").splitlines()
    order = list(range(len(words)))
    random.Random(seed).shuffle(order)
    path = directory / "permuted-vocab.txt"
    path.write_text("\n".join(words[i] for i in order) + "\n", encoding="utf-8")
    perm = [0] * len(words)
    for new, old in enumerate(order):
        perm[old] = new
    return path, perm


def save_teacher_and_twin(directory: Path, perm: list[int], permute: bool = True) -> tuple[Path, Path]:
    """A tiny random Llama teacher, and a student with its weights whose token rows follow ``perm``.

    With ``permute`` the student computes the teacher's function on the permuted ids; without, it is the
    teacher itself fed other ids.
    """
    torch.manual_seed(0)
    settings = {k: v for k, v in llama(2, 16).items() if k != "model_type"}
    teacher = AutoModelForCausalLM.from_config(LlamaConfig(**settings, tie_word_embeddings=False))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)  # peaked next-token distributions, not nearly uniform ones
    teacher_dir, student_dir = directory / "teacher-model", directory / "student-model"
    teacher.save_pretrained(teacher_dir)
    state = teacher.state_dict()
    if permute:
        index = torch.arange(settings["vocab_size"])
        index[torch.tensor(perm)] = torch.arange(len(perm))  # student row perm[v] <- teacher row v
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            state[key] = state[key][index].clone()
    student = AutoModelForCausalLM.from_config(teacher.config)
    student.load_state_dict(state)
    student.save_pretrained(student_dir)
    return teacher_dir, student_dir


def cross_config(tmp_path: Path, objective: list[dict], student: dict | None = None, **train: Any) -> dict:
    """A causal-LM config whose student has a byte-level BPE tokenizer of 300 tokens trained on the text."""
    raw = text_config(tmp_path, "causal_lm", llama(4, 32), objective, **train)
    tokenizer = tmp_path / "student-tokenizer"
    raw["student"] = {"layers": 2, "tokenizer": str(tokenizer), **(student or {})}
    if not tokenizer.exists():
        train_tokenizer(config_from_dict(raw), 300)
    return raw
