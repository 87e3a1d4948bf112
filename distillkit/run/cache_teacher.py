"""``distillkit cache-teacher``: load one teacher of a run and write the cache its objective needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from distillkit.config import DistillConfig
from distillkit.errors import ConfigError
from distillkit.models import quiet_loading
from distillkit.objective.taps import NOTHING, TapRequest
from distillkit.run.engine import autocast_factory, make_accelerator
from distillkit.run.run import Run
from distillkit.run.teachers import load_teacher
from distillkit.teacher_cache import expected_meta, write_cache


def cache_teacher(
    config: DistillConfig,
    *,
    name: str = "teacher",
    directory: str | Path | None = None,
    with_eval: bool = False,
    request: TapRequest | None = None,
    layers: tuple[int, ...] | None | str = "objective",
) -> dict[str, Any]:
    """Runs one teacher of a run config over its data and writes the cache.

    Args:
        config: The run's config.
        name: Which teacher (``teacher`` or a name of ``teachers:``).
        directory: Where to write (default: that teacher's ``cache``).
        with_eval: Also cache the evaluation split (distill reads the training split only).
        request: What to store (default: what the objective's terms read of this teacher).
        layers: Hidden-state layers to store; ``"objective"``: the layers the terms read (all when some term
            reads hidden states without a layer map); None: all.

    Returns:
        ``{"directory", "examples", "bytes", "bytes_per_example", "seconds", "stored"}``.

    Raises:
        ConfigError: For an unknown teacher, no directory, or a teacher no term reads.

    """
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
    run = Run.prepare(config)
    if request is None or layers == "objective":
        request = request or run.objective.teacher_requests().get(name, NOTHING)
        layers = run.objective.teacher_layers(name) if layers == "objective" else layers
    if not request.needs_forward:
        raise ConfigError(f"no objective term reads teacher '{name}': there is nothing to cache")
    run.accelerator = accelerator = make_accelerator()
    with quiet_loading():
        teacher, _ = load_teacher(run, spec)
    teacher.to(accelerator.device)
    batch_size = config.train.eval_batch_size or config.train.batch_size
    splits = {"train": DataLoader(run.data.train, batch_size=batch_size, collate_fn=run.collator)}
    if with_eval:
        splits["eval"] = DataLoader(run.data.eval, batch_size=batch_size, collate_fn=run.collator)
    student_tokenizer = run.student_tokenizer if run.cross_tokenizer else None
    meta = expected_meta(config, teacher, run.tokenizer, accelerator.device, student_tokenizer)
    stats: dict[str, Any] = {"directory": str(directory)}
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
