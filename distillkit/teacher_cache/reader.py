"""Reading a teacher cache: checks it serves the run, then re-pads each batch's cached taps."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from distillkit.errors import ConfigError, quote_input, resolved_against
from distillkit.objective.taps import NOTHING, TapRequest, Taps, TopKLogits
from distillkit.teacher_cache.identity import CacheContents


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
                f"teacher.cache {quote_input(str(directory))}{resolved_against(directory)} holds no teacher "
                "cache (no index.json); write it with "
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

    @property
    def serves_topk(self) -> bool:
        """Whether the cache holds top-k logits, which it gives as ``Taps.topk_logits`` (see :meth:`taps`)."""
        return self.contents.logits == "topk"

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
        if request.output_layer and not self.serves_topk:
            problems.append(f"the terms read the {who}'s output layer, which only a top-k cache stands for")
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

    def check_tokenizers(self, meta: Mapping[str, Any]) -> None:
        """Refuses a cache written with other tokenizers (before any weights load: they are known first).

        Args:
            meta: :func:`~distillkit.teacher_cache.identity.tokenizers_meta` of this run.

        Raises:
            ConfigError: Naming what differs and the fix.

        """
        problems = [f"{p}: cache {a!r}, this run {b!r}" for p, a, b in _differences(self.index, meta)]
        if problems:
            raise ConfigError(
                f"the teacher cache {self.directory} was written with other tokenizers "
                f"({'; '.join(problems)}): its tokens (and, with a student tokenizer of its own, its blocks "
                "of text) are not this run's. Write it again with `distillkit cache-teacher CONFIG.yaml` or "
                "remove teacher.cache"
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
            ``modules`` as requested, on the batch's device; padded positions are zeros. A request for the
            output layer (the run reads output layers in place of logits) gets ``topk_logits`` from a top-k
            cache: the stored top-k ids and log-probabilities and log tail, ``[B, T, k]`` and ``[B, T]``
            (padded positions: ids ``0 … k−1``, log-probabilities ``−log k``, no tail).

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
        if request.output_layer:
            if not self.serves_topk:
                raise ConfigError(
                    f"the teacher cache {self.directory} holds no top-k logits to stand for the teacher's "
                    "output layer; write it with teacher.cache_top_k set, or set train.fused_logits: never"
                )
            outputs["topk_logits"] = self._topk(ids, mask, device)
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
        topk = self._topk(ids, mask, device)
        flat = densify_topk(topk.logp[mask], topk.index[mask], topk.log_tail[mask], _vocab_size(self.index))
        padded = flat.new_zeros(batch_size, seq_len, flat.shape[-1])
        padded[mask] = flat
        return padded

    def _topk(self, ids: list[int], mask: torch.Tensor, device: torch.device) -> TopKLogits:
        """The stored top-k of the batch's examples, padded to the batch (see :meth:`taps`)."""
        batch_size, seq_len = mask.shape
        k = int(self.contents.top_k)
        values = torch.cat([self._load(e, "topk_logp") for e in ids]).to(device)
        index = torch.cat([self._load(e, "topk_index") for e in ids]).to(device).long()
        log_tail = torch.cat([self._load(e, "log_tail") for e in ids]).to(device)
        padded_index = torch.arange(k, device=device).expand(batch_size, seq_len, k).clone()
        padded_index[mask] = index
        padded_logp = values.new_full((batch_size, seq_len, k), -math.log(k))
        padded_logp[mask] = values
        padded_tail = log_tail.new_full((batch_size, seq_len), float("-inf"))
        padded_tail[mask] = log_tail
        return TopKLogits(index=padded_index, logp=padded_logp, log_tail=padded_tail)

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
