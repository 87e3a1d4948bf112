"""The ``distillkit`` command line.

Commands: losses, distill, generate, cache-teacher, train-tokenizer, bench, study, doctor.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from collections.abc import Sequence

from distillkit.errors import DistillkitError

DESCRIPTION = (
    "Knowledge distillation for language models: every loss a plugin. Run 'distillkit COMMAND --help' for a "
    "command's options."
)


def _cmd_losses(args: argparse.Namespace) -> int:
    from distillkit.plugin_manager import failed_plugins
    from distillkit.registry import loss_registry, registration_errors

    registry = loss_registry()
    failures = [(info.name, info.distribution, info.version, info.error) for info in failed_plugins()]
    failures += [(name, "", "", error) for name, error in registration_errors().items()]
    if args.json:
        payload = {
            "losses": [
                {
                    "name": info.name,
                    "distribution": info.plugin.distribution,
                    "version": info.plugin.version,
                    "plugin": info.plugin.name,
                    "description": " ".join((info.cls.__doc__ or "").split()),
                    "cross_tokenizer": bool(info.cls.cross_tokenizer or not info.cls.uses_teacher),
                    "parameters": [
                        {"name": n, "type": t, "required": d == "required", "default": _json_value(d)}
                        for n, t, d in info.cls.describe_params()
                    ],
                }
                for info in registry.values()
            ],
            "failed": [{"plugin": n, "distribution": d, "version": v, "error": e} for n, d, v, e in failures],
        }
        print(json.dumps(payload, indent=2))
        return 0
    if not registry:
        print("no losses registered (no distillkit plugin loaded)")
    for name in sorted(registry):
        info = registry[name]
        print(f"{name}  ({info.plugin.distribution} {info.plugin.version}, plugin '{info.plugin.name}')")
        doc = (info.cls.__doc__ or "").strip().splitlines()
        if doc:
            print(f"    {doc[0]}")
        for param, type_name, default in info.cls.describe_params():
            shown = default if default == "required" else repr(default)
            print(f"    {param}: {type_name} = {shown}")
    if failures:
        print("\nplugins that failed to load:")
        for name, distribution, version, error in failures:
            source = f" ({distribution} {version})" if distribution else ""
            print(f"  {name}{source}: {error}")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in its help, unless it has none (None or False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _json_value(value: object) -> object:
    """A parameter default as a JSON value (None for a required parameter, text for non-JSON objects)."""
    if value == "required":
        return None
    try:
        json.dumps(value)
    except TypeError:
        return str(value)
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got '{text}'")
    return value


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(seed) for seed in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas, got '{text}'"
        ) from None


INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


def _command(*words: str, sets: Sequence[str] = (), flag: str | None = None) -> str:
    """The command line to type again (``--set`` overrides, then ``flag``), quoted for a POSIX shell."""
    return shlex.join(
        ["distillkit", *words, *(w for s in sets for w in ("--set", s)), *([flag] if flag else [])]
    )


def _cmd_distill(args: argparse.Namespace) -> int:
    from distillkit.run.distill import run_distill
    from distillkit.run.output_dir import LastCheckpoint

    watch = LastCheckpoint()
    sets = args.set or []
    try:
        run_distill(
            args.config, overrides=sets, resume=args.resume, overwrite=args.overwrite, callbacks=[watch]
        )
    except KeyboardInterrupt:
        if getattr(watch.loop, "bar", None) is not None:
            watch.loop.bar.close()  # end the progress bar's line
        if watch.main:
            print(f"distillkit: interrupted; {_resume_hint(watch.last_checkpoint, args)}", file=sys.stderr)
        return INTERRUPTED
    return 0


def _resume_hint(last: object, args: argparse.Namespace) -> str:
    """How to go on after an interrupted ``distillkit distill``: the last checkpoint and the command."""
    sets = args.set or []
    if last is None and args.overwrite:  # the previous run may still be there: replace it again
        again = _command("distill", args.config, sets=sets, flag="--overwrite")
        return f"no checkpoint was written; start again with: {again}"
    again = _command("distill", args.config, sets=sets, flag="--resume")
    if last is None:
        return f"no checkpoint was written yet; {again} starts it again from step 0"
    return f"the last checkpoint is {last}; continue with: {again}"


def _cmd_generate(args: argparse.Namespace) -> int:
    from distillkit.config import load_config
    from distillkit.run.generate import generate

    config = load_config(args.config, args.set or [])
    generate(config, args.output, model=args.model, limit=args.limit)
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from distillkit.study import run_study

    try:
        run_study(
            args.study,
            overrides=args.set or [],
            teacher_cache=not args.no_teacher_cache,
            jobs=args.jobs,
            variants=args.variants,
            seeds=args.seeds,
            output_dir=args.output_dir,
            report_only=args.report,
        )
    except KeyboardInterrupt:
        again = [args.study, *(["--output-dir", args.output_dir] if args.output_dir else [])]
        print(
            "distillkit: study interrupted; finished runs are kept and each interrupted run resumes from its "
            f"last checkpoint: continue with: {_command('study', *again, sets=args.set or [])}",
            file=sys.stderr,
        )
        return INTERRUPTED
    return 0


def _cmd_cache_teacher(args: argparse.Namespace) -> int:
    from distillkit.config import load_config
    from distillkit.run.cache_teacher import cache_teacher

    config = load_config(args.config, args.set or [])
    cache_teacher(config, name=args.teacher, directory=args.output, with_eval=args.with_eval)
    return 0


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from distillkit.config import load_config
    from distillkit.run.train_tokenizer import train_tokenizer

    stats = train_tokenizer(load_config(args.config, args.set or []), args.vocab_size, args.output)
    print(
        f"distillkit: a byte-level BPE tokenizer of {stats['vocab_size']:,} tokens trained on "
        f"{stats['texts']:,} training texts, saved to {stats['directory']} "
        f"({stats['shared_with_teacher']:,} token strings shared with the teacher's vocabulary)"
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from distillkit.bench.cli import run_bench_cli

    return run_bench_cli(args)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from distillkit.doctor import run_doctor

    return run_doctor()


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser of the ``distillkit`` command."""
    from distillkit import __version__

    parser = argparse.ArgumentParser(prog="distillkit", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"distillkit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(commands.add_parser, formatter_class=_HelpFormatter)

    losses = add("losses", help="list registered losses, their plugins and parameters")
    losses.add_argument("--json", action="store_true", help="machine-readable output")
    losses.set_defaults(handler=_cmd_losses)

    distill = add("distill", help="distil a teacher into a student from a YAML config")
    distill.add_argument("config", help="YAML config file")
    distill.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    again = distill.add_mutually_exclusive_group()
    again.add_argument(
        "--resume", action="store_true", help="continue the run in output_dir from its last checkpoint"
    )
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in output_dir (without either, an output_dir that is not empty is refused)",
    )
    distill.set_defaults(handler=_cmd_distill)

    generate = add(
        "generate", help="sample a causal LM's continuations of a config's prompts into JSON lines"
    )
    generate.add_argument("config", help="YAML config file (its prompts and train.generation settings)")
    generate.add_argument("--output", required=True, metavar="FILE.jsonl", help="where the samples go")
    generate.add_argument("--model", choices=("teacher", "student"), default="teacher", help="which model")
    generate.add_argument("--limit", type=_positive_int, metavar="N", help="only the first N prompts")
    generate.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    generate.set_defaults(handler=_cmd_generate)

    study = add("study", help="run objective variants x seeds and tabulate them")
    study.add_argument("study", help="STUDY.yaml")
    study.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a base-config field")
    study.add_argument(
        "--no-teacher-cache", action="store_true", help="run the teacher live in every run (no shared cache)"
    )
    study.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        help="runs at once, each in its own process (default: CPU cores / the study's threads_per_run); "
        "results do not depend on it",
    )
    study.add_argument("--variants", type=_names, metavar="A,B", help="run only these variants")
    study.add_argument("--seeds", type=_seeds, metavar="0,1", help="run only these seeds")
    study.add_argument("--output-dir", metavar="DIR", help="write runs and results here (not output_dir)")
    study.add_argument(
        "--report",
        action="store_true",
        help="run nothing: compare the runs finished so far (partial results)",
    )
    study.set_defaults(handler=_cmd_study)

    cache = add("cache-teacher", help="run a teacher once over the data and cache its outputs")
    cache.add_argument("config", help="YAML config file (the objective decides what is stored)")
    cache.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    cache.add_argument("--teacher", default="teacher", help="which teacher (a name of `teachers:`)")
    cache.add_argument("--output", default=None, help="cache directory (default: the teacher's `cache`)")
    cache.add_argument("--with-eval", action="store_true", help="also cache the evaluation split")
    cache.set_defaults(handler=_cmd_cache_teacher)

    train = add("train-tokenizer", help="train a byte-level BPE tokenizer for the student on the run's text")
    train.add_argument("config", help="YAML config file (its data; the teacher's special tokens)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    train.add_argument("--vocab-size", type=_positive_int, default=8000, help="vocabulary entries")
    train.add_argument("--output", default=None, help="directory (default: the config's student.tokenizer)")
    train.set_defaults(handler=_cmd_train_tokenizer)

    bench = add("bench", help="benchmark loss terms and the InfoNCE op")
    try:
        from distillkit.bench.cli import add_bench_arguments

        add_bench_arguments(bench)
    except ImportError:
        pass
    bench.set_defaults(handler=_cmd_bench)

    doctor = add("doctor", help="versions, GPUs, compiled ops and the CUDA self-check, for bug reports")
    doctor.set_defaults(handler=_cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except DistillkitError as exc:
        print(f"distillkit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
