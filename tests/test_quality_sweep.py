"""benchmarks/quality_sweep.py: the selection looks only at the validation split, the tables' means,
deviations and wins are what they say, and its default-setting run is the main job's run."""

import importlib.util
import json
import math
import os

import pytest

from hiertcn_fast import cli
from model_helpers import one_thread  # noqa: F401 (autouse fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("quality_sweep", os.path.join(ROOT, "benchmarks", "quality_sweep.py"))
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def _run(model, seed, recall, mrr, lr=1e-2, dropout=0.3, split="test"):
    figures = {"Recall@10": recall, "MRR": mrr, "NDCG@10": recall / 2}
    return {"model": model, "split": split, "lr": lr, "dropout": dropout, "seed": seed, "seconds": 1.0,
            "per_user": dict(figures), "per_event": {k: v / 2 for k, v in figures.items()}}


def test_selection_takes_the_best_mean_recall_over_seeds_and_breaks_ties_by_mrr():
    runs = [_run("a", 0, 0.20, 0.09, lr=3e-3), _run("a", 0, 0.25, 0.08, lr=1e-2), _run("a", 0, 0.25, 0.10, lr=3e-2),
            _run("a", 0, 0.24, 0.20, lr=1e-1)]
    assert sweep.select(runs)["lr"] == 3e-2
    # Over two seeds the setting with the best single run (lr 3e-2, 0.30) loses on the mean to a steadier one.
    runs = [_run("a", 0, 0.30, 0.1, lr=3e-2), _run("a", 1, 0.18, 0.1, lr=3e-2),
            _run("a", 0, 0.25, 0.1, lr=1e-2), _run("a", 1, 0.25, 0.1, lr=1e-2),
            _run("a", 0, 0.26, 0.1, lr=1e-2, dropout=0.5), _run("a", 1, 0.22, 0.1, lr=1e-2, dropout=0.5)]
    chosen = sweep.select(runs)
    assert (chosen["lr"], chosen["dropout"], chosen["seeds"]) == (1e-2, 0.3, [0, 1])
    assert chosen["per_user"]["Recall@10"] == pytest.approx(0.25)
    assert chosen["default"]["Recall@10"] == pytest.approx(0.25)  # the main job's setting, shown beside it


def test_table_means_sample_deviations_and_wins():
    runs = [_run("a", 0, 0.20, 0.1), _run("a", 1, 0.30, 0.1), _run("a", 2, 0.10, 0.1),
            _run("b", 0, 0.25, 0.2), _run("b", 1, 0.25, 0.2), _run("b", 2, 0.25, 0.2)]
    rows = {row["model"]: row for row in sweep.table(runs, (0, 1, 2))}
    assert rows["a"]["mean"]["user Recall@10"] == pytest.approx(0.2)
    assert rows["a"]["std"]["user Recall@10"] == pytest.approx(0.1)  # sample deviation (n - 1) of .2, .3, .1
    assert rows["b"]["std"]["user Recall@10"] == pytest.approx(0.0)
    assert rows["a"]["mean"]["event Recall@10"] == pytest.approx(0.1)
    assert (rows["a"]["wins"], rows["b"]["wins"]) == (1, 2)  # seed 1 to a (0.30), seeds 0 and 2 to b (0.25)
    assert [row["model"] for row in sweep.table(runs, (0, 1, 2))] == ["b", "a"]  # by mean per-user Recall@10
    assert math.isnan(sweep.table(runs[:1], (0,))[0]["std"]["user MRR"])  # one seed: no deviation


def test_a_grid_without_the_main_jobs_setting_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--out", str(tmp_path / "q"), "--lrs", "0.003"])
    assert exit_info.value.code == 2
    assert "must hold the main job's setting" in capsys.readouterr().err


def test_the_default_run_is_the_main_jobs_run_and_selection_sees_only_validation(tmp_path, monkeypatch):
    """The sweep's seed-0 default-setting test run gives the main job's figures digit for digit (same data,
    sizes, loop and seed), and the selection phase evaluates the validation split only."""
    pytest.importorskip("recbole")
    cache_dir = str(tmp_path / "cache")
    assert cli.main(["train", "--epochs", "1", "--models", "hiertcn", "--no-rules", "--out", str(tmp_path / "job"),
                     "--cache-dir", cache_dir]) == 0
    job = json.loads((tmp_path / "job" / "results.json").read_text())["models"]["hiertcn"]["quality"]
    splits = []
    evaluate = sweep.evaluate
    monkeypatch.setattr(sweep, "evaluate", lambda model, cache, split, config: splits.append(split)
                        or evaluate(model, cache, split, config))
    assert sweep.main(["--out", str(tmp_path / "q"), "--models", "hiertcn", "--lrs", "0.01,0.03", "--dropouts", "0.3",
                       "--seeds", "0", "--selection-seeds", "1", "--epochs", "1", "--cache-dir", cache_dir]) == 0
    record = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert splits[:2] == ["valid", "valid"] and set(splits[2:]) == {"test"}
    assert [r["split"] for r in record["selection_runs"]] == ["valid", "valid"]
    default = record["test_runs"]["default"][0]
    assert (default["lr"], default["dropout"], default["seed"]) == (1e-2, 0.3, 0)
    for metric in sweep.HEADLINE:
        assert default["per_user"][metric] == job["per_user"]["all"][metric]
        assert default["per_event"][metric] == job["per_event"]["all"][metric]
    assert "| hiertcn |" in (tmp_path / "q" / "quality.md").read_text()


@pytest.mark.parametrize("seeds, selection", [("0,1,2", "2,3"), ("4", "4")])
def test_selection_seeds_that_are_also_test_seeds_are_a_usage_error(tmp_path, capsys, seeds, selection):
    """A setting tested from the initialisations it was selected on carries the selection's luck: refused before
    anything is trained or written."""
    out = tmp_path / "q"
    with pytest.raises(SystemExit) as exited:
        sweep.main(["--out", str(out), "--seeds", seeds, "--selection-seeds", selection])
    assert exited.value.code == 2
    shared = sorted(set(int(s) for s in seeds.split(",")) & set(int(s) for s in selection.split(",")))
    assert f"--seeds and --selection-seeds must be disjoint; both hold {shared}" in capsys.readouterr().err
    assert not out.exists()


def test_the_default_seeds_are_disjoint():
    args = sweep.build_parser().parse_args(["--out", "unused"])
    assert args.seeds and args.selection_seeds and set(args.seeds).isdisjoint(args.selection_seeds)
