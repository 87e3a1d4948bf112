import pytest
import torch

from distillkit import DistillationObjective, Taps, build_term
from distillkit.errors import ConfigError, LossTermError, MissingOutputError, UnknownLossError
from distillkit.objective.terms import ModelDims
from tests.conftest import run_models

THREE_TERMS = [
    {"loss": "kd", "weight": 1.0, "temperature": 2.0},
    {"loss": "l2", "weight": 0.5, "layer_map": "uniform"},
    {
        "loss": "codir",
        "weight": 0.1,
        "layer_map": "uniform",
        "pooling": "mean",
        "temperature": 0.07,
        "bank": {"kind": "queue", "size": 64},
    },
]


def test_three_term_objective_total_is_weighted_sum(student, teacher, dims, batch):
    objective = DistillationObjective.from_config(THREE_TERMS, dims)
    out = objective(*run_models(student, teacher, batch), batch)
    assert set(out.terms) == {"kd", "l2", "codir"}
    expected = out.terms["kd"] + 0.5 * out.terms["l2"] + 0.1 * out.terms["codir"]
    torch.testing.assert_close(out.total, expected)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.terms.values())


def test_gradient_reaches_student_and_heads_never_teacher(student, dims, batch):
    from tests.conftest import tiny_bert

    teacher = tiny_bert(layers=4, hidden=32, seed=1)  # requires_grad left on: the objective must still cut it
    objective = DistillationObjective.from_config(THREE_TERMS, dims)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    teacher_out = teacher(**inputs, output_hidden_states=True)
    student_out = student(**inputs, output_hidden_states=True)
    objective(student_out, teacher_out, batch).total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for label in ("l2", "codir"):
        grads = [p.grad for p in objective.terms[label].parameters()]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), label


def test_one_optimisation_step_changes_student_and_fills_bank(student, teacher, dims, batch):
    objective = DistillationObjective.from_config(THREE_TERMS, dims)
    optimizer = torch.optim.AdamW(list(student.parameters()) + list(objective.parameters()), lr=1e-3)
    before = [p.detach().clone() for p in student.parameters()]
    out = objective(*run_models(student, teacher, batch), batch)
    out.total.backward()
    optimizer.step()
    objective.after_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert int(objective.terms["codir"].bank.filled) == batch["input_ids"].shape[0]


def test_terms_from_python_without_yaml(dims, student, teacher, batch):
    kd = build_term("kd", dims, temperature=4.0)
    l2 = build_term("l2", dims, layer_map="last")
    objective = DistillationObjective([(kd, 1.0), (l2, 2.0), (build_term("l2", dims), 1.0)])
    assert list(objective.terms) == ["kd", "l2", "l2_2"]
    out = objective(*run_models(student, teacher, batch), batch)
    torch.testing.assert_close(out.total, out.terms["kd"] + 2.0 * out.terms["l2"] + out.terms["l2_2"])


def test_unknown_loss_and_parameter_errors(dims):
    with pytest.raises(UnknownLossError, match="did you mean 'kd'"):
        DistillationObjective.from_config([{"loss": "kdd"}], dims)
    with pytest.raises(ConfigError, match=r"loss 'kd' does not accept parameter 'temprature'.*'temperature'"):
        DistillationObjective.from_config([{"loss": "kd", "temprature": 2.0}], dims)
    with pytest.raises(ConfigError, match="Accepted parameters: layer_map, pooling, temperature, dim, bank"):
        build_term("codir", dims, pooling_mode="mean")
    with pytest.raises(ConfigError, match="loss 'kd': invalid parameters: temperature"):
        build_term("kd", dims, temperature=-1)
    with pytest.raises(ConfigError, match=r"bank.kind"):
        build_term("codir", dims, bank={"kind": "ring"})
    with pytest.raises(ConfigError, match="out of range for the teacher, which has 4 layers"):
        build_term("l2", dims, layer_map=[[1, 9]])


def test_failing_term_names_itself(dims, student, teacher, batch):
    objective = DistillationObjective([(build_term("kd", dims), 1.0)])
    student_out, teacher_out = run_models(student, teacher, batch)
    taps = Taps.from_output(student_out, batch)
    taps.logits = taps.logits[:, :2]
    with pytest.raises(
        LossTermError, match=r"loss term 'kd' \(loss 'kd', plugin 'kd' from distillkit 0.1.0\)"
    ):
        objective(taps, teacher_out, batch)


def test_outputs_without_hidden_states_are_rejected_when_a_term_reads_them(dims, student, teacher, batch):
    objective = DistillationObjective([(build_term("kd", dims), 1.0), (build_term("l2", dims), 1.0)])
    inputs = {"input_ids": batch["input_ids"]}
    with pytest.raises(MissingOutputError) as caught:
        objective(student(**inputs), teacher(**inputs, output_hidden_states=True), batch)
    assert str(caught.value) == (
        "the student's output has no hidden states, which objective term 'l2' (loss 'l2') reads: call it "
        "with output_hidden_states=True"
    )
    assert isinstance(caught.value, ValueError)


def test_logits_alone_are_enough_for_a_term_that_reads_only_logits(dims, student, teacher, batch):
    objective = DistillationObjective([(build_term("kd", dims), 1.0)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        out = objective(student(**inputs), teacher(**inputs), batch)
    assert torch.isfinite(out.total)


def eager(model):
    model.set_attn_implementation("eager")
    return model


def test_an_attention_only_objective_takes_outputs_without_hidden_states(batch):
    from tests.conftest import tiny_bert

    student, teacher = eager(tiny_bert(2, 32, seed=2)), eager(tiny_bert(4, 32, seed=1))
    objective = DistillationObjective.from_config(
        [{"loss": "attention"}], ModelDims.from_models(student, teacher)
    )
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        student_out, teacher_out = (m(**inputs, output_attentions=True) for m in (student, teacher))
        out = objective(student_out, teacher_out, batch)
    assert torch.isfinite(out.total)


@pytest.mark.parametrize("mistake", ["no output_attentions", "sdpa attention"])
def test_missing_attentions_are_named_with_how_to_ask_for_them(batch, mistake):
    from tests.conftest import tiny_bert

    student, teacher = eager(tiny_bert(2, 32, seed=2)), eager(tiny_bert(4, 32, seed=1))
    objective = DistillationObjective.from_config(
        [{"loss": "attention", "name": "att"}], ModelDims.from_models(student, teacher)
    )
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if mistake == "sdpa attention":
        teacher.set_attn_implementation("sdpa")
        teacher_out = teacher(**inputs, output_attentions=True)  # sdpa returns no attention probabilities
    else:
        teacher_out = teacher(**inputs)
    with pytest.raises(MissingOutputError) as caught:
        objective(student(**inputs, output_attentions=True), teacher_out, batch)
    assert str(caught.value) == (
        "the teacher's output has no attentions, which objective term 'att' (loss 'attention') reads: call "
        "it with output_attentions=True, with eager attention (load it with attn_implementation='eager' or "
        "call model.set_attn_implementation('eager'): sdpa and flash attention return none)"
    )


def test_a_named_teacher_without_logits_is_named(dims, student, teacher, batch):
    objective = DistillationObjective.from_config(
        [{"loss": "kd", "teacher": "wide"}], {"teacher": dims, "wide": dims}
    )
    inputs = {"input_ids": batch["input_ids"]}
    with pytest.raises(MissingOutputError, match=r"^teacher 'wide'\'s output has no logits, which objective"):
        objective(student(**inputs), {"wide": teacher.bert(**inputs)}, batch)


def test_a_layer_map_under_its_former_name_is_read_with_a_warning(dims):
    with pytest.warns(FutureWarning, match="`layers` is now `layer_map`"):
        term = build_term("l2", dims, layers="last")
    assert term.params.layer_map == "last"
    with pytest.raises(ConfigError, match="give the layer map once"):
        build_term("l2", dims, layers="last", layer_map="last")


def test_terms_declare_the_teacher_layers_they_read(dims):
    objective = DistillationObjective.from_config(
        [
            {"loss": "l2", "layer_map": [[1, 2], [2, 4]]},
            {"loss": "kd"},
            {"loss": "cosine", "layer_map": "last"},
        ],
        dims,
    )
    assert objective.terms["l2"].teacher_layers() == (2, 4)
    assert objective.terms["kd"].teacher_layers() == ()
    assert objective.teacher_layers("teacher") == (2, 4)
