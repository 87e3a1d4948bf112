import csv
import json
import math
import statistics

import pytest
import yaml

from distillkit.errors import ConfigError
from distillkit.study import load_study, paired_difference, run_study
from distillkit.study.spec import identity_changes, run_identity
from tests.distill_fixtures import bert, causal_lm_config, tiny_config


def _write_study(tmp_path, variants=None, student=None, **extra):
    base = tiny_config(tmp_path, steps=3)
    base["student"] = student or base["student"]
    base["teacher"]["finetune"] = {
        "steps": 3,
        "batch_size": 8,
        "lr": 1e-2,
        "cache_dir": str(tmp_path / "cache"),
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    study = {
        "base": "base.yaml",
        "overrides": ["train.steps=2"],
        "variants": variants
        or {"none": [{"loss": "ce"}], "kd+l2": [{"loss": "kd", "temperature": 2.0}, {"loss": "l2"}]},
        "seeds": [0, 1],
        "output_dir": str(tmp_path / "study"),
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


def summary_examples(out):
    return json.loads((out / "none" / "seed-0" / "summary.json").read_text(encoding="utf-8"))["eval_examples"]


def _per_seed(rows, metric="accuracy"):
    return {row["variant"]: row["values"][metric] for row in rows}


# -- the paired interval ------------------------------------------------------------------------------------
T_975 = {1: 12.706204736174707, 2: 4.302652729749464, 4: 2.7764451051977934}  # Student's t tables


@pytest.mark.parametrize("n", [2, 3, 5])
def test_paired_difference_matches_the_textbook_interval(n):
    base = {s: 0.70 + 0.013 * s * s for s in range(n)}
    variant = {s: base[s] + 0.01 + 0.004 * (-1) ** s for s in range(n)}
    variant[99] = 1.0  # a seed the baseline did not run is not paired
    diff = paired_difference(base, variant)
    d = [variant[s] - base[s] for s in range(n)]
    mean = math.fsum(d) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    half = T_975[n - 1] * sd / math.sqrt(n)
    assert diff.seeds == tuple(range(n)) and diff.n == n
    assert diff.mean == pytest.approx(mean, abs=1e-12)
    assert (diff.low, diff.high) == pytest.approx((mean - half, mean + half), abs=1e-9)
    assert diff.excludes_zero == (mean - half > 0 or mean + half < 0)


def test_paired_difference_marks_only_intervals_that_exclude_zero():
    base = {0: 0.5, 1: 0.6, 2: 0.7}
    assert paired_difference(base, {s: v + 0.02 + 0.001 * s for s, v in base.items()}).excludes_zero
    assert paired_difference(base, {s: v - 0.02 - 0.001 * s for s, v in base.items()}).excludes_zero
    noisy = paired_difference(base, {0: 0.55, 1: 0.55, 2: 0.75})
    assert noisy.low < 0 < noisy.high and not noisy.excludes_zero
    single = paired_difference({0: 0.5}, {0: 0.6})
    assert single.mean == pytest.approx(0.1) and math.isnan(single.low) and not single.excludes_zero


# -- the runner ---------------------------------------------------------------------------------------------
def test_study_compares_to_the_baseline_and_skips_finished_runs(tmp_path, capsys):
    path = _write_study(tmp_path, baseline="none")
    rows = run_study(path, jobs=1)
    out = tmp_path / "study"
    assert [r["variant"] for r in rows] == ["none", "kd+l2"]
    assert all(r["runs"] == 2 for r in rows)
    assert "term.kd" in rows[1] and "term.kd" not in rows[0]
    assert "delta" not in rows[0]
    values = _per_seed(rows)
    delta = rows[1]["delta"]["accuracy"]
    assert delta.mean == pytest.approx(
        statistics.fmean(values["kd+l2"][s] - values["none"][s] for s in (0, 1))
    )
    boot = rows[1]["bootstrap"]["accuracy"]
    assert boot is not None and boot.mean == pytest.approx(delta.mean) and boot.seeds == 2
    assert rows[1]["holm"]["accuracy"] == boot.p_value  # one comparison: Holm changes nothing
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "95% CI, seeds × examples" in table and "(baseline)" in table and "Noise floor" in table
    assert "| kd+l2 | none | 2 |" in table
    assert "would have been seen" in table or "difference detected" in table
    with open(out / "results.csv", encoding="utf-8") as handle:
        rows_csv = list(csv.DictReader(handle))
    assert [r["variant"] for r in rows_csv] == ["none", "kd+l2"]
    assert float(rows_csv[1]["accuracy_seed1"]) == values["kd+l2"][1]
    assert float(rows_csv[1]["accuracy_boot_p"]) == boot.p_value
    comparison = json.loads((out / "results.json").read_text())["rows"][1]["comparison"]["accuracy"]
    assert comparison["t"]["n"] == 2 and comparison["bootstrap"]["examples"] == summary_examples(out)
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "results-examples.csv.gz").is_file()
    summary = json.loads((out / "none" / "seed-1" / "summary.json").read_text(encoding="utf-8"))
    assert summary["steps"] == 2
    # the teacher was fine-tuned once and shared
    assert len(list((tmp_path / "cache").iterdir())) == 1
    printed = capsys.readouterr().out
    assert "| kd+l2 | none | 2 |" in printed and str(out / "results.md") in printed

    stamp = (out / "none" / "seed-0" / "summary.json").stat().st_mtime_ns
    run_study(path, jobs=1)
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4
    assert (out / "none" / "seed-0" / "summary.json").stat().st_mtime_ns == stamp

    # --report compares what has finished and runs nothing
    (out / "kd+l2" / "seed-1" / "summary.json").unlink()
    rows = run_study(path, report_only=True)
    assert [r["runs"] for r in rows] == [2, 1] and rows[1]["delta"]["accuracy"].seeds == (0,)
    assert "Partial: 3 of 4 runs finished" in (out / "results.md").read_text(encoding="utf-8")
    assert not (out / "kd+l2" / "seed-1" / "summary.json").exists()
    with pytest.raises(ConfigError, match="no run of the study .* has finished yet"):
        run_study(path, report_only=True, output_dir=str(tmp_path / "empty"))


def test_a_changed_variant_reruns_only_its_own_runs(tmp_path, capsys):
    path = _write_study(tmp_path)
    run_study(path, jobs=1)
    out = tmp_path / "study"
    kept = (out / "none" / "seed-0" / "summary.json").stat().st_mtime_ns
    old = json.loads((out / "kd+l2" / "seed-0" / "summary.json").read_text())
    capsys.readouterr()
    path = _write_study(
        tmp_path, variants={"none": [{"loss": "ce"}], "kd+l2": [{"loss": "kd"}, {"loss": "l2"}]}
    )
    run_study(path, jobs=1)
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 2
    assert "kd+l2/seed-0: changed config.objective; runs again" in printed
    assert (out / "none" / "seed-0" / "summary.json").stat().st_mtime_ns == kept
    assert json.loads((out / "kd+l2" / "seed-0.stale" / "summary.json").read_text()) == old
    # a changed base config reaches every run
    capsys.readouterr()
    run_study(path, overrides=["train.lr=0.02"], jobs=1)
    assert capsys.readouterr().out.count("changed config.train.lr") == 4


def test_runs_of_one_seed_share_the_initialisation(tmp_path):
    """With a learning rate too small to move a float32 weight, a seed's variants are one student."""
    path = _write_study(
        tmp_path,
        student={"config": bert(2, 16)},  # randomly initialised: the seed decides the weights
        variants={"ce": [{"loss": "ce"}], "kd": [{"loss": "kd"}]},
        overrides=["train.steps=2", "train.lr=1e-15"],
        metric=["loss", "accuracy"],
        seeds=3,
    )
    rows = run_study(path, jobs=1)
    values = _per_seed(rows, "loss")
    assert values["ce"] == values["kd"]
    assert len(set(values["ce"].values())) == 3
    assert rows[1]["delta"]["loss"].mean == 0.0 and rows[1]["delta"]["accuracy"].n == 3


def test_parallel_jobs_give_the_same_results(tmp_path, capsys):
    every = ["accuracy", "f1", "loss"]
    path = _write_study(tmp_path, seeds=[0, 1], metric=every)
    sequential = run_study(path, jobs=1)
    capsys.readouterr()
    path = _write_study(tmp_path, seeds=[0, 1], metric=every, output_dir=str(tmp_path / "parallel"))
    queued = tmp_path / "parallel" / "kd+l2" / "seed-0"  # what an interrupted study leaves of a queued run
    queued.mkdir(parents=True)
    (queued / "study.log").write_text("", encoding="utf-8")
    parallel = run_study(path, jobs=2)
    printed = capsys.readouterr().out
    assert "2 at a time" in printed and "runs again" not in printed
    assert (tmp_path / "parallel" / "kd+l2" / "seed-1" / "study.log").is_file()
    for metric in every:
        assert _per_seed(parallel, metric) == _per_seed(sequential, metric)
    terms = [k for k in sequential[1] if k.startswith("term.")]
    assert [parallel[1][t] for t in terms] == [sequential[1][t] for t in terms]


def test_study_validates_every_variant_first(tmp_path):
    path = _write_study(tmp_path, variants={"ok": [{"loss": "ce"}], "bad": [{"loss": "kd", "temp": 2}]})
    with pytest.raises(ConfigError, match="study variant 'bad'.*does not accept parameter 'temp'"):
        run_study(path)
    assert not (tmp_path / "study").exists()


def test_study_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_study(tmp_path / "nope.yaml")
    path = _write_study(tmp_path, variants={"a b": [{"loss": "ce"}]})
    with pytest.raises(ConfigError, match="variant name 'a b'"):
        load_study(path)
    with pytest.raises(ConfigError, match="baseline 'kd' is not a variant"):
        load_study(_write_study(tmp_path, baseline="kd"))
    with pytest.raises(
        ConfigError, match="does not report metric 'perplexity'; it reports accuracy, f1, loss"
    ):
        load_study(_write_study(tmp_path, metric="perplexity"))
    with pytest.raises(ConfigError, match="seeds"):
        load_study(_write_study(tmp_path, seeds=0))
    study, runs = load_study(_write_study(tmp_path, seeds=3))
    assert study.seed_list == [0, 1, 2] and len(runs) == 6


def test_a_study_narrowed_to_some_variants_and_seeds(tmp_path):
    path = _write_study(tmp_path, seeds=3)
    _, runs = load_study(path)
    assert list(runs)[:3] == ["none/seed-0", "kd+l2/seed-0", "none/seed-1"]  # seed by seed
    study, runs = load_study(path, variants=["kd+l2"], seeds=[2, 0], output_dir=str(tmp_path / "elsewhere"))
    assert list(runs) == ["kd+l2/seed-0", "kd+l2/seed-2"]
    assert runs["kd+l2/seed-2"].output_dir == str(tmp_path / "elsewhere" / "kd+l2" / "seed-2")
    with pytest.raises(ConfigError, match="has no variant 'kd'; its variants: none, kd\\+l2"):
        load_study(path, variants=["kd"])
    with pytest.raises(ConfigError, match="has no seed 7; its seeds: 0, 1, 2"):
        load_study(path, seeds=[7])


def test_a_field_added_by_a_later_version_keeps_finished_runs_at_its_default(tmp_path):
    """A record written before a config field existed matches while the field holds its default."""
    _, runs = load_study(_write_study(tmp_path))
    current = run_identity(next(iter(runs.values())), 1)
    recorded = json.loads(json.dumps(current))
    del recorded["config"]["train"]["fused_logits"]
    del recorded["config"]["data"]
    assert identity_changes(recorded, current) == ["config.data"]  # a whole section is not a field
    del current["config"]["data"]
    assert identity_changes(recorded, current) == []
    current["config"]["train"]["fused_logits"] = "never"
    assert identity_changes(recorded, current) == ["config.train.fused_logits"]
    recorded["config"]["train"]["lr"] = 1.0
    assert identity_changes(recorded, current) == ["config.train.fused_logits", "config.train.lr"]


def test_a_live_study_runs_one_run_alone_only_while_the_teacher_is_not_fine_tuned(tmp_path):
    from distillkit.study.runner import _first_to_tune_teacher

    path = _write_study(tmp_path)
    _, runs = load_study(path)
    assert _first_to_tune_teacher(runs) == "none/seed-0"
    cached = {
        k: c.model_copy(update={"teacher": c.teacher.model_copy(update={"cache": "x"})})
        for k, c in runs.items()
    }
    assert _first_to_tune_teacher(cached) is None  # runs reading the study's teacher cache load no teacher
    run_study(path, teacher_cache=False, jobs=1, variants=["none"], seeds=[0])  # fine-tunes the teacher
    _, runs = load_study(path)
    assert _first_to_tune_teacher(runs) is None
    changed = {
        k: c.model_copy(update={"data": c.data.model_copy(update={"max_length": c.data.max_length - 1})})
        for k, c in runs.items()
    }
    assert _first_to_tune_teacher(changed) == "none/seed-0"  # another data setting tunes another teacher


def _write_onpolicy_study(tmp_path, variants, **extra):
    base = causal_lm_config(tmp_path, {"student_fraction": 0.0, "prompt_tokens": 4}, steps=2, report_to=[])
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    study = {
        "base": "base.yaml",
        "variants": variants,
        "seeds": [0],
        "metric": ["sample_nll", "perplexity"],
        "output_dir": str(tmp_path / "study"),
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


ON_POLICY = {
    "objective": [{"loss": "kd", "temperature": 1.0, "divergence": "reverse_kl"}],
    "overrides": ["train.generation.student_fraction=1.0"],
}


def test_variants_override_the_base_config_for_themselves(tmp_path):
    path = _write_onpolicy_study(tmp_path, {"offline": [{"loss": "kd", "temperature": 1.0}], "on": ON_POLICY})
    study, runs = load_study(path, overrides=["train.generation.prompt_tokens=3"])
    offline, on = runs["offline/seed-0"], runs["on/seed-0"]
    assert offline.train.generation.student_fraction == 0.0 and on.train.generation.student_fraction == 1.0
    assert on.objective[0].params()["divergence"] == "reverse_kl"
    assert offline.train.generation.prompt_tokens == on.train.generation.prompt_tokens == 3  # --set: all
    assert study.variants["offline"].overrides == []
    for owned in ("objective=[]", "train.seed=3", "output_dir=x"):
        bad = {"objective": ON_POLICY["objective"], "overrides": [owned]}
        with pytest.raises(ConfigError, match="which the study sets for every run"):
            load_study(_write_onpolicy_study(tmp_path, {"bad": bad}))
    typo = {"objective": ON_POLICY["objective"], "overrides": ["train.generation.student_fraction=2"]}
    with pytest.raises(ConfigError, match="study variant 'bad'.*student_fraction"):
        load_study(_write_onpolicy_study(tmp_path, {"bad": typo}))


def test_a_study_of_sampled_variants_runs_the_teacher_live_and_compares_sample_nll(tmp_path, capsys):
    path = _write_onpolicy_study(tmp_path, {"offline": [{"loss": "kd", "temperature": 1.0}], "on": ON_POLICY})
    rows = run_study(path, jobs=1)
    assert not (tmp_path / "study" / "teacher-cache").exists()
    assert "some runs sample sequences" in capsys.readouterr().out
    assert [r["variant"] for r in rows] == ["offline", "on"]
    assert {"sample_nll", "perplexity"} <= set(rows[1]["delta"])
    table = (tmp_path / "study" / "results.md").read_text(encoding="utf-8")
    section = table[table.index("**sample_nll**") :]
    assert "| on | offline |" in section.split("\n\n**")[0]
