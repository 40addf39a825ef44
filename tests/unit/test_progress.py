"""The progress line: the epoch counts the whole schedule, so the time left says where the stage ends."""

import io

from pipeline.engine.progress import Progress

ROW = {"lr": 0.1, "train_loss": 1.0, "train_acc": 0.5, "images_per_s": 100.0}


def _line(stage, first, until, total, epoch):
    out = io.StringIO()
    Progress(stage, first, until, total, stream=out).epoch({**ROW, "epoch": epoch})
    return out.getvalue().strip()


def test_eta_of_a_stage_that_ends_before_the_schedule_names_its_last_epoch():
    line = _line("pretrain", 0, 160, 200, 2)
    assert line.startswith("pretrain epoch 3/200 ") and line.endswith(" to epoch 160")


def test_eta_of_the_last_stage_is_the_schedule_end():
    line = _line("finetune", 160, 200, 200, 199)
    assert line.startswith("finetune epoch 200/200 ") and "to epoch" not in line and "left 0m00s" in line
