"""Writing a teacher cache: one teacher pass over the data, each example's taps stored unpadded in shards."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from distillkit.errors import ConfigError
from distillkit.objective.model_access import use_eager_attention
from distillkit.objective.taps import TapRequest, collect_taps, teacher_view
from distillkit.teacher_cache.identity import LOG_TAIL_FLOOR, CacheContents


def _per_example(tensor: torch.Tensor, b: int, real: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, bool]:
    """Example ``b`` of a ``[B, T, ...]`` tensor at its real positions (or ``[B, ...]`` as is)."""
    row = tensor[b]
    if tensor.dim() >= 2 and tensor.shape[1] == seq_len:
        return row[real], True
    return row, False


def write_cache(
    directory: str | Path,
    teacher: nn.Module,
    splits: Mapping[str, Iterable[dict[str, torch.Tensor]]],
    request: TapRequest,
    *,
    layers: tuple[int, ...] | None,
    top_k: int | None,
    meta: dict[str, Any],
    autocast: Any = None,
    device: torch.device | None = None,
    shard_examples: int = 1024,
) -> dict[str, Any]:
    """Runs ``teacher`` over batches and writes what ``request`` asks for, per example, to ``directory``.

    The cache is written to a temporary sibling and renamed into place, so a crash never leaves a cache
    that looks complete.

    Args:
        directory: The cache directory (replaced if it exists).
        teacher: The frozen teacher (put in eval mode here: no dropout).
        splits: Split name (``train``, ``eval``) -> collated batches with ``example_ids``.
        request: What the objective reads of this teacher (labels are not stored: they come from the batch).
        layers: Hidden-state layers to store, or None for all.
        top_k: Store token-level logits as top-k log-probabilities + tail mass (None or k >= V: dense).
        meta: :func:`expected_meta` of the run.
        autocast: A factory of the run's autocast context (None: none).
        device: Where the teacher runs.
        shard_examples: Examples per safetensors shard.

    Returns:
        ``{"examples", "bytes", "bytes_per_example", "seconds", "stored"}``.

    """
    if not request.needs_forward:
        raise ConfigError("no objective term reads this teacher: there is nothing to cache")
    started = time.perf_counter()
    final = Path(directory)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    teacher.eval()  # no dropout: the cache holds what the frozen teacher gives
    if request.attentions:
        use_eager_attention(teacher, "the teacher cache")
    device = device or next(teacher.parameters()).device
    ask = TapRequest(
        hidden_states=request.hidden_states,
        attentions=request.attentions,
        logits=request.logits,
        modules=request.modules,
    )
    contents: CacheContents | None = None
    vocab, depth = None, None
    entries: dict[str, dict[str, int]] = {}
    shards: dict[str, list[str]] = {}
    token_modules: dict[str, bool] = {}
    for split, batches in splits.items():
        pending: dict[str, torch.Tensor] = {}
        count, entries[split], shards[split] = 0, {}, []

        def flush(split: str = split) -> None:
            nonlocal pending, count
            if not pending:
                return
            name = f"{split}-{len(shards[split]):05d}.safetensors"
            save_file(pending, str(tmp / name))
            shards[split].append(name)
            pending, count = {}, 0

        for batch in batches:
            batch = {k: v.to(device) for k, v in teacher_view(batch).items()}
            with torch.no_grad(), autocast() if autocast is not None else nullcontext():
                taps = collect_taps(teacher, batch, ask)
            ids = batch["example_ids"].tolist()
            mask = batch.get("attention_mask")
            seq_len = batch["input_ids"].shape[1]
            mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
            if contents is None:
                stored_layers = tuple(range(len(taps.hidden_states))) if layers is None else tuple(layers)
                if request.hidden_states:
                    bad = [i for i in stored_layers if not 0 <= i < len(taps.hidden_states)]
                    if bad:
                        raise ConfigError(f"layers {bad} are out of range for the teacher")
                depth = len(taps.hidden_states) if request.hidden_states else None
                vocab = int(taps.logits.shape[-1]) if request.logits else None
                logits_kind = None
                if request.logits:
                    sparse = taps.logits.dim() == 3 and top_k is not None and top_k < taps.logits.shape[-1]
                    logits_kind = "topk" if sparse else "dense"
                contents = CacheContents(
                    layers=stored_layers if request.hidden_states else (),
                    attentions=request.attentions,
                    logits=logits_kind,
                    top_k=top_k if logits_kind == "topk" else None,
                    modules=request.modules,
                )
            for b, example in enumerate(ids):
                key = str(example)
                if key in entries[split]:
                    raise ConfigError(f"example id {example} appears twice in the {split} data")
                real = mask[b].bool()
                pending[f"{key}.input_ids"] = batch["input_ids"][b][real].to(torch.int32).cpu()
                if contents.layers:
                    hidden = torch.stack([taps.hidden_states[i][b][real] for i in contents.layers])
                    pending[f"{key}.hidden"] = hidden.cpu()
                if contents.attentions:
                    index = real.nonzero().squeeze(1)
                    maps = torch.stack([a[b][:, index][:, :, index] for a in taps.attentions])
                    pending[f"{key}.attentions"] = maps.cpu()
                if contents.logits is not None:
                    row, _ = _per_example(taps.logits, b, real, seq_len)
                    if contents.logits == "topk":
                        logp = torch.log_softmax(row.float(), dim=-1)
                        values, index = logp.topk(contents.top_k, dim=-1)
                        top_mass = values.logsumexp(dim=-1).clamp_max(0.0)
                        log_tail = torch.log(-torch.expm1(top_mass)).clamp_min(LOG_TAIL_FLOOR)
                        pending[f"{key}.topk_logp"] = values.cpu()
                        pending[f"{key}.topk_index"] = index.to(torch.int32).cpu()
                        pending[f"{key}.log_tail"] = log_tail.cpu()
                    else:
                        pending[f"{key}.logits"] = row.cpu()
                for path in contents.modules:
                    row, token = _per_example(taps.modules[path], b, real, seq_len)
                    token_modules[path] = token
                    pending[f"{key}.module.{path}"] = row.cpu()
                entries[split][key] = len(shards[split])
                count += 1
                if count >= shard_examples:
                    flush()
        flush()
    if contents is None:
        raise ConfigError("the data to cache is empty")
    index = {
        **meta,
        "hidden_layers": depth,
        "stored": {
            "layers": list(contents.layers),
            "attentions": contents.attentions,
            "logits": contents.logits,
            "top_k": contents.top_k,
            "vocab": vocab,
            "modules": list(contents.modules),
            "token_modules": token_modules,
        },
        "shards": shards,
        "entries": entries,
    }
    (tmp / "index.json").write_text(json.dumps(index), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    size = sum(p.stat().st_size for p in final.iterdir())
    examples = sum(len(e) for e in entries.values())
    return {
        "examples": examples,
        "bytes": size,
        "bytes_per_example": size / max(examples, 1),
        "seconds": time.perf_counter() - started,
        "stored": contents.describe(),
    }
