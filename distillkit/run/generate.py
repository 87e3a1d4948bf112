"""``distillkit generate CONFIG.yaml --output FILE.jsonl``: a model's continuations of the config's prompts.

The prompts are those a distillation with the config samples from (``train.generation.prompt_tokens`` leading
tokens of each training block, or the ``data.prompt_column`` prompts), in the order of the training split,
and the sampling is the config's (``temperature``, ``top_p``, ``max_new_tokens``, within ``data.max_length``;
seeded by ``train.seed``). Each line of the output holds ``prompt``, ``completion`` (the sampled text, without
the end-of-text token), ``text`` (the two together) and ``completion_tokens``/``ended`` (whether it stopped at
the end-of-text token); ``FILE.jsonl.meta.json`` records the model (path, weight fingerprint) and the
settings. The file is a data set as it is: ``data.path: FILE.jsonl`` with ``text_column: text`` distils on
the teacher's own text (offline sequence-level KD), or ``prompt_column: prompt`` and
``completion_column: completion`` on its completions only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from distillkit.config import DistillConfig, GenerationSettings
from distillkit.errors import ConfigError
from distillkit.run.engine import autocast_factory
from distillkit.run.run import Run, student_origin
from distillkit.run.sources import sampling_of
from distillkit.tasks.sampling import sample_batch
from distillkit.teacher_cache import model_fingerprint

MODELS = ("teacher", "student")
"""The models ``distillkit generate`` can sample from."""


def generate(
    config: DistillConfig, output: str | Path, model: str = "teacher", limit: int | None = None
) -> dict[str, Any]:
    """Samples a model's continuations of the config's training prompts into a JSON-lines file.

    Args:
        config: A ``causal_lm`` config (``train.generation`` gives the sampling settings; its defaults when
            absent).
        output: The ``.jsonl`` file to write (its directory is made); the sidecar is ``<output>.meta.json``.
        model: ``teacher`` or ``student`` (``student.path`` a trained student, e.g. ``runs/lm/student``).
        limit: Continue only the first ``limit`` prompts (default: all).

    Returns:
        The sidecar's content.

    Raises:
        ConfigError: For another task or model name (before any weights load).

    """
    if config.task != "causal_lm":
        raise ConfigError(f"distillkit generate samples causal LMs; the config's task is '{config.task}'")
    if model not in MODELS:
        raise ConfigError(f"--model must be one of {', '.join(MODELS)}, not '{model}'")
    started = time.perf_counter()
    run = Run.prepare(config)
    settings = config.train.generation or GenerationSettings()
    rows = run.data.train
    count = len(rows) if limit is None else min(limit, len(rows))
    run.load(finetune_teacher=False, announce=False)
    device = run.accelerator.device
    writer = (run.teacher if model == "teacher" else run.student).to(device)
    sampling = sampling_of(settings, run.tokenizer, config.data.max_length)
    autocast = autocast_factory(config.train.precision, device)
    seeds = np.random.Generator(np.random.PCG64(config.train.seed))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tokens, size = 0, config.train.batch_size
    with open(output, "w", encoding="utf-8") as handle:
        for start in tqdm(
            range(0, count, size), desc=f"generate ({model})", disable=not config.train.progress
        ):
            batch = run.collator([rows[i] for i in range(start, min(start + size, count))])
            batch = {k: v.to(device) for k, v in batch.items()}
            seed = int(seeds.integers(0, 2**62))
            sampled = sample_batch(writer, batch, settings.prompt_tokens, sampling, seed, autocast)
            tokens += sampled.generated_tokens
            for line in _records(sampled, run.tokenizer, sampling.end_id):
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    spec = config.teacher if model == "teacher" else config.student
    meta = {
        "model": model,
        "path": spec.path,
        "gguf_file": spec.gguf_file,
        "origin": "teacher" if model == "teacher" else student_origin(config),
        "fingerprint": model_fingerprint(writer),
        "sampling": {
            "prompt_tokens": settings.prompt_tokens,
            "max_new_tokens": sampling.max_new_tokens,
            "max_length": sampling.max_length,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "end_token_id": sampling.end_id,
            "seed": config.train.seed,
        },
        "data": config.data.model_dump(mode="json"),
        "prompts": count,
        "generated_tokens": tokens,
        "seconds": round(time.perf_counter() - started, 3),
    }
    Path(f"{output}.meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    print(f"distillkit: {count} continuations by the {model} ({tokens} tokens) written to {output}")
    return meta


def _records(sampled: Any, tokenizer: Any, end_id: int | None) -> list[dict[str, Any]]:
    """One JSON record per sampled row: prompt, completion and text, decoded without special tokens."""
    batch, records = sampled.batch, []
    for row in range(batch["input_ids"].shape[0]):
        prompt_length = int(batch["prompt_lengths"][row])
        total = int(batch["attention_mask"][row].sum())
        ids = batch["input_ids"][row, :total].tolist()
        completion = ids[prompt_length:]
        records.append(
            {
                "prompt": tokenizer.decode(ids[:prompt_length], skip_special_tokens=True),
                "completion": tokenizer.decode(completion, skip_special_tokens=True),
                "text": tokenizer.decode(ids, skip_special_tokens=True),
                "completion_tokens": len(completion),
                "ended": end_id is not None and completion[-1:] == [end_id],
            }
        )
    return records
