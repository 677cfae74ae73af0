"""The epoch log says the phase and reports a predictor that trains in it (MKD's warm start: S_syn)."""

import re

import pytest

import tensorflow as tf

from mkd_tf.data.cache import SliceCache
from mkd_tf.trainer import Trainer
from tests.scripts import tiny_runs


class RecordingFolder:
    """The chief's run folder as `Trainer.end_epoch` uses it, recording instead of writing checkpoints."""

    chief = True

    def __init__(self, logs):
        self.path = logs
        self.writers = {name: tf.summary.create_file_writer(str(logs / name)) for name in ("train", "validation")}
        self.saved_best, self.histories = 0, []

    def summary_writer(self, name):
        return self.writers[name]

    def save_best(self, state):
        self.saved_best += 1

    def load_history(self):
        return {"epochs": [], "best": None}

    def write_history(self, history):
        self.histories.append(history)

    def flush(self):
        pass


@pytest.fixture(scope="module")
def mkd_model_and_cache(tmp_path_factory):
    _, cache = tiny_runs.tiny_cache(tmp_path_factory)
    return tiny_runs.main_mkd_run(tmp_path_factory).model, SliceCache(cache)


def epoch_lines(model, cache, tmp_path, capsys, epochs, steps):
    """The printed line and history record of each epoch, validated on the tiny cache."""
    folder = RecordingFolder(tmp_path)
    schedule = {"epochs": epochs, "steps_per_epoch": steps, "validation_batch": 32, "select_by": None}
    model.image_panels = lambda batch: {}  # no panels: nothing here looks at them
    trainer = Trainer(model, tf.distribute.get_strategy(), folder, cache, schedule, None, None, verbose=1)
    history = trainer.history
    lines = []
    notes = []
    for epoch in range(epochs):
        trainer.end_epoch(epoch, {"total": 1.0}, 1.0)
        printed = capsys.readouterr().out.strip().splitlines()
        lines.append(printed[0])
        notes.append(printed[1:])
    for writer in folder.writers.values():
        writer.flush()
    return lines, notes, history


def test_no_warm_start_epoch_reports_a_predictor_that_is_not_training(mkd_model_and_cache, tmp_path, capsys):
    model, cache = mkd_model_and_cache
    saved = model.pretrain_steps
    model.pretrain_steps = 20  # 4 epochs x 10 steps: the warm start is epochs 1-2
    try:
        lines, notes, history = epoch_lines(model, cache, tmp_path, capsys, epochs=4, steps=10)
    finally:
        model.pretrain_steps = saved
        del model.image_panels
    pattern = re.compile(r"^epoch (\d) \[(warm start|distillation)\]: [\d.]+ steps/s, val Dice \((\w+)\) [\d.]+$")
    parsed = [pattern.match(line) for line in lines]
    assert all(parsed), lines
    assert [m.group(2) for m in parsed] == ["warm start", "warm start", "distillation", "distillation"]
    # The first warm-start epoch says once why its target Dice is near 0.
    assert len(notes[0]) == 1 and notes[0][0].startswith("(warm start, steps 1-20: both segmentors learn")
    assert notes[1:] == [[], [], []]
    for match in parsed:
        phase, predictor = match.group(2), match.group(3)
        _, training = model.training_phase(int(match.group(1)) * 10)
        assert predictor in training, match.group(0)
        if phase == "warm start":
            assert predictor == "syn"  # neither S_real nor the ensemble: they learn the target afterwards
        else:
            assert predictor == "ensemble"
    records = history["epochs"]
    assert [r["phase"] for r in records] == ["warm start", "warm start", "distillation", "distillation"]
    assert [r["shown"]["predictor"] for r in records] == ["syn", "syn", "ensemble", "ensemble"]
    # history.json keeps its keys: val_dice_mean is still the ensemble's, which picks best/.
    for record in records:
        assert (
            abs(record["val_dice_mean"] - sum(record["val_dice"]["ensemble"]) / len(record["val_dice"]["ensemble"]))
            < 1e-9
        )
    assert history["best"]["predictor"] == "ensemble"
    # TensorBoard: the same phase and predictor per epoch (a text) and that predictor's Dice (a scalar).
    import tensorflow as tf

    texts, shown = {}, {}
    for event_file in (tmp_path / "validation").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                if value.tag == "phase":
                    texts[event.step] = tf.make_ndarray(value.tensor).item().decode()
                if value.tag == "dice_training_predictor/mean":
                    shown[event.step] = float(tf.make_ndarray(value.tensor))
    assert texts == {
        10: "warm start: val Dice of syn",
        20: "warm start: val Dice of syn",
        30: "distillation: val Dice of ensemble",
        40: "distillation: val Dice of ensemble",
    }
    assert [shown[step] for step in (10, 20, 30, 40)] == pytest.approx([r["shown"]["val_dice_mean"] for r in records])


def test_finetune_says_which_modality_it_trains_on():
    from mkd_tf.models.baselines import FinetuneModel

    model = FinetuneModel(3, 1, {"base_filters": 4, "depth": 2}, predictor="finetune", switch_step=14)
    assert model.training_phase(10) == ("assistant", ["finetune"])
    assert model.training_phase(14) == ("assistant", ["finetune"])
    assert model.training_phase(15) == ("target", ["finetune"])
    assert model.phase_note("assistant").startswith("(steps 1-14 train on the assistant only")
    assert model.phase_note("target") is None
    model.switch_step = 0
    assert model.training_phase(10) == ("target", ["finetune"])
