"""Run by ``test_hf_distributed.py`` under ``torch.distributed.run``: one DistillationTrainer per process."""

import json
import os
import sys

import torch
from transformers import TrainingArguments

from distillkit.hf import DistillationTrainer
from tests.conftest import tiny_bert


def main(output_dir):
    generator = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(1, 64, (10,), generator=generator).tolist(), "labels": i % 2}
        for i in range(32)
    ]
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo",
    )
    objective = [
        {"loss": "kd", "temperature": 2.0},
        {"loss": "l2", "weight": 0.5},  # learned projections 16 -> 32
        {"loss": "minilm_v2", "weight": 0.5},  # module taps, through the DDP wrapper
    ]
    trainer = DistillationTrainer(
        model=tiny_bert(2, 16, num_labels=2, seed=2),
        teacher=tiny_bert(4, 32, num_labels=2, seed=1),
        objective=objective,
        args=args,
        train_dataset=rows,
    )
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    report = {
        "wrapped": type(trainer.model_wrapped).__name__,
        "heads": {k: v.double().sum().item() for k, v in trainer.objective.state_dict().items()},
        "student": sum(p.double().sum().item() for p in trainer.model.parameters()),
        "logs": [r for r in trainer.state.log_history if "loss" in r],
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1])
