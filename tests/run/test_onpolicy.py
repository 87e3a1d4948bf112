"""On-policy and sequence-level distillation end to end: the CLI, reproducibility, resume, generated data."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from distillkit import cli
from distillkit.config import config_from_dict
from distillkit.run import Run, TrainingLoop
from distillkit.run.distill import distill
from distillkit.run.runlog import read_jsonl
from tests.distill_fixtures import causal_lm_config, llama

TIMING = {"seconds", "sampled_tokens_per_second"}
"""Fields of a train record that are wall-clock measurements (everything else must reproduce exactly)."""


def _write(tmp_path, raw, name="config.yaml"):
    path = tmp_path / name
    path.write_text(json.dumps(raw), encoding="utf-8")  # JSON is YAML
    return path


def _train_records(directory):
    return [
        {k: v for k, v in record.items() if k not in TIMING}
        for record in read_jsonl(directory / "metrics.jsonl")
        if record["split"] == "train"
    ]


def test_an_on_policy_run_through_the_cli_samples_logs_and_reproduces(tmp_path):
    raw = causal_lm_config(tmp_path, {"student_fraction": 1.0, "prompt_tokens": 4}, steps=4, eval_every=2)
    path = _write(tmp_path, raw)
    for name in ("first", "again"):
        assert cli.main(["distill", str(path), "--set", f"output_dir={tmp_path / name}"]) == 0
    records = read_jsonl(tmp_path / "first" / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for record in train:
        assert record["sources"] == {"student": 1, "teacher": 0, "data": 0}
        assert 8 <= record["generated_tokens"] <= 8 * 12  # 8 prompts, 1 to 12 new tokens each
        assert record["seconds"]["sampling"] > 0 and record["sampled_tokens_per_second"] > 0
        assert math.isfinite(record["kd"]) and record["kd"] > 0
    evals = [r for r in records if r["split"] == "eval"]
    assert all(r["sample_nll"] > 0 and r["sampled_tokens"] > 0 for r in evals)
    assert _train_records(tmp_path / "first") == _train_records(tmp_path / "again")  # exactly, not approx
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("first", "again")]
    assert summaries[0]["student"]["eval"] == summaries[1]["student"]["eval"]
    assert summaries[0]["teacher"]["eval"]["sample_nll"] > 0  # the teacher's own samples: the reference


def test_a_run_resumed_mid_way_samples_and_trains_bit_for_bit_as_an_uninterrupted_one(tmp_path):
    generation = {"student_fraction": 0.5, "teacher_fraction": 0.25, "prompt_tokens": 3}
    raw = causal_lm_config(tmp_path, generation, steps=6, save_every=2, grad_accum=2, batch_size=4)
    whole, parted = copy.deepcopy(raw), copy.deepcopy(raw)
    whole["output_dir"], parted["output_dir"] = str(tmp_path / "whole"), str(tmp_path / "parted")
    distill(config_from_dict(whole))
    assert distill(config_from_dict(parted), stop_after_step=3)["stopped_early"]
    state = json.loads((tmp_path / "parted" / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert "draw" in state["extra"]["sequences"]  # the draw's generator is in the checkpoint
    distill(config_from_dict(parted), resume=True)
    for part in ("student", "optimizer"):
        a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-00000006" / f"{part}.safetensors"))
        b = load_file(str(tmp_path / "parted" / "checkpoints" / "step-00000006" / f"{part}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    whole_records, parted_records = _train_records(tmp_path / "whole"), _train_records(tmp_path / "parted")
    assert whole_records == parted_records
    drawn = {k: sum(r["sources"][k] for r in whole_records) for k in ("student", "teacher", "data")}
    assert all(drawn.values()) and sum(drawn.values()) == 12  # every source drawn; 6 steps x 2 micro-batches


def test_generated_text_trains_as_data(tmp_path):
    raw = causal_lm_config(tmp_path, {"student_fraction": 0.0, "prompt_tokens": 4}, steps=3)
    config = _write(tmp_path, raw)
    out = tmp_path / "samples" / "teacher.jsonl"
    assert cli.main(["generate", str(config), "--output", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 16 and all({"prompt", "completion", "text"} <= set(line) for line in lines)
    assert all(line["text"].startswith(line["prompt"]) for line in lines)
    meta = json.loads((tmp_path / "samples" / "teacher.jsonl.meta.json").read_text())
    assert meta["model"] == "teacher" and len(meta["fingerprint"]) == 16
    assert meta["sampling"]["prompt_tokens"] == 4 and meta["sampling"]["temperature"] == 1.0
    few = tmp_path / "samples" / "few.jsonl"
    assert (
        cli.main(["generate", str(config), "--output", str(few), "--limit", "3", "--model", "student"]) == 0
    )
    assert len(few.read_text().splitlines()) == 3
    assert json.loads((tmp_path / "samples" / "few.jsonl.meta.json").read_text())["model"] == "student"
    as_data = causal_lm_config(tmp_path, steps=3)
    as_data["data"] = {"path": str(out), "text_column": "text", "max_length": 8, "eval_fraction": 0.34}
    as_data["output_dir"] = str(tmp_path / "seqkd")
    assert cli.main(["distill", str(_write(tmp_path, as_data, "seqkd.yaml"))]) == 0
    assert json.loads((tmp_path / "seqkd" / "summary.json").read_text())["steps"] == 3
    pairs = copy.deepcopy(as_data)  # the prompt and completion columns: the loss on the completions only
    pairs["data"] = {"path": str(out), "prompt_column": "prompt", "completion_column": "completion"}
    pairs["data"].update(max_length=16, eval_fraction=0.34)
    pairs["output_dir"] = str(tmp_path / "pairs")
    assert cli.main(["distill", str(_write(tmp_path, pairs, "pairs.yaml"))]) == 0


def test_prompt_completion_data_count_only_completions_and_sample_from_the_prompts(tmp_path):
    rows = [
        {"prompt": f"the film was {w}", "completion": f"and the plot {v} ."}
        for w, v in [("good", "fine"), ("bad", "dull"), ("great", "warm"), ("awful", "cold")] * 6
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    raw = causal_lm_config(tmp_path, {"student_fraction": 0.5, "prompt_tokens": 3}, steps=4, batch_size=4)
    raw["data"] = {"path": str(data), "prompt_column": "prompt", "completion_column": "completion"}
    raw["data"].update(max_length=12, eval_fraction=0.2)
    run = Run.prepare(config_from_dict(raw))
    row = run.data.train[0]
    assert row["prompt_lengths"] == 3  # "the film was good" is 4 tokens: the last 3 are kept
    batch = run.collator([run.data.train[i] for i in range(2)])
    for i in range(2):
        prompt, real = int(batch["prompt_lengths"][i]), int(batch["attention_mask"][i].sum())
        counted = (batch["labels"][i] != -100).nonzero().flatten().tolist()
        assert counted == list(range(prompt - 1, real - 1))  # positions predicting completion tokens
        assert int(batch["input_ids"][i, real - 1]) == run.tokenizer.sep_token_id  # the end-of-text token
    summary = distill(config_from_dict(raw))
    assert summary["steps"] == 4 and summary["student"]["eval"]["sample_nll"] > 0


def test_fused_output_layers_and_logits_agree_on_sampled_steps(tmp_path):
    losses = {}
    for mode in ("always", "never"):
        raw = causal_lm_config(
            tmp_path,
            {"student_fraction": 1.0, "prompt_tokens": 4},
            objective=[
                {"loss": "kd", "divergence": "jsd", "temperature": 1.0},
                {"loss": "ce", "weight": 0.5},
            ],
            steps=2,
            fused_logits=mode,
        )
        raw["output_dir"] = str(tmp_path / mode)
        loop = TrainingLoop(Run.from_config(config_from_dict(raw)))
        assert loop.objective.output_layer == (mode == "always")
        losses[mode] = loop.fit().logged
    for fused, plain in zip(losses["always"], losses["never"], strict=True):
        assert fused["generated_tokens"] == plain["generated_tokens"]
        assert fused["kd"] == pytest.approx(plain["kd"], rel=1e-4)
        assert fused["ce"] == pytest.approx(plain["ce"], rel=1e-4)


def test_several_teachers_read_the_sampled_sequences(tmp_path):
    raw = causal_lm_config(
        tmp_path,
        {"student_fraction": 0.5, "teacher_fraction": 0.5, "prompt_tokens": 4},
        objective=[
            {"loss": "kd", "temperature": 1.0, "teacher": ["teacher", "wide"], "teacher_weights": [0.5, 0.5]},
            {"loss": "l2", "weight": 0.1, "teacher": "wide"},
        ],
        steps=3,
        log_every=1,
    )
    raw["teachers"] = {"wide": {"config": {**llama(2, 48), "vocab_size": 31}}}
    summary = distill(config_from_dict(raw))
    records = _train_records(tmp_path / "run")
    assert summary["steps"] == 3 and all(r["generated_tokens"] > 0 for r in records)
    assert all(math.isfinite(r["kd"]) and math.isfinite(r["l2"]) for r in records)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["task=masked_lm"], "train.generation is for task 'causal_lm'"),
        (["train.generation.student_fraction=1.5"], "train.generation.student_fraction"),
        (["train.generation.teacher_fraction=-0.1"], "train.generation.teacher_fraction"),
        (["train.generation.teacher_fraction=0.7"], "student_fraction + teacher_fraction is 1.2"),
        (["train.generation.prompt_tokens=16"], "prompt_tokens (16) must be below data.max_length (16)"),
        (["train.generation.max_new_tokens=13"], "set max_new_tokens to at most 12"),
        (["teacher.cache=somewhere"], "remove teacher.cache"),
        (["data.prompt_column=prompt"], "data.prompt_column needs data.completion_column"),
    ],
)
def test_bad_generation_settings_are_refused_before_anything_loads(tmp_path, capsys, setting, message):
    raw = causal_lm_config(tmp_path, {"student_fraction": 0.5, "prompt_tokens": 4})
    raw["teacher"] = {"path": str(tmp_path / "no-such-model")}  # loading any weights would fail otherwise
    path = _write(tmp_path, raw)
    overrides = [part for item in setting for part in ("--set", item)]
    assert cli.main(["distill", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert cli.main(["generate", str(path), "--output", str(tmp_path / "x.jsonl"), *overrides]) == 2


def test_sampling_under_fsdp_is_refused_before_weights_load(tmp_path):
    from distillkit.config import config_from_dict
    from distillkit.errors import ConfigError

    raw = causal_lm_config(tmp_path, {"student_fraction": 0.5, "prompt_tokens": 4, "max_new_tokens": 2})
    raw["train"]["strategy"] = "fsdp"
    with pytest.raises(ConfigError, match="use train.strategy: ddp for sampled sequences"):
        config_from_dict(raw)
