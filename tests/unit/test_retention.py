"""Retention over 20 real saves per policy: exactly the expected checkpoints (and their model folders)
survive; the newest, last.ckpt and export/final/ never go; bad settings fail at construction."""

from __future__ import annotations

import re

import pytest

from nanoternary.lit.callbacks.retention import Retention, select_keep
from nanoternary.lit.run_files import LAST, CheckpointLayout

SAVES = [10 * i for i in range(1, 21)]  # a checkpoint every 10 steps, 20 of them


@pytest.fixture
def layout(tmp_path):
    lay = CheckpointLayout(tmp_path / "checkpoints", tmp_path / "export")
    lay.ckpt_dir.mkdir()
    (lay.export_dir / "final").mkdir(parents=True)
    (lay.export_dir / "final" / "model.safetensors").write_bytes(b"final")
    return lay


def save(layout: CheckpointLayout, step: int) -> None:
    """What StepCheckpoint leaves on disk for a step: the .ckpt, its model folder, last.ckpt."""
    layout.ckpt(step).write_bytes(b"ckpt %d" % step)
    layout.export(step).mkdir()
    (layout.export(step) / "model.safetensors").write_bytes(b"weights %d" % step)
    (layout.ckpt_dir / LAST).write_bytes(b"ckpt %d" % step)


def on_disk(layout: CheckpointLayout) -> tuple[list[int], list[str]]:
    folders = sorted(p.name for p in layout.export_dir.iterdir())
    return layout.steps(), folders


def run_saves(
    layout: CheckpointLayout, retention: Retention, scores: dict[int, float] | None = None
) -> list[list[int]]:
    history = []
    for step in SAVES:
        save(layout, step)
        if scores and step in scores:
            retention.scores[step] = scores[step]
        retention.prune(layout)
        history.append(layout.steps())
    return history


def expect_final(layout: CheckpointLayout, steps: list[int]) -> None:
    assert on_disk(layout) == (steps, sorted([f"step-{s:08d}" for s in steps] + ["final"]))
    assert (layout.ckpt_dir / LAST).read_bytes() == b"ckpt 200"
    assert (layout.export_dir / "final" / "model.safetensors").read_bytes() == b"final"


def test_keep_last_3_is_the_default_rolling_window(layout):
    history = run_saves(layout, Retention())
    assert history == [SAVES[max(0, i - 2) : i + 1] for i in range(20)]
    expect_final(layout, [180, 190, 200])


def test_keep_last_0_keeps_everything(layout):
    run_saves(layout, Retention(keep_last=0))
    expect_final(layout, SAVES)


def test_every_m_th_step_is_kept_besides_the_window(layout):
    history = run_saves(layout, Retention(keep_last=2, keep_every_n_steps=50))
    assert history[6] == [50, 60, 70]
    expect_final(layout, [50, 100, 150, 190, 200])


def test_best_by_val_loss_survives_leaving_the_window(layout):
    scores = {s: abs(s - 70) / 10 + 1.0 for s in SAVES}  # lowest (best) at step 70
    history = run_saves(layout, Retention(keep_last=2, keep_best=True), scores)
    assert history[8] == [70, 80, 90]
    expect_final(layout, [70, 190, 200])


def test_keep_last_1_never_deletes_the_newest_even_if_another_is_best(layout):
    history = run_saves(layout, Retention(keep_last=1, keep_best=True), {10: 0.5, 20: 3.0})
    assert history[:3] == [[10], [10, 20], [10, 30]]
    expect_final(layout, [10, 200])


def test_make_room_shrinks_the_window_by_one_but_keeps_the_newest(layout):
    retention = Retention(keep_last=3)
    run_saves(layout, retention)
    assert retention.prune(layout, room_for=1) == [180]
    assert layout.steps() == [190, 200]
    assert retention.prune(layout, room_for=5) == [190]
    assert layout.steps() == [200]


def test_select_keep_is_exact():
    assert select_keep([], 3) == set()
    assert select_keep([5, 1, 3], 2) == {3, 5}
    assert select_keep([2, 4, 6, 8], 1, keep_every=4, best=2) == {2, 4, 8}
    assert select_keep([2, 4], 1, best=99) == {4}  # a best step that no longer exists is ignored


def test_state_round_trip_keeps_scores():
    a = Retention(keep_best=True)
    a.scores = {10: 2.5, 20: 1.5}
    b = Retention(keep_best=True)
    b.load_state_dict(a.state_dict())
    assert b.scores == {10: 2.5, 20: 1.5} and b.best_step([10, 20]) == 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": -1}, "retention.keep_last must be an integer >= 0, got -1"),
        ({"keep_last": 2.5}, "retention.keep_last must be an integer >= 0, got 2.5"),
        ({"keep_every_n_steps": -10}, "retention.keep_every_n_steps must be an integer >= 0, got -10"),
        ({"keep_best": "yes"}, "retention.keep_best must be true or false, got 'yes'"),
        ({"monitor": ""}, "retention.monitor must be a metric name, got ''"),
    ],
)
def test_invalid_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Retention(**kwargs)


def test_leftovers_of_an_interrupted_write_are_cleaned_and_a_half_replaced_folder_restored(layout):
    save(layout, 10)
    (layout.ckpt_dir / ".step-00000020.ckpt.tmp-999").write_bytes(b"partial")
    (layout.export_dir / ".step-00000020.tmp-999").mkdir()
    (layout.export_dir / "step-00000010").rename(layout.export_dir / ".step-00000010.old-999")
    removed = layout.clean_temps()
    assert sorted(p.name for p in removed) == [".step-00000020.ckpt.tmp-999", ".step-00000020.tmp-999"]
    assert on_disk(layout) == ([10], ["final", "step-00000010"])
    assert (layout.export(10) / "model.safetensors").read_bytes() == b"weights 10"
