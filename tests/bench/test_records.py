"""Records: complete, deterministic per seed, resumable, and their outcome rules."""

from __future__ import annotations

import inspect
import json
import math

from kron.bench import records
from kron.bench.optimizers import get_optimizer
from kron.bench.runner import RunConfig, run, run_or_load
from kron.bench.tasks import TASKS
from kron.torch import Kron

REQUIRED = {
    "schema",
    "config",
    "versions",
    "machine",
    "history",
    "status",
    "steps_done",
    "wall_seconds",
    "outcome",
}


def _config(seed=0, steps=45, optimizer="kron", task="deep_linear"):
    return RunConfig(TASKS[task], get_optimizer(optimizer), None, seed, steps)


def test_record_is_complete_and_json_serialisable():
    record = run(_config())
    assert REQUIRED <= set(record)
    assert record["config"]["seed"] == 0 and record["config"]["optimizer"] == "kron"
    assert record["versions"]["torch"].startswith("2.")
    assert record["steps_done"] == 45 and record["status"] == "finished"
    assert json.loads(json.dumps(record))["history"] == record["history"]
    seconds = record["history"]["seconds"]
    assert seconds == sorted(seconds) and seconds[0] > 0


def test_same_seed_same_metrics_other_seed_differs():
    a, b, c = run(_config(0)), run(_config(0)), run(_config(1))
    for key in ("loss", "rel_mse"):
        assert a["history"][key] == b["history"][key]
    assert a["history"]["rel_mse"] != c["history"]["rel_mse"]


def test_resume_reuses_finished_runs_and_reruns_changed_configs(tmp_path):
    first, reused = run_or_load(_config(), tmp_path)
    assert not reused and _config().path(tmp_path).exists()
    again, reused = run_or_load(_config(), tmp_path)
    assert reused and again == json.loads(json.dumps(first))
    _, reused = run_or_load(_config(steps=40), tmp_path)
    assert not reused


def test_resume_reruns_a_record_made_under_other_optimizer_defaults(tmp_path):
    """A run at the default lr has the same path before and after a default changes; the
    resolved settings in the config tell the two apart (and a record without them is rerun)."""
    first, _ = run_or_load(_config(), tmp_path)
    assert first["config"]["settings"]["lr"] == inspect.signature(Kron).parameters["lr"].default
    path = _config().path(tmp_path)
    for edit in (lambda c: c["settings"].update(lr=3e-4), lambda c: c.pop("settings")):
        record = json.loads(path.read_text())
        edit(record["config"])
        path.write_text(json.dumps(record))
        _, reused = run_or_load(_config(), tmp_path)
        assert not reused


def test_half_written_record_is_not_trusted(tmp_path):
    path = _config().path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text('{"schema": 1, "config": ')
    _, reused = run_or_load(_config(), tmp_path)
    assert not reused and records.load(path) is not None


def _fake(values, rule="reach", window=0.0, status="finished"):
    steps = [10 * (i + 1) for i in range(len(values))]
    return {
        "config": {"metric": "m", "target": 1.0, "rule": rule, "final_window": window},
        "history": {"step": steps, "seconds": [s / 10 for s in steps], "m": values},
        "status": status,
    }


def test_outcome_reach_rule_takes_the_first_point_under_target():
    result = records.outcome(_fake([5.0, 0.9, 2.0, 0.5]))
    assert result == {
        "final": 0.5,
        "success": True,
        "steps_to_target": 20,
        "seconds_to_target": 2.0,
    }
    assert not records.outcome(_fake([5.0, 3.0]))["success"]


def test_outcome_final_rule_averages_the_window_and_needs_to_stay_under():
    result = records.outcome(_fake([5.0, 0.5, 2.0, 0.8, 0.6], rule="final", window=0.4))
    assert math.isclose(result["final"], 0.7) and result["success"]
    assert result["steps_to_target"] == 40
    assert not records.outcome(_fake([0.5, 0.5, 3.0], rule="final", window=0.4))["success"]


def test_diverged_run_fails_with_infinite_final():
    result = records.outcome(_fake([5.0, 0.5], status="diverged"))
    assert result["final"] == math.inf
    early = _fake([5.0], status="diverged")
    del early["history"]["m"]  # diverged before its first evaluation
    assert records.outcome(early) == {
        "final": math.inf,
        "success": False,
        "steps_to_target": None,
        "seconds_to_target": None,
    }


def test_a_diverging_run_is_recorded_as_diverged():
    config = RunConfig(TASKS["deep_linear"], get_optimizer("sgd"), 1e6, 0, 60)
    record = run(config)
    assert record["status"] == "diverged" and record["steps_done"] < 60
    assert not record["outcome"]["success"] and record["outcome"]["final"] == math.inf


def test_resume_keeps_a_record_it_cannot_reuse(tmp_path):
    """A record made under other settings (or unreadable) is renamed aside with everything the
    user added to it, never overwritten."""
    run_or_load(_config(), tmp_path)
    path = _config().path(tmp_path)
    old = json.loads(path.read_text())
    old["config"]["settings"]["lr"] = 1.0
    old["user_note"] = "keep me"
    path.write_text(json.dumps(old))
    moved = []
    _, reused = run_or_load(_config(), tmp_path, on_set_aside=moved.append)
    assert not reused and len(moved) == 1
    assert moved[0].name.startswith(path.name + ".stale-")
    assert json.loads(moved[0].read_text())["user_note"] == "keep me"
    assert "user_note" not in json.loads(path.read_text())
    assert records.load_all(tmp_path) == [records.load(path)]  # the kept file is not a record


def test_resume_needs_the_same_torch_thread_count(tmp_path):
    first, _ = run_or_load(_config(), tmp_path, threads=1)
    assert first["machine"]["torch_threads"] == 1
    second, reused = run_or_load(_config(), tmp_path, threads=2)
    assert not reused and second["machine"]["torch_threads"] == 2
    _, reused = run_or_load(_config(), tmp_path, threads=2)
    assert reused


def test_learning_rates_that_print_alike_get_their_own_files(tmp_path):
    paths = {records.run_path(tmp_path, "t", "o", lr, 0, 10) for lr in (1e-3, 1.0000001e-3)}
    assert len(paths) == 2
    name = records.run_path(tmp_path, "t", "o", 3e-4, 0, 10).name
    assert name == "o__lr-0.0003__seed-0__steps-10.json"  # the short form where it is unique


def test_files_that_are_not_records_are_not_loaded(tmp_path):
    folder = tmp_path / "runs" / "logistic"
    folder.mkdir(parents=True)
    for text in ("[1, 2]", '{"schema": 1, "config": {}}', '{"schema": 1}'):
        (folder / "notes.json").write_text(text)
        assert records.load(folder / "notes.json") is None
        assert records.load_all(tmp_path) == []


def test_outcome_a_run_that_reaches_the_target_and_then_diverges_fails():
    result = records.outcome(_fake([5.0, 0.5, 3.0], status="diverged"))
    assert result["final"] == math.inf and not result["success"]
    assert result["steps_to_target"] is None
