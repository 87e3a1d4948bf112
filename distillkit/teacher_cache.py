"""Cached teacher outputs: run a frozen teacher once over the data, read its taps from disk afterwards.

``distillkit cache-teacher CONFIG.yaml`` runs the teacher (eval mode, no dropout, ``no_grad``) over the
training data (and with ``--with-eval`` the evaluation data) and stores, per example and unpadded, exactly
what the objective's terms read of it: the hidden states of the layers the terms map (all layers when a term
reads hidden states without a layer map), attention maps when asked, module outputs, and logits.
Token-level logits ``[T, V]`` may be stored sparsely (``teacher.cache_top_k``): the top-k log-probabilities
and their indices per token, plus the log of the remaining (tail) mass.

Layout of a cache directory::

    index.json              format, fingerprint (teacher, tokenizer, data, precision), what is stored,
                            and example id -> shard, per split
    train-00000.safetensors "<id>.input_ids" [n] int32, "<id>.hidden" [layers, n, H],
                            "<id>.attentions" [layers, heads, n, n], "<id>.logits" [C] or [n, V],
                            "<id>.topk_logp" [n, k], "<id>.topk_index" [n, k] int32, "<id>.log_tail" [n],
                            "<id>.module.<path>" [n, ...] (token-level) or [...]

Reading (:meth:`TeacherCache.taps`) re-pads every tensor to the batch's own padding (the positions where its
``attention_mask`` is 1, so left and right padding both work); padded positions are zeros. The batch's
tokens are compared with the cached ones, so a cache of other data or another tokenizer is refused, and an
example id the cache does not hold is an error, never a silent zero.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from distillkit.errors import ConfigError
from distillkit.taps import NOTHING, TapRequest, Taps, collect_taps, use_eager_attention

FORMAT = 1
"""The version of the cache layout; a cache of another version is refused."""

LOG_TAIL_FLOOR = -80.0
"""The smallest stored log tail mass (``e^-80``): a tail that rounds to zero still gives finite logits."""


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of a model's config and every parameter and buffer, bytes included.

    Robust to where the weights came from (a path, a fine-tuning cache, a random init with a seed): two
    teachers have the same fingerprint exactly when their weights and architecture are identical.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
        settings.pop("transformers_version", None)
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_settings(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer settings a cache depends on: class, vocabulary (hashed), padding and truncation sides."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "vocab_sha256": hashlib.sha256(vocab).hexdigest()[:16],
        "padding_side": tokenizer.padding_side,
        "truncation_side": getattr(tokenizer, "truncation_side", None),
        "pad_token_id": tokenizer.pad_token_id,
    }


def resolved_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: what ``train.precision`` means on ``device`` (see ``loop.autocast_factory``)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


@dataclass(frozen=True)
class CacheContents:
    """What a cache stores of the teacher.

    Attributes:
        layers: Hidden-state layers stored (0 = embeddings), or ``()`` for none.
        attentions: Whether attention maps of every layer are stored.
        logits: ``dense``, ``topk`` or None.
        top_k: ``k`` of ``topk`` logits.
        modules: Module paths stored.

    """

    layers: tuple[int, ...] = ()
    attentions: bool = False
    logits: str | None = None
    top_k: int | None = None
    modules: tuple[str, ...] = ()

    def describe(self) -> str:
        """For messages: ``hidden states of layers 0, 2, 4; logits (top-16)``."""
        parts = []
        if self.layers:
            parts.append("hidden states of layers " + ", ".join(map(str, self.layers)))
        if self.attentions:
            parts.append("attention maps")
        if self.logits:
            parts.append("logits" + (f" (top-{self.top_k})" if self.logits == "topk" else ""))
        parts += [f"module '{path}'" for path in self.modules]
        return "; ".join(parts) or "nothing"


def expected_meta(config: Any, teacher: nn.Module, tokenizer: Any, device: torch.device) -> dict[str, Any]:
    """The settings a cache must have been written with to serve a run of ``config`` (compared key by key).

    Args:
        config: The :class:`~distillkit.config.DistillConfig` (its task, data and precision count).
        teacher: The teacher model (its weights' fingerprint counts).
        tokenizer: The tokenizer (its settings count).
        device: Where the run computes (the precision ``auto`` resolves to depends on it).

    """
    data = {k: v for k, v in config.data.model_dump().items() if k != "max_eval_examples"}
    return {
        "format": FORMAT,
        "task": config.task,
        "teacher": model_fingerprint(teacher),
        "tokenizer": tokenizer_settings(tokenizer),
        "data": data,
        "precision": resolved_precision(config.train.precision, device),
    }


# -- writing ------------------------------------------------------------------------------------------------
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
            batch = {k: v.to(device) for k, v in batch.items()}
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


# -- reading ------------------------------------------------------------------------------------------------
class CachedLayers(tuple):
    """The teacher's hidden states read from a cache: layers the cache does not hold raise on access.

    Indexing and iteration behave as a tuple of ``[B, T, H]`` tensors, one per layer (0 = embeddings);
    reading a layer that was not stored raises ``LookupError`` naming the stored layers.
    """

    def __new__(cls, layers: list[torch.Tensor | None], where: str) -> CachedLayers:  # noqa: D102
        made = super().__new__(cls, layers)
        made.where = where
        return made

    def _get(self, index: int) -> torch.Tensor:
        value = tuple.__getitem__(self, index)
        if value is None:
            stored = [i for i in range(len(self)) if tuple.__getitem__(self, i) is not None]
            raise LookupError(
                f"teacher layer {index % len(self)} is not in the teacher cache {self.where} (it stores "
                f"layers {', '.join(map(str, stored))}); write the cache again with this objective"
            )
        return value

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return tuple(self._get(i) for i in range(len(self))[index])
        return self._get(index)

    def __iter__(self):
        return (self._get(i) for i in range(len(self)))


class CachedTaps(Taps):
    """Taps read from a cache: already detached (no graph), so :meth:`detached` returns them as they are."""

    def detached(self) -> Taps:
        """Returns ``self`` (cached tensors carry no gradient)."""
        return self


class TeacherCache:
    """Reads a cache written by :func:`write_cache`.

    Args:
        directory: The cache directory.
        split: The split whose examples :meth:`taps` reads (``train``).

    Raises:
        ConfigError: If the directory holds no complete cache.

    """

    def __init__(self, directory: str | Path, split: str = "train") -> None:
        self.directory = Path(directory)
        index_path = self.directory / "index.json"
        if not index_path.is_file():
            raise ConfigError(
                f"teacher.cache '{directory}' holds no teacher cache (no index.json); write it with "
                "`distillkit cache-teacher CONFIG.yaml`"
            )
        self.index = json.loads(index_path.read_text(encoding="utf-8"))
        stored = self.index["stored"]
        self.contents = CacheContents(
            layers=tuple(stored["layers"]),
            attentions=stored["attentions"],
            logits=stored["logits"],
            top_k=stored["top_k"],
            modules=tuple(stored["modules"]),
        )
        self.token_modules = stored.get("token_modules", {})
        if split not in self.index["entries"]:
            raise ConfigError(f"the teacher cache {directory} holds no '{split}' split")
        self.split = split
        self.entries = self.index["entries"][split]
        self.shards = self.index["shards"][split]
        self._handles: dict[int, Any] = {}

    # -- checks -----------------------------------------------------------------------------------------
    def check(
        self,
        meta: Mapping[str, Any],
        request: TapRequest,
        layers: tuple[int, ...] | None,
        *,
        top_k: int | None = None,
        who: str = "teacher",
    ) -> None:
        """Refuses a cache written for another run, or one lacking what the objective reads.

        Args:
            meta: :func:`expected_meta` of this run.
            request: What the objective reads of this teacher.
            layers: Hidden-state layers the terms map (None: any layer).
            top_k: ``teacher.cache_top_k`` of this run (compared with the stored logits when set).
            who: The teacher's name, for messages.

        Raises:
            ConfigError: Listing every difference and missing field.

        """
        problems = [f"{p}: cache {a!r}, this run {b!r}" for p, a, b in _differences(self.index, meta)]
        contents = self.contents
        if request.hidden_states:
            if layers is None and len(contents.layers) < _teacher_depth(self.index):
                problems.append(
                    f"a term reads any hidden state of the {who}, but the cache stores layers "
                    f"{list(contents.layers)} only"
                )
            missing = [i for i in (layers or ()) if i not in contents.layers]
            if missing:
                problems.append(f"the terms map {who} layers {missing}, which the cache does not store")
        if request.attentions and not contents.attentions:
            problems.append(f"a term reads the {who}'s attention maps, which the cache does not store")
        if request.logits and contents.logits is None:
            problems.append(f"a term reads the {who}'s logits, which the cache does not store")
        if request.logits and top_k is not None and contents.logits == "topk" and top_k != contents.top_k:
            problems.append(f"cache_top_k: cache {contents.top_k}, this run {top_k}")
        absent = [p for p in request.modules if p not in contents.modules]
        if absent:
            problems.append(f"a term reads {who} modules {absent}, which the cache does not store")
        if problems:
            raise ConfigError(
                f"the teacher cache {self.directory} does not fit this run ({'; '.join(problems)}). It "
                f"stores {contents.describe()}. Write it again with `distillkit cache-teacher CONFIG.yaml` "
                "or remove teacher.cache"
            )

    # -- reading ----------------------------------------------------------------------------------------
    def _load(self, example: int, name: str) -> torch.Tensor:
        shard = self.entries.get(str(example))
        if shard is None:
            raise ConfigError(
                f"example id {example} of the {self.split} data is not in the teacher cache {self.directory} "
                f"(it holds {len(self.entries)} examples); the cache was written for other data: write it "
                "again with `distillkit cache-teacher CONFIG.yaml`"
            )
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(str(self.directory / self.shards[shard]), framework="pt")
            self._handles[shard] = handle
        return handle.get_tensor(f"{example}.{name}")

    def taps(self, batch: Mapping[str, torch.Tensor], request: TapRequest = NOTHING) -> CachedTaps:
        """The teacher's taps for ``batch``, re-padded to the batch's padding.

        Args:
            batch: A collated batch with ``input_ids`` ``[B, T]``, ``example_ids`` ``[B]`` and (optionally)
                ``attention_mask`` ``[B, T]``.
            request: What to read (the cache must hold it; see :meth:`check`).

        Returns:
            Taps with ``hidden_states`` (a :class:`CachedLayers`), ``attentions``, ``logits`` and
            ``modules`` as requested, on the batch's device; padded positions are zeros.

        Raises:
            ConfigError: For an example id the cache does not hold, or cached tokens that differ from the
                batch's (the cache was written for other data or another tokenizer).

        """
        if "example_ids" not in batch:
            raise ConfigError("reading a teacher cache needs example_ids in every batch")
        ids = batch["example_ids"].tolist()
        input_ids = batch["input_ids"]
        device = input_ids.device
        mask = batch.get("attention_mask")
        mask = (torch.ones_like(input_ids) if mask is None else mask).bool()
        batch_size, seq_len = input_ids.shape
        lengths = mask.sum(dim=1).tolist()
        for b, example in enumerate(ids):
            cached = self._load(example, "input_ids").to(device)
            if cached.shape[0] != lengths[b] or not torch.equal(cached.long(), input_ids[b][mask[b]].long()):
                raise ConfigError(
                    f"example id {example}: the batch's tokens differ from those the teacher cache "
                    f"{self.directory} was written for; it belongs to other data, max_length or tokenizer: "
                    "write it again with `distillkit cache-teacher CONFIG.yaml`"
                )
        outputs: dict[str, Any] = {}
        if request.hidden_states:
            stacked = torch.cat([self._load(e, "hidden") for e in ids], dim=1).to(device)  # [L, ΣN, H]
            padded = stacked.new_zeros(stacked.shape[0], batch_size, seq_len, stacked.shape[-1])
            padded[:, mask] = stacked
            depth = _teacher_depth(self.index)
            layers: list[torch.Tensor | None] = [None] * depth
            for slot, layer in enumerate(self.contents.layers):
                layers[layer] = padded[slot]
            outputs["hidden_states"] = CachedLayers(layers, str(self.directory))
        if request.attentions:
            maps = [self._load(e, "attentions").to(device) for e in ids]  # [L, heads, n, n]
            count, heads = maps[0].shape[:2]
            padded = maps[0].new_zeros(count, batch_size, heads, seq_len, seq_len)
            for b, cached in enumerate(maps):
                index = mask[b].nonzero().squeeze(1)
                view = padded[:, b]  # [L, heads, T, T], a view
                view[:, :, index[:, None], index[None, :]] = cached
            outputs["attentions"] = tuple(padded.unbind(0))
        if request.logits:
            outputs["logits"] = self._logits(ids, mask, device)
        if request.modules:
            modules = {}
            for path in request.modules:
                rows = [self._load(e, f"module.{path}").to(device) for e in ids]
                if self.token_modules.get(path, False):
                    flat = torch.cat(rows)
                    padded = flat.new_zeros(batch_size, seq_len, *flat.shape[1:])
                    padded[mask] = flat
                    modules[path] = padded
                else:
                    modules[path] = torch.stack(rows)
            outputs["modules"] = modules
        return CachedTaps.from_batch(batch, **outputs)

    def _logits(self, ids: list[int], mask: torch.Tensor, device: torch.device) -> torch.Tensor:
        batch_size, seq_len = mask.shape
        if self.contents.logits == "dense":
            rows = [self._load(e, "logits").to(device) for e in ids]
            if rows[0].dim() == 1:  # [C] per example: sequence-level logits
                return torch.stack(rows)
            flat = torch.cat(rows)
            padded = flat.new_zeros(batch_size, seq_len, flat.shape[-1])
            padded[mask] = flat
            return padded
        vocab = _vocab_size(self.index)
        values = torch.cat([self._load(e, "topk_logp") for e in ids]).to(device)
        index = torch.cat([self._load(e, "topk_index") for e in ids]).to(device).long()
        log_tail = torch.cat([self._load(e, "log_tail") for e in ids]).to(device)
        flat = densify_topk(values, index, log_tail, vocab)
        padded = flat.new_zeros(batch_size, seq_len, vocab)
        padded[mask] = flat
        return padded

    def __len__(self) -> int:
        return len(self.entries)


def densify_topk(
    values: torch.Tensor, index: torch.Tensor, log_tail: torch.Tensor, vocab: int
) -> torch.Tensor:
    """Dense log-probabilities from top-k log-probabilities and the log tail mass.

    The top-k entries keep their exact log-probabilities; the tail mass ``r`` is spread evenly over the
    other ``V − k`` entries (``log(r / (V − k))`` each), so each row is a normalised distribution that equals
    the teacher's on its top k and in total tail mass.

    Args:
        values: ``[N, k]`` top-k log-probabilities.
        index: ``[N, k]`` their vocabulary indices (int64).
        log_tail: ``[N]`` log of ``1 − Σ top-k probabilities``.
        vocab: ``V``.

    Returns:
        ``[N, V]`` float32 log-probabilities (usable as logits).

    """
    k = values.shape[-1]
    if vocab == k:
        return torch.empty(values.shape[0], vocab, device=values.device).scatter_(1, index, values.float())
    fill = (log_tail.float() - math.log(vocab - k)).unsqueeze(1)
    dense = fill.expand(values.shape[0], vocab).clone()
    return dense.scatter_(1, index, values.float())


def _differences(index: Mapping[str, Any], meta: Mapping[str, Any], prefix: str = "") -> list[tuple]:
    found = []
    for key, expected in meta.items():
        actual = index.get(key)
        if isinstance(expected, Mapping) and isinstance(actual, Mapping):
            found += _differences(actual, expected, f"{prefix}{key}.")
        elif json.loads(json.dumps(actual, default=str)) != json.loads(json.dumps(expected, default=str)):
            found.append((f"{prefix}{key}", actual, expected))
    return found


def _teacher_depth(index: Mapping[str, Any]) -> int:
    return int(index.get("hidden_layers") or 0)


def _vocab_size(index: Mapping[str, Any]) -> int:
    return int(index["stored"]["vocab"])


# -- the command ------------------------------------------------------------------------------------------
def cache_teacher(
    config: Any,
    *,
    name: str = "teacher",
    directory: str | Path | None = None,
    with_eval: bool = False,
    request: TapRequest | None = None,
    layers: tuple[int, ...] | None | str = "objective",
) -> dict[str, Any]:
    """``distillkit cache-teacher``: runs one teacher of a run config over its data and writes the cache.

    Args:
        config: The run's :class:`~distillkit.config.DistillConfig`.
        name: Which teacher (``teacher`` or a name of ``teachers:``).
        directory: Where to write (default: that teacher's ``cache``).
        with_eval: Also cache the evaluation split (distill reads the training split only).
        request: What to store (default: what the objective's terms read of this teacher).
        layers: Hidden-state layers to store; ``"objective"``: the layers the terms map (all when some term
            reads hidden states without a layer map); None: all.

    Returns:
        ``{"directory", "examples", "bytes", "bytes_per_example", "seconds", "stored"}``.

    Raises:
        ConfigError: For an unknown teacher, no directory, or a teacher no term reads.

    """
    from torch.utils.data import DataLoader

    from distillkit.loop import autocast_factory, make_accelerator
    from distillkit.models import load_tokenizer, quiet_loading
    from distillkit.tasks import make_task
    from distillkit.train import build_objective, prepare_teacher

    specs = config.teacher_specs()
    if name not in specs:
        raise ConfigError(f"no teacher named '{name}'; teachers: {', '.join(specs)}")
    spec = specs[name]
    directory = directory or spec.cache
    if directory is None:
        raise ConfigError(
            f"set {'teacher' if name == 'teacher' else 'teachers.' + name}.cache or pass --output DIR"
        )
    if config.task == "masked_lm":
        raise ConfigError(
            "task 'masked_lm' masks the inputs anew in every batch; its teacher cannot be cached"
        )
    accelerator = make_accelerator()
    task = make_task(config)
    tokenizer = load_tokenizer(config.teacher)
    data = task.load_data(tokenizer)
    collator = task.collator(tokenizer)
    if request is None or layers == "objective":
        objective = build_objective(config, task, data)
        request = request or objective.teacher_requests().get(name, NOTHING)
        layers = objective.teacher_layers(name) if layers == "objective" else layers
    if not request.needs_forward:
        raise ConfigError(f"no objective term reads teacher '{name}': there is nothing to cache")
    with quiet_loading():
        teacher, _ = prepare_teacher(
            config.model_copy(update={"teacher": spec}), data, collator, tokenizer, accelerator, task
        )
    teacher.to(accelerator.device)
    batch_size = config.train.eval_batch_size or config.train.batch_size
    splits = {"train": DataLoader(data.train, batch_size=batch_size, collate_fn=collator)}
    if with_eval:
        splits["eval"] = DataLoader(data.eval, batch_size=batch_size, collate_fn=collator)
    meta = expected_meta(config, teacher, tokenizer, accelerator.device)
    stats = {"directory": str(directory)}
    if accelerator.is_main_process:
        stats.update(
            write_cache(
                directory,
                teacher,
                splits,
                request,
                layers=layers,
                top_k=spec.cache_top_k,
                meta=meta,
                autocast=autocast_factory(config.train.precision, accelerator.device),
                device=accelerator.device,
            )
        )
        print(
            f"distillkit: cached {stats['stored']} of {stats['examples']} examples in {directory}: "
            f"{stats['bytes'] / 1e6:.1f} MB, {stats['bytes_per_example'] / 1e3:.1f} kB per example, "
            f"{stats['seconds']:.1f} s"
        )
    accelerator.wait_for_everyone()
    return stats
