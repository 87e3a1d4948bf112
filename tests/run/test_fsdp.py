"""``train.strategy: fsdp`` (FSDP2) in two gloo processes: the same training as ``ddp``, step for step.

The runs are a tiny causal LM (tied input/output embeddings, so the fused linear-divergence op reads the
student's sharded output layer through the root unit) distilled with ``kd`` + ``ce`` + ``codir`` (a queue bank
all-gathered across processes), two micro-batches per step (accumulated without synchronising), evaluated
every two steps. ``ddp`` and ``fsdp`` compute the same sums in another order (all-reduce against
reduce-scatter, the gradient norm from shards), so losses and weights agree to float32 rounding (1e-5 here;
a real difference, e.g. a rank training on its own gradients, shows at 1e-2). An interrupted ``fsdp`` run
resumed from its sharded checkpoint equals the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from distillkit.bench.step import compare_logit_paths
from distillkit.config import config_from_dict
from distillkit.errors import ConfigError
from distillkit.run.cache_teacher import cache_teacher
from distillkit.run.run import Run
from tests.distill_fixtures import bert, llama, text_config, tiny_config

WORKER = Path(__file__).with_name("distill_worker.py")
MEMORY_BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "fsdp_memory.py"
STEPS = 4
TERMS = ("total", "kd", "ce", "codir")


def _lm_config(tmp_path: Path, name: str, strategy: str, **train) -> Path:
    teacher = {**llama(4, 32), "tie_word_embeddings": True}
    objective = [
        {"loss": "kd", "weight": 1.0, "temperature": 2.0},
        {"loss": "ce", "weight": 0.5},
        {"loss": "codir", "weight": 0.1, "dim": 8, "temperature": 0.1, "bank": {"kind": "queue", "size": 24}},
    ]
    raw = text_config(tmp_path, "causal_lm", teacher, objective)
    raw["student"] = {"layers": 2}
    raw["train"].update(
        steps=STEPS, batch_size=2, grad_accum=2, save_every=2, eval_every=2, precision="fp32",
        report_to=[], strategy=strategy, **train,
    )  # fmt: skip
    raw["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def _variant(config: Path, directory: Path, strategy: str) -> Path:
    """``config`` (its data, so its checkpoints' fingerprint) writing to ``directory`` with ``strategy``."""
    raw = json.loads(config.read_text(encoding="utf-8"))
    raw["output_dir"], raw["train"]["strategy"] = str(directory), strategy
    path = directory.with_suffix(".yaml")
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def _launch(config: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """Runs ``distill`` in ``processes`` processes (``torch.distributed.run``; one: a plain process)."""
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
        command += [str(WORKER), str(config), *args]
    else:
        command = [sys.executable, "-m", "distillkit.cli", "distill", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=config.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _records(run: Path, split: str = "train") -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _student(run: Path, auto=AutoModelForCausalLM) -> dict[str, torch.Tensor]:
    return auto.from_pretrained(run / "student").state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same tiny causal-LM run under ddp and under fsdp, two processes each."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    done = {}
    for strategy in ("ddp", "fsdp"):
        _launch(_lm_config(tmp_path, strategy, strategy))
        done[strategy] = tmp_path / strategy
    return done


def test_fsdp_trains_like_ddp_step_for_step(runs):
    ddp, fsdp = _records(runs["ddp"]), _records(runs["fsdp"])
    assert [r["step"] for r in fsdp] == list(range(1, STEPS + 1))
    for one, two in zip(ddp, fsdp, strict=True):
        for term in TERMS:
            assert two[term] == pytest.approx(one[term], rel=1e-5, abs=1e-6), (one["step"], term)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4), one["step"]
    for one, two in zip(_records(runs["ddp"], "eval"), _records(runs["fsdp"], "eval"), strict=True):
        assert two["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)  # gathered evaluation
        assert two["positions"] == one["positions"] == 30 and two["agreement"] == one["agreement"]
    summaries = [json.loads((runs[s] / "summary.json").read_text(encoding="utf-8")) for s in ("ddp", "fsdp")]
    for side in ("student", "teacher"):  # whole models counted, not shards
        assert summaries[1][side]["parameters"] == summaries[0][side]["parameters"]
    replicated, sharded = _student(runs["ddp"]), _student(runs["fsdp"])  # transformers loads the student
    assert replicated.keys() == sharded.keys()
    for name, value in replicated.items():
        torch.testing.assert_close(sharded[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_fsdp_checkpoints_are_sharded_by_every_process(runs):
    checkpoint = runs["fsdp"] / "checkpoints" / f"step-{STEPS:08d}"
    state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    assert state["format"] == "dcp" and state["processes"] == 2 and state["step"] == STEPS
    assert sorted(p.name for p in (checkpoint / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (checkpoint / "dcp" / ".metadata").exists()
    assert sorted(p.name for p in (checkpoint / "rng").iterdir()) == [
        "rank-00000.json", "rank-00000.safetensors", "rank-00001.json", "rank-00001.safetensors",
    ]  # fmt: skip
    checksums = state["extra"]["buffer_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # the codir bank agrees across processes
    assert not list((runs["fsdp"] / "checkpoints").glob(".tmp-*"))


def test_an_interrupted_fsdp_run_resumes_to_the_same_result(runs, tmp_path):
    # teacher offload keeps the teacher's shards in host memory: on a CPU it changes nothing, not even bits
    config = _lm_config(tmp_path, "parted", "fsdp", fsdp={"teacher_offload": True})
    _launch(config, "--stop-after-step", "3")
    assert not (tmp_path / "parted" / "student").exists()
    resumed = _launch(config, "--resume")
    assert "resumed from" in resumed.stdout and "step-00000003" in resumed.stdout
    for one, two in zip(_records(runs["fsdp"]), _records(tmp_path / "parted"), strict=True):
        assert {t: two[t] for t in TERMS} == {t: one[t] for t in TERMS}, one["step"]  # bit for bit
    whole, parted = _student(runs["fsdp"]), _student(tmp_path / "parted")
    assert all(torch.equal(parted[name], value) for name, value in whole.items())


def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(runs, tmp_path):
    copy = tmp_path / "fsdp"
    shutil.copytree(runs["fsdp"], copy, ignore=shutil.ignore_patterns("student"))
    config = _variant(runs["fsdp"].with_suffix(".yaml"), copy, "fsdp")
    result = _launch(config, "--resume", processes=1)  # the final checkpoint, resharded from 2 to 1
    assert "written by 2 processes and is resharded to 1" in result.stdout
    whole, resharded = _student(runs["fsdp"]), _student(copy)
    assert all(torch.equal(resharded[name], value) for name, value in whole.items())


def test_a_checkpoint_of_the_other_strategy_is_refused(runs, tmp_path):
    shutil.copytree(runs["fsdp"], tmp_path / "fsdp", ignore=shutil.ignore_patterns("student"))
    config = _variant(runs["fsdp"].with_suffix(".yaml"), tmp_path / "fsdp", "ddp")
    command = [sys.executable, "-m", "distillkit.cli", "distill", str(config), "--resume"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2
    assert "written with train.strategy: fsdp" in result.stderr and "Traceback" not in result.stderr


def test_a_finetuned_teacher_and_a_cached_one_train_alike_under_fsdp_and_ddp(tmp_path):
    raw = tiny_config(tmp_path, steps=3, batch_size=4, precision="fp32", report_to=[], save_every=3)
    raw["teacher"]["config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    raw["teachers"] = {"wide": {"config": bert(2, 48), "cache": str(tmp_path / "wide-cache")}}
    raw["objective"] = [
        {"loss": "kd", "weight": 1.0, "temperature": 2.0, "teacher": ["teacher", "wide"]},
        {"loss": "l2", "weight": 0.5, "teacher": "wide"},  # a projection head 32 -> 48 in the root unit
        {"loss": "ce", "weight": 1.0},
    ]
    cache_teacher(config_from_dict(raw), name="wide")
    runs = {}
    for strategy in ("ddp", "fsdp"):  # each fine-tunes the main teacher (replicated), then distils
        raw["teacher"]["finetune"] = {"steps": 2, "batch_size": 8, "cache_dir": str(tmp_path / strategy)}
        raw["train"]["strategy"] = strategy
        raw["output_dir"] = str(tmp_path / strategy / "run")
        path = tmp_path / f"{strategy}.yaml"
        path.write_text(json.dumps(raw), encoding="utf-8")
        output = _launch(path).stdout
        assert "fine-tuning the teacher for 2 steps" in output and "outputs read from the cache" in output
        runs[strategy] = tmp_path / strategy / "run"
    for one, two in zip(_records(runs["ddp"]), _records(runs["fsdp"]), strict=True):
        for term in ("total", "kd", "l2", "ce"):
            assert two[term] == pytest.approx(one[term], rel=1e-5, abs=1e-6), (one["step"], term)
    accuracy = [_records(runs[s], "eval")[-1]["accuracy"] for s in ("ddp", "fsdp")]
    assert accuracy[0] == accuracy[1]
    replicated = _student(runs["ddp"], AutoModelForSequenceClassification)
    sharded = _student(runs["fsdp"], AutoModelForSequenceClassification)
    for name, value in replicated.items():
        torch.testing.assert_close(sharded[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_fsdp_holds_half_the_training_state_per_process(tmp_path):
    config = _lm_config(tmp_path, "memory", "ddp")
    command = [sys.executable, str(MEMORY_BENCHMARK), "--config", str(config), "--variants", "ddp,fsdp"]
    command += ["--student-layers", "2", "--steps", "1", "--batch-size", "2", "--max-length", "16"]
    command += ["--json", str(tmp_path / "memory.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| fsdp | 1 |" in result.stdout  # the table
    records = json.loads((tmp_path / "memory.json").read_text(encoding="utf-8"))
    assert [r["rank"] for r in records["ddp"]] == [r["rank"] for r in records["fsdp"]] == [0, 1]
    for replicated, sharded in zip(records["ddp"], records["fsdp"], strict=True):
        for part in ("student_params", "student_grads", "optimizer_state"):
            assert 0.45 < sharded[part] / replicated[part] < 0.55, part  # a few rows are padded
        assert sharded["teacher_device"] < replicated["teacher_device"]  # blocks sharded, the rest not
        assert sharded["final_loss"] == pytest.approx(replicated["final_loss"], rel=1e-5)


def test_fsdp_settings_without_fsdp_and_unshardable_models_are_refused_before_loading(tmp_path):
    raw = tiny_config(tmp_path)
    raw["train"]["fsdp"] = {"teacher_offload": True}
    with pytest.raises(ConfigError, match="train.fsdp \\(teacher_offload\\) applies to train.strategy: fsdp"):
        config_from_dict(raw)
    raw["train"]["fsdp"] = {"teacher_offload": False}  # the default, as a dumped config holds it: accepted
    assert config_from_dict(raw).train.strategy == "ddp"
    raw = tiny_config(tmp_path, strategy="fsdp")
    raw["teacher"]["config"] = {  # ALBERT shares one layer group across its depth: no block per layer
        "model_type": "albert", "vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64, "embedding_size": 16,
    }  # fmt: skip
    with pytest.raises(
        ConfigError, match="train.strategy: fsdp shards each transformer block, but the student"
    ):
        Run.prepare(config_from_dict(raw))


def test_the_step_benchmark_times_an_fsdp_step_with_either_logit_path(tmp_path):
    raw = text_config(tmp_path, "causal_lm", llama(2, 32), [{"loss": "kd", "ce_weight": 0.5}], batch_size=4)
    raw["train"].update(strategy="fsdp", precision="fp32")
    results = compare_logit_paths(config_from_dict(raw), repeats=1, warmup=0)  # one fresh process each
    assert not results["never"]["fused_logits"] and results["always"]["fused_logits"]
    assert results["always"]["first_losses"]["kd"] == pytest.approx(
        results["never"]["first_losses"]["kd"], rel=1e-5
    )  # the fused op on the sharded root's output layer computes what the logits give
