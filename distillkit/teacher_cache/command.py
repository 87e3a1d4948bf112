"""``distillkit cache-teacher``: load a run's teacher and data, and write the cache its objective needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distillkit.errors import ConfigError
from distillkit.objective.taps import NOTHING, TapRequest
from distillkit.teacher_cache.identity import expected_meta
from distillkit.teacher_cache.writer import write_cache


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

    from distillkit.models import load_tokenizer, quiet_loading
    from distillkit.run.loop import autocast_factory, make_accelerator
    from distillkit.run.train import build_objective, prepare_teacher
    from distillkit.tasks import make_task

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
