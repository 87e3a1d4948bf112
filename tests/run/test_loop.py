"""The training loop's events, its phase timer, and driving it one step at a time."""

from collections import Counter

import pytest

from distillkit.config import config_from_dict
from distillkit.run import Callback, Run, TrainingLoop, fit
from distillkit.run.callbacks import CallbackList
from distillkit.run.phases import PHASES
from tests.distill_fixtures import tiny_config


class Recorder(Callback):
    def __init__(self):
        self.events = []
        self.records = []

    def on_train_begin(self, loop):
        self.events.append("begin")

    def on_step_end(self, loop, values):
        self.events.append("step")
        assert set(values.losses) == {"total", "kd", "l2", "ce"}

    def on_log(self, loop, record):
        self.events.append("log")
        self.records.append(record)

    def on_evaluate(self, loop, metrics):
        self.events.append("evaluate")
        assert "accuracy" in metrics

    def on_save(self, loop, path):
        self.events.append("save")
        assert path is not None and path.name == f"step-{loop.step_count:08d}"

    def on_train_end(self, loop, result):
        self.events.append("end")


def test_callbacks_hear_every_event_in_order(tmp_path):
    run = Run.from_config(config_from_dict(tiny_config(tmp_path, steps=4, eval_every=2, save_every=2)))
    recorder = Recorder()
    result = fit(run, callbacks=[recorder])
    assert result.step == 4
    assert recorder.events[0] == "begin" and recorder.events[-1] == "end"
    assert Counter(recorder.events) == {"begin": 1, "step": 4, "log": 4, "evaluate": 2, "save": 2, "end": 1}
    assert recorder.events[1:6] == ["step", "log", "step", "log", "evaluate"]
    for record in recorder.records:  # every record says where its interval's time went
        phases = set(record["seconds"])
        assert phases <= set(PHASES) and {"teacher", "backward", "optimizer"} <= phases
        assert all(seconds >= 0 for seconds in record["seconds"].values())


def test_a_callback_must_be_a_callback():
    with pytest.raises(TypeError, match="Callback instances"):
        CallbackList([object()])


def test_driving_the_loop_step_by_step_is_fit(tmp_path):
    raw = tiny_config(tmp_path, steps=3)
    whole = fit(Run.from_config(config_from_dict({**raw, "output_dir": str(tmp_path / "a")})))
    loop = TrainingLoop(Run.from_config(config_from_dict({**raw, "output_dir": str(tmp_path / "b")})))
    loop.start()
    losses = [loop.step().losses for _ in range(3)]
    assert loop.done
    stepped = loop.finish()
    assert stepped.final_terms == pytest.approx(whole.final_terms, rel=1e-6)
    assert losses[-1]["total"] == pytest.approx(whole.final_terms["total"], rel=1e-6)
