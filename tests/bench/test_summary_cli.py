"""Summary and plots come from records alone; the CLI runs end to end; target verdicts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kron.bench import plots, records, summary
from kron.bench.cli import main, seed_list
from kron.bench.optimizers import get_optimizer
from kron.bench.runner import RunConfig, run_or_load
from kron.bench.tasks import TASKS

PNG = b"\x89PNG\r\n\x1a\n"


def _records(out, task="kron_quadratic", steps=40):
    for name, lrs, seeds in (("kron", (None,), (0, 1)), ("adamw", (1e-2, 3e-2), (0,))):
        for lr in lrs:
            for seed in seeds:
                config = RunConfig(TASKS[task], get_optimizer(name), lr, seed, steps)
                run_or_load(config, out)
    return records.load_all(out)


def test_summary_and_plots_from_records_on_disk(tmp_path):
    _records(tmp_path / "a")
    loaded = records.load_all(tmp_path / "a")
    assert len(loaded) == 4
    text = summary.markdown(loaded)
    assert "| kron_quadratic | rel_loss ≤ 1e-08 | kron (defaults) | default | 0/2 |" in text
    # The AdamW row is the better of the two learning rates on seed 0.
    adam = [r for r in loaded if r["config"]["optimizer"] == "adamw"]
    best = min(adam, key=lambda r: r["outcome"]["final"])
    assert f"| AdamW | {best['config']['lr']:g} | 0/1 |" in text
    written = plots.plot_all(loaded, tmp_path / "plots")
    assert [p.name for p in written] == ["kron_quadratic.png"]
    assert written[0].read_bytes()[:8] == PNG


def _synthetic(task, optimizer, seed, success, seconds=1.0, final=0.05, lr=None):
    return {
        "config": {
            "task": task,
            "optimizer": optimizer,
            "optimizer_label": optimizer,
            "lr": lr,
            "seed": seed,
            "steps": 100,
            "metric": "m",
            "target": 0.1,
            "rule": "reach",
            "final_window": 0.0,
            "title": task,
        },
        "history": {"step": [100], "seconds": [seconds], "m": [final], "val_loss": [final]},
        "status": "finished",
        "outcome": {
            "final": final,
            "success": success,
            "steps_to_target": 100 if success else None,
            "seconds_to_target": seconds if success else None,
        },
        "versions": {},
        "machine": {},
    }


def test_verdicts_count_seeds_and_ratios():
    recs = [_synthetic("xor32", "kron", s, s != 4) for s in range(5)]
    recs += [_synthetic("xor64", "kron", s, s < 2) for s in range(5)]
    recs += [_synthetic("xor32", "adamw", s, False, lr=1e-3) for s in range(5)]
    recs += [
        _synthetic("kron_quadratic", "kron", 0, False, final=1e-6),
        _synthetic("kron_quadratic", "adamw", 0, False, final=1e-4, lr=0.03),
    ]
    recs += [
        _synthetic("logistic", "kron", 0, False, final=1e-3),
        _synthetic("logistic", "adamw", 0, False, final=2e-3, lr=0.01),
    ]
    found = {v.target.split(":")[0]: v for v in summary.verdicts(recs)}
    assert found["xor32"].status == "met" and found["xor32"].measured == "4/5 seeds"
    assert found["xor64"].status == "missed"
    assert found["kron_quadratic"].status == "met"
    assert found["logistic"].status == "missed"
    assert found["char_lm"].status == "not run"
    # Only xor32 is solved by either optimizer, and kron solves it: 1 of 1.
    assert found["wall-clock to target"].measured == "1 of 1 tasks"


def test_targets_are_judged_for_every_kron_variant_that_ran():
    """kron_jax against optax.adamw gets its own table; kron_lr, not run, gets none."""
    recs = [
        _synthetic("kron_quadratic", "kron_jax", 0, False, final=1e-7),
        _synthetic("kron_quadratic", "adamw_jax", 0, False, final=1e-4, lr=0.03),
        _synthetic("kron_quadratic", "adamw", 0, False, final=1e-4, lr=0.03),
    ]
    found = {v.target.split(":")[0]: v for v in summary.verdicts(recs, "kron_jax", "adamw_jax")}
    assert found["kron_quadratic"].status == "met"
    assert "1e+03×" in found["kron_quadratic"].measured
    text = summary.verdict_sections(recs)
    assert text.count("## Issue #7 targets") == 1
    assert "## Issue #7 targets: kron_jax against adamw_jax" in text
    assert "kron_lr" not in text
    # Without any kron variant, the first pair's table still says what was not run.
    adam_only = summary.verdict_sections(recs[1:])
    assert adam_only.count("## Issue #7 targets") == 1
    assert "## Issue #7 targets: kron (defaults) against" in adam_only
    assert "not run" in adam_only


def test_sweep_keeps_the_learning_rate_that_reaches_the_target_first():
    recs = [
        _synthetic("t", "adamw", 0, True, lr=1e-3),
        _synthetic("t", "adamw", 0, False, lr=1e-2),
        _synthetic("t", "adamw", 1, True, lr=1e-3),
    ]
    recs[0]["outcome"]["steps_to_target"] = 50
    (row,) = summary.best_rows(recs)["t"]
    assert row.lr == 1e-3 and len(row.runs) == 2


def test_cli_end_to_end_and_resume(tmp_path, capsys):
    args = [
        "bench",
        "--task",
        "deep_linear",
        "xor16",
        "--optimizer",
        "kron",
        "adamw",
        "--steps",
        "30",
        "--seeds",
        "1",
        "--no-sweep",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| deep_linear | rel_mse ≤ 1e-05 | kron (defaults) |" in printed
    assert "| xor16 | loss ≤ 0.1 | AdamW | 0.001 |" in printed
    assert (tmp_path / "summary.md").read_text().startswith("# kron bench summary")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "deep_linear.png",
        "xor16.png",
    ]
    runs = sorted((tmp_path / "runs").glob("*/*.json"))
    assert len(runs) == 4
    stamps = [p.stat().st_mtime_ns for p in runs]
    assert main(args) == 0
    assert [p.stat().st_mtime_ns for p in runs] == stamps
    # --report rebuilds the summary and plots from the records alone, running nothing.
    (tmp_path / "summary.md").unlink()
    for png in (tmp_path / "plots").iterdir():
        png.unlink()
    assert main([*args, "--report"]) == 0
    assert "| deep_linear |" in (tmp_path / "summary.md").read_text()
    assert len(list((tmp_path / "plots").iterdir())) == 2
    assert [p.stat().st_mtime_ns for p in runs] == stamps


def test_cli_lr_runs_each_given_rate_on_every_seed(tmp_path):
    """``--lr`` replaces the grid and skips the sweep protocol."""
    args = ["bench", "--task", "deep_linear", "--optimizer", "kron_lr", "--steps", "20"]
    assert main([*args, "--seeds", "2", "--lr", "1e-3", "3e-3", "--out", str(tmp_path)]) == 0
    configs = {(r["config"]["lr"], r["config"]["seed"]) for r in records.load_all(tmp_path)}
    assert configs == {(1e-3, 0), (1e-3, 1), (3e-3, 0), (3e-3, 1)}


def test_cli_lr_refuses_an_optimizer_that_runs_at_its_defaults(tmp_path):
    """Its rows would be labelled '(defaults)' and judged as the defaults."""
    with pytest.raises(SystemExit, match="kron run at their defaults only"):
        main(["bench", "--task", "deep_linear", "--optimizer", "kron", "--lr", "3e-3"])


@pytest.mark.parametrize("text", ["0", "-1e-3", "nan", "x"])
def test_cli_rejects_a_learning_rate_that_is_not_positive(text, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--task", "deep_linear", "--optimizer", "kron_lr", f"--lr={text}"])
    assert "is not a learning rate > 0" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["0", "-1", "a", ",", "1,-2", "2147483648,", "0,1e30"])
def test_cli_rejects_seeds_that_name_no_run(text, capsys):
    """A count of 0 used to fall back silently to the tier's seeds."""
    with pytest.raises(SystemExit):
        main(["bench", "--task", "deep_linear", "--seeds", text, "--steps", "1"])
    assert "is neither a seed count" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "seeds"), [("2", (0, 1)), ("0,", (0,)), ("0,3", (0, 3))])
def test_seed_list_reads_counts_and_lists(text, seeds):
    assert seed_list(text) == seeds


def test_python_dash_m_lists_tasks():
    result = subprocess.run(
        [sys.executable, "-m", "kron", "bench", "--list"],
        capture_output=True,
        text=True,
        check=True,
    )
    for name in ("xor64", "char_lm", "kron_quadratic_noisy"):
        assert name in result.stdout


def _bench(tmp_path, *extra):
    return ["bench", "--steps", "20", "--seeds", "0,", "--no-sweep", "--out", str(tmp_path), *extra]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--task", "nosuch"), "--task: unknown 'nosuch'; known: kron_quadratic"),
        (("--task", "deep_linear", "--optimizer", "nosuch"), "unknown optimizer 'nosuch'"),
        (("--task", "logistic", "--optimizer", "kron_jax"), "'kron_jax' has no --framework torch"),
        (("--task", "xor16", "--framework", "jax"), "xor16 has no --framework jax runner"),
        # heavyball cannot train float64 parameters, the only kind the logistic task has.
        (("--task", "logistic", "--optimizer", "heavyball"), "nothing to run"),
    ],
)
def test_cli_names_what_it_cannot_run(tmp_path, extra, message):
    """A typo or a name the framework lacks stops the command with a message instead of a
    traceback or a silently empty plan."""
    with pytest.raises(SystemExit, match=message):
        main(_bench(tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--steps", "--threads"])
@pytest.mark.parametrize("text", ["0", "-5", "x"])
def test_cli_rejects_counts_below_one(option, text, capsys):
    """``--steps 0`` used to run the full budget, and a negative one wrote records that broke
    every later report."""
    with pytest.raises(SystemExit):
        main(["bench", "--task", "deep_linear", option, text])
    assert "is not a whole number >= 1" in capsys.readouterr().err


def test_cli_stops_before_training_when_the_output_folder_cannot_be_made(tmp_path):
    """An ``--out`` below a file failed with a traceback after the first run had trained."""
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" / "out"
    with pytest.raises(SystemExit, match="cannot make the folder"):
        main(_bench(out, "--task", "deep_linear", "--optimizer", "kron"))
    assert (tmp_path / "file").read_text() == "mine"


def test_the_kron_command_names_the_missing_extra(monkeypatch, capsys):
    """Installed without the bench extra, ``kron --help`` failed on ``import torch``."""
    import importlib.util

    import kron.bench

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "rich" else real(name, *a)
    )
    assert kron.bench.main(["--help"]) == 2
    err = capsys.readouterr().err
    assert "needs rich" in err and "kron[bench]" in err


def test_cli_rejects_an_output_folder_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(SystemExit, match="is a file"):
        main(_bench(tmp_path / "out", "--task", "deep_linear", "--optimizer", "kron"))
    assert (tmp_path / "out").read_text() == "mine"


def test_repeated_seeds_and_learning_rates_run_once(tmp_path):
    assert seed_list("0,0,2,0") == (0, 2)
    args = ["bench", "--task", "deep_linear", "--optimizer", "kron_lr", "--steps", "5"]
    assert main([*args, "--seeds", "1", "--lr", "1e-3", "1e-3", "--out", str(tmp_path)]) == 0
    assert len(records.load_all(tmp_path)) == 1


def test_a_run_that_diverges_before_its_first_evaluation_is_reported(tmp_path):
    """Its record has no metric column; the table and the plot are still made from it."""
    args = _bench(tmp_path, "--task", "rosenbrock", "--optimizer", "sgd", "--lr", "1e6")
    assert main(args) == 0
    (record,) = records.load_all(tmp_path)
    assert record["status"] == "diverged" and "f" not in record["history"]
    assert "| rosenbrock |" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "plots" / "rosenbrock.png").read_bytes().startswith(PNG)


def test_report_uses_only_the_plans_matching_records(tmp_path, capsys):
    """``--report`` takes the runs the same command would run, no other seed's and no record
    made under another configuration, and lists the runs it found no record for."""
    base = ["bench", "--task", "deep_linear", "--optimizer", "kron", "--steps", "10"]
    assert main([*base, "--seeds", "2", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main([*base, "--seeds", "0,", "--out", str(tmp_path), "--report"]) == 0
    assert "1 runs" in capsys.readouterr().out
    path = RunConfig(TASKS["deep_linear"], get_optimizer("kron"), None, 1, 10).path(tmp_path)
    changed = records.load(path)
    changed["config"]["settings"]["lr"] = 1.0
    path.write_text(json.dumps(changed))
    assert main([*base, "--seeds", "0,1,2", "--out", str(tmp_path), "--report"]) == 0
    printed = capsys.readouterr()
    assert "1 runs" in printed.out
    assert "2 planned run(s) have no matching record" in printed.err
    assert "seed=1" in printed.err and "seed=2" in printed.err


def test_report_without_records_stops_and_keeps_the_summary(tmp_path):
    """``--report`` over a folder with none of the plan's records exits with a message and leaves
    the folder's summary as it was, rather than writing an empty one beside the old plots."""
    base = ["bench", "--task", "deep_linear", "--optimizer", "kron", "--steps", "10"]
    assert main([*base, "--seeds", "1", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "summary.md").read_text()
    with pytest.raises(SystemExit, match="holds no record of this command's runs"):
        main([*base, "--seeds", "5,", "--out", str(tmp_path), "--report"])
    assert (tmp_path / "summary.md").read_text() == before


def _histories(out):
    """Record file → the run's history without its timings."""
    found = {}
    for path in (out / "runs").glob("*/*.json"):
        history = records.load(path)["history"]
        del history["seconds"]
        found[path.relative_to(out)] = history
    return found


def test_jobs_run_the_same_sweep_as_one_process(tmp_path, capsys):
    """``--jobs 2`` spreads the runs over worker processes: the same runs (the sweep's best lr
    chosen on seed 0 before the later seeds start), the same metrics, the same table; a second
    invocation resumes every run."""
    args = ["bench", "--task", "deep_linear", "--optimizer", "kron_lr", "adamw"]
    args += ["--steps", "30", "--seeds", "2"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    alone = capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    spread = capsys.readouterr().out
    assert _histories(tmp_path / "two") == _histories(tmp_path / "one")
    assert len(_histories(tmp_path / "one")) == 2 * (3 + 1)

    def table(printed):  # without the seconds column, which differs between runs
        rows = [line.split("|") for line in printed.splitlines() if line.startswith("| deep")]
        return [row[:7] + row[8:] for row in rows]

    assert table(spread) == table(alone) and table(alone)
    runs = sorted((tmp_path / "two" / "runs").glob("*/*.json"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    assert main([*args, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    assert [p.stat().st_mtime_ns for p in runs] == stamps
