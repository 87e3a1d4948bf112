"""The per-micro-batch source draw, and the loss on sampled sequences against a float64 hand computation."""

import json

import pytest
import torch

from distillkit.config import GenerationSettings
from distillkit.objective.objective import DistillationObjective
from distillkit.objective.taps import collect_taps
from distillkit.objective.terms import ModelDims
from distillkit.run.sources import SequenceSource, SourceDraw
from distillkit.tasks.sampling import Sampling, sample_batch
from tests.distill_fixtures import tiny_llama

VOCAB, END, PAD = 29, 2, 0


def _llama(layers: int, hidden: int, seed: int):
    return tiny_llama(layers, hidden, VOCAB, seed)


def test_the_draw_picks_each_source_at_its_rate():
    draw = SourceDraw(0.5, 0.3, seed=0)
    picks = [draw.next()[0] for _ in range(20000)]
    for source, rate in (("student", 0.5), ("teacher", 0.3), ("data", 0.2)):
        share = picks.count(source) / len(picks)
        assert abs(share - rate) < 4 * (rate * (1 - rate) / len(picks)) ** 0.5, source
    assert {SourceDraw(1.0, 0.0, 1).next()[0] for _ in range(50)} == {"student"}
    assert {SourceDraw(0.0, 1.0, 1).next()[0] for _ in range(50)} == {"teacher"}
    assert {SourceDraw(0.0, 0.0, 1).next()[0] for _ in range(50)} == {"data"}


def test_the_draw_is_seeded_and_resumes_from_its_saved_state():
    first, second = SourceDraw(0.4, 0.2, seed=7), SourceDraw(0.4, 0.2, seed=7)
    assert [first.next() for _ in range(30)] == [second.next() for _ in range(30)]
    assert [SourceDraw(0.4, 0.2, 8).next() for _ in range(1)] != [SourceDraw(0.4, 0.2, 7).next()]
    saved = json.loads(json.dumps(first.state_dict()))  # what a checkpoint's state.json holds
    ahead = [first.next() for _ in range(25)]
    resumed = SourceDraw(0.4, 0.2, seed=99)
    resumed.load_state_dict(saved)
    assert [resumed.next() for _ in range(25)] == ahead
    seeds = [seed for _, seed in ahead]
    assert len(set(seeds)) == len(seeds)  # every micro-batch samples with its own seed


def test_the_source_replaces_batches_and_counts_what_it_sampled():
    student, teacher = _llama(1, 16, 0), _llama(2, 16, 1)
    settings = GenerationSettings(student_fraction=0.5, teacher_fraction=0.25, prompt_tokens=3)
    sampling = Sampling(max_new_tokens=5, end_id=END, pad_id=PAD, max_length=8)
    source = SequenceSource(settings, sampling, {"student": student, "teacher": teacher}, seed=0)
    batch = {
        "input_ids": torch.randint(3, VOCAB, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    seen, tokens = [], 0
    for _ in range(12):
        out = source(batch)
        seen.append(source.last)
        if source.last == "data":
            assert out is batch
        else:
            assert out["input_ids"].shape[1] <= 8 and out["loss_mask"].any()
            assert torch.equal(out["input_ids"][:, :3], batch["input_ids"][:, :3])  # the data block's prompts
            tokens += int(out["loss_mask"].sum())
    assert set(seen) == {"student", "teacher", "data"}
    counts = source.take_counts()
    assert counts["generated_tokens"] == tokens > 0
    assert counts["sources"] == {name: seen.count(name) for name in ("student", "teacher", "data")}
    assert source.take_counts()["generated_tokens"] == 0  # counts start afresh


def _divergence64(log_p: torch.Tensor, log_q: torch.Tensor, name: str, beta: float = 0.5) -> torch.Tensor:
    """D(p ‖ q) per position, float64, from the definitions (p: teacher, q: student)."""
    p, q = log_p.exp(), log_q.exp()
    if name == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    if name == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (log_p - m.log())).sum(-1) + (1 - beta) * (q * (log_q - m.log())).sum(-1)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "output-layers"])
@pytest.mark.parametrize(
    ("divergence", "temperature"),
    [("forward_kl", 1.0), ("reverse_kl", 1.0), ("jsd", 1.0), ("forward_kl", 2.0)],
)
def test_the_loss_on_sampled_sequences_counts_only_sampled_positions(divergence, temperature, fused):
    """kd on a student-sampled batch equals T² × the mean over (row, t) for t = p-1 … p+g-2 of D, by hand."""
    student, teacher = _llama(1, 16, 2), _llama(2, 24, 3)
    teacher.eval()
    data = {
        "input_ids": torch.randint(3, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.tensor([[1] * 10, [1] * 10, [1] * 2 + [0] * 8, [1] * 10]),
    }
    sampling = Sampling(max_new_tokens=6, end_id=END, pad_id=PAD, max_length=10)
    sampled = sample_batch(student, data, prompt_tokens=4, sampling=sampling, seed=21)
    batch, prompt, sampled_lengths = sampled.batch, sampled.batch["prompt_lengths"], sampled.lengths
    assert prompt.tolist() == [4, 4, 2, 4] and len(set(sampled_lengths.tolist())) > 1  # uneven rows

    dims = ModelDims.from_models(student, teacher)
    objective = DistillationObjective.from_config(
        [{"loss": "kd", "divergence": divergence, "temperature": temperature}], dims
    )
    objective.read_output_layer(fused)
    student_request, teacher_request = objective.tap_requests()
    with torch.no_grad():
        teacher_taps = collect_taps(teacher, batch, teacher_request)
    loss = objective(collect_taps(student, batch, student_request), teacher_taps, batch).terms["kd"]

    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        log_q = torch.log_softmax(student(**inputs).logits.double() / temperature, -1)
        log_p = torch.log_softmax(teacher(**inputs).logits.double() / temperature, -1)
    values = [
        _divergence64(log_p[row, t], log_q[row, t], divergence)
        for row in range(4)
        for t in range(int(prompt[row]) - 1, int(prompt[row] + sampled_lengths[row]) - 1)
    ]
    assert len(values) == int(sampled_lengths.sum())
    expected = temperature**2 * torch.stack(values).mean()
    assert float(expected) > 1e-3
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4)
