"""Cached teacher outputs: run a frozen teacher once over the data, read its taps from disk afterwards.

This package is storage only: it never imports the training code. ``distillkit cache-teacher CONFIG.yaml``
(:mod:`distillkit.run.cache_teacher`) runs the teacher (eval mode, no dropout, ``no_grad``) over the
training data (and with ``--with-eval`` the evaluation data) and stores, per example and unpadded, exactly
what the objective's terms read of it: the hidden states of the layers the terms map (all layers when a term
reads hidden states without a layer map), attention maps when asked, module outputs, and logits.
Token-level logits ``[T, V]`` may be stored sparsely (``teacher.cache_top_k``): the top-k log-probabilities
and their indices per token, plus the log of the remaining (tail) mass.

Layout of a cache directory::

    index.json              format, fingerprint (teacher, tokenizers, data, precision), what is stored,
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

from distillkit.teacher_cache.identity import (
    FORMAT,
    LOG_TAIL_FLOOR,
    CacheContents,
    expected_meta,
    model_fingerprint,
    resolved_precision,
    tokenizer_settings,
    tokenizers_meta,
)
from distillkit.teacher_cache.reader import CachedLayers, CachedTaps, TeacherCache, densify_topk
from distillkit.teacher_cache.writer import write_cache

__all__ = [
    "FORMAT",
    "LOG_TAIL_FLOOR",
    "CacheContents",
    "CachedLayers",
    "CachedTaps",
    "TeacherCache",
    "densify_topk",
    "expected_meta",
    "model_fingerprint",
    "resolved_precision",
    "tokenizer_settings",
    "tokenizers_meta",
    "write_cache",
]
