"""Sampled continuations: prompts from batches, generation, and the batches the loss reads from them."""

import pytest
import torch

from distillkit.errors import DistillkitError
from distillkit.tasks.sampling import Prompts, Sampling, join, prompts_of, sample, sample_batch
from tests.distill_fixtures import tiny_llama

VOCAB, END, PAD = 23, 2, 0


def _llama(seed: int = 0, vocab: int = VOCAB):
    return tiny_llama(2, 16, vocab, seed)


def _prompts(rows: list[list[int]]) -> Prompts:
    """Left-padded prompts written out by hand."""
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return Prompts(ids=ids, mask=mask, lengths=torch.tensor([len(r) for r in rows]))


def test_prompts_are_the_leading_tokens_left_padded():
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 0, 0, 0], [12, 13, 14, 15, 16]])
    mask = (ids != 0).long()
    prompts = prompts_of({"input_ids": ids, "attention_mask": mask}, prompt_tokens=3, pad_id=PAD)
    assert prompts.ids.tolist() == [[5, 6, 7], [0, 10, 11], [12, 13, 14]]
    assert prompts.mask.tolist() == [[1, 1, 1], [0, 1, 1], [1, 1, 1]]
    assert prompts.lengths.tolist() == [3, 2, 3]


def test_prompts_of_left_padded_rows_and_of_prompt_completion_data():
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    left = prompts_of({"input_ids": ids, "attention_mask": mask}, prompt_tokens=2, pad_id=PAD)
    assert left.ids.tolist() == [[5, 6], [8, 9]]
    pairs = {"input_ids": ids, "attention_mask": mask, "prompt_lengths": torch.tensor([1, 4])}
    own = prompts_of(pairs, prompt_tokens=2, pad_id=PAD)  # each row's own prompt length counts
    assert own.ids.tolist() == [[0, 0, 0, 5], [8, 9, 10, 11]]
    assert own.lengths.tolist() == [1, 4]


def test_join_counts_only_sampled_positions_up_to_and_including_the_end():
    prompts = _prompts([[5, 6, 7], [8]])
    generated = torch.tensor([[9, END, PAD, PAD], [10, 11, 12, 13]])  # row 0 ends, row 1 runs out
    sampled = join(prompts, generated, END, PAD)
    batch = sampled.batch
    assert sampled.lengths.tolist() == [2, 4] and sampled.generated_tokens == 6
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, END], [8, 10, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    # position t predicts token t+1: prompt tokens are never targets, the end token is one
    assert batch["labels"].tolist() == [[-100, -100, 9, END, -100], [10, 11, 12, 13, -100]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert batch["prompt_lengths"].tolist() == [3, 1]


def test_join_pads_short_rows_and_finds_the_end_when_padding_is_the_end_token():
    prompts = _prompts([[5, 6], [7, 8]])
    generated = torch.tensor([[END, END, END], [9, 10, END]])  # pad == end: the first end counts
    batch = join(prompts, generated, end_id=END, pad_id=END).batch
    assert batch["input_ids"].tolist() == [[5, 6, END, END, END], [7, 8, 9, 10, END]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, END, -100, -100, -100], [-100, 9, 10, END, -100]]
    without_end = join(prompts, generated, end_id=None, pad_id=PAD)
    assert without_end.lengths.tolist() == [3, 3]  # no end token: every sampled token counts


def test_sampling_is_seeded_leaves_the_random_state_and_restores_the_model():
    model = _llama()
    model.train()
    own = model.generation_config
    prompts = _prompts([[5, 6, 7], [8, 9]])
    sampling = Sampling(max_new_tokens=6, end_id=END, pad_id=PAD)
    state = torch.get_rng_state()
    first = sample(model, prompts, sampling, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(sample(model, prompts, sampling, seed=3), first)
    assert not torch.equal(sample(model, prompts, sampling, seed=4), first)
    assert model.training and model.generation_config is own
    assert all(p.grad is None for p in model.parameters())
    assert not first.requires_grad and first.shape[0] == 2 and first.shape[1] <= 6


def test_left_padded_prompts_continue_exactly_as_each_prompt_alone():
    """A near-zero temperature makes sampling the argmax: the batch gives each row's own continuation."""
    model = _llama(1)
    rows = [[5, 6, 7, 8, 9], [10], [11, 12, 13]]
    sampling = Sampling(max_new_tokens=5, end_id=None, pad_id=PAD, temperature=1e-6)
    together = sample(model, _prompts(rows), sampling, seed=0)
    for index, row in enumerate(rows):
        alone = sample(model, _prompts([row]), sampling, seed=0)
        assert together[index].tolist() == alone[0].tolist(), index


def test_sampled_sequences_score_like_each_sequence_alone():
    """The joined batch is right-padded with positions from 0, so scoring it equals scoring each row alone."""
    model = _llama(2)
    model.eval()
    sampled = sample_batch(
        model,
        {
            "input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]),
            "attention_mask": torch.tensor([[1] * 4, [1, 1, 0, 0]]),
        },
        prompt_tokens=3,
        sampling=Sampling(max_new_tokens=4, end_id=END, pad_id=PAD),
        seed=11,
    )
    batch = sampled.batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row in range(2):
            real = int(batch["attention_mask"][row].sum())
            alone = model(input_ids=batch["input_ids"][row : row + 1, :real]).logits[0]
            torch.testing.assert_close(logits[row, :real], alone, rtol=1e-5, atol=1e-5)


def test_continuations_end_at_the_end_token():
    """Many rows: some stop at the end token (padding after it), others run to max_new_tokens."""
    model = _llama(3)
    prompts = _prompts([[5 + i % 7, 6 + i % 5] for i in range(16)])
    generated = sample(model, prompts, Sampling(max_new_tokens=12, end_id=END, pad_id=PAD), seed=5)
    sampled = join(prompts, generated, END, PAD)
    lengths = sampled.lengths.tolist()
    assert min(lengths) < 12 and max(lengths) == generated.shape[1] == 12  # both kinds occur with this seed
    for row, length in enumerate(lengths):
        tokens = generated[row].tolist()
        if END in tokens:
            assert length == tokens.index(END) + 1 and all(t == PAD for t in tokens[length:])
        else:
            assert length == len(tokens)
        labels = sampled.batch["labels"][row]
        assert labels[labels != -100].tolist() == tokens[:length]
        assert int(sampled.batch["attention_mask"][row].sum()) == 2 + length


def test_a_model_without_generate_is_refused():
    with pytest.raises(DistillkitError, match="no generate"):
        sample(torch.nn.Linear(2, 2), _prompts([[5]]), Sampling(max_new_tokens=2, end_id=None, pad_id=PAD), 0)


def test_prompt_and_continuation_stay_within_max_length():
    model = _llama(4)
    sampling = Sampling(max_new_tokens=50, end_id=None, pad_id=PAD, max_length=9)
    assert sampling.new_tokens(6) == 3 and sampling.new_tokens(9) == 1
    generated = sample(model, _prompts([[5, 6, 7, 8, 9, 10], [11]]), sampling, seed=0)
    assert generated.shape[1] == 3


def test_sample_nll_is_the_scorers_mean_nll_of_the_writers_samples(tmp_path):
    """Against a float64 count over the sampled positions; without a teacher the model scores itself."""
    from distillkit.config import config_from_dict
    from distillkit.models import load_tokenizer
    from distillkit.tasks import EvalContext, make_task
    from distillkit.tasks.causal_lm import SAMPLE_SEED
    from tests.distill_fixtures import causal_lm_config

    raw = causal_lm_config(tmp_path, {"student_fraction": 0.0, "prompt_tokens": 5})
    raw["evaluation"] = {"sample_prompts": 3, "sample_tokens": 6}
    config = config_from_dict(raw)
    task = make_task(config)
    data = task.load_data(load_tokenizer(config.teacher))
    batches = [task.collator(load_tokenizer(config.teacher))([data.train[i] for i in range(4)])]
    writer, scorer = _llama(5, vocab=31), _llama(6, vocab=31)  # the tiny tokenizer's 31 tokens

    def expected(model_scoring):
        rows = {k: v[:3] for k, v in batches[0].items()}
        sampled = sample_batch(writer, rows, 5, task.sampling, seed=SAMPLE_SEED)
        with torch.no_grad():
            logp = torch.log_softmax(model_scoring(input_ids=sampled.batch["input_ids"]).logits.double(), -1)
        nll = [
            -float(logp[row, t, sampled.batch["input_ids"][row, t + 1]])
            for row in range(3)
            for t in range(4, 4 + int(sampled.lengths[row]))
        ]
        return sum(nll) / len(nll), len(nll)

    metrics = task.evaluate(writer, batches, EvalContext(teacher=scorer))
    nll, tokens = expected(scorer)
    assert metrics["sampled_tokens"] == tokens and 3 <= tokens <= 18
    assert metrics["sample_nll"] == pytest.approx(nll, rel=1e-5)
    alone = task.evaluate(writer, batches, EvalContext())
    assert alone["sample_nll"] == pytest.approx(expected(writer)[0], rel=1e-5)
