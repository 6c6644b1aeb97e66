"""The main job's command line, audit fixes: an earlier report never outlives a job that replaces it;
bad --device/--dataset/--cache-dir/--seed/--out values and an unusable device or backend are usage errors
(exit status 2) before any work or folder; duplicate --models are dropped."""

import importlib
import json
import os

import pytest
import torch

from hiertcn_fast import cli
from hiertcn_fast.report import REPORT_FILES
from model_helpers import one_thread  # noqa: F401 (autouse fixture)

backends = importlib.import_module("hiertcn_fast.backends")  # the package exports a function of that name


@pytest.fixture
def no_job(monkeypatch):
    """Fail the test if the job itself starts: these errors must come before any work."""
    monkeypatch.setattr(cli, "_train", lambda args: pytest.fail("the job started"))


def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2, error
    assert "usage:" in error and "Traceback" not in error, error
    return error


# ---- 2. bad --device, --dataset, --cache-dir: usage errors before the report folder is made ---------------

@pytest.mark.parametrize("flag, value, expected", [
    ("--device", "bogus", "argument --device: expected cpu, cuda or cuda:N, got 'bogus'"),
    ("--device", "meta", "argument --device: expected cpu, cuda or cuda:N, got 'meta'"),
    ("--device", "cuda:-1", "argument --device: expected cpu, cuda or cuda:N, got 'cuda:-1'"),
    ("--dataset", "foo", "argument --dataset: invalid choice: 'foo'"),
    # From the mutation audit of cli.py (tests/test_py_mutants_history_cli.py): C5, an infinite --lr accepted, and
    # C15, --models "," accepted as no model at all.
    ("--lr", "inf", "argument --lr: expected a positive finite number, got 'inf'"),
    ("--models", ",", "argument --models: ',' names no model; choose one or more of"),
    ("--models", " , ", "argument --models: ' , ' names no model; choose one or more of"),
    ("--models", "", "argument --models: '' names no model; choose one or more of"),
    ("--models", "hiertcn,nope", "argument --models: unknown models ['nope'] in 'hiertcn,nope'"),
])
def test_a_bad_device_or_dataset_is_a_usage_error(no_job, tmp_path, capsys, flag, value, expected):
    out = tmp_path / "report"
    error = _usage_error(capsys, ["train", flag, value, "--out", str(out)])
    assert expected in error, error
    assert not out.exists()


@pytest.mark.parametrize("where", ["is a file", "under a file"])
def test_an_unusable_cache_folder_is_a_usage_error_before_the_report_folder(no_job, tmp_path, capsys, where):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cache = a_file if where == "is a file" else a_file / "cache"
    out = tmp_path / "report"
    error = _usage_error(capsys, ["train", "--cache-dir", str(cache), "--out", str(out)])
    assert f"--cache-dir {cache}: cannot create or write the cache folder" in error, error
    assert not out.exists() and a_file.read_text() == "not a folder"


def test_good_device_dataset_and_cache_folder_pass(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(cli, "_train", lambda args: seen.update(vars(args)) or 0)
    cache = tmp_path / "new" / "cache"
    assert cli.main(["train", "--device", "cpu", "--dataset", "ml-100k", "--cache-dir", str(cache),
                     "--out", str(tmp_path / "report")]) == 0
    assert seen["device"] == torch.device("cpu") and seen["dataset"] == "ml-100k"
    assert cache.is_dir() and list(cache.iterdir()) == []  # created, and no probe file left


# ---- 3. an unusable device or backend: one usage error up front; --seed bounded ---------------------------

def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def test_device_cuda_without_a_gpu_is_one_usage_error(no_job, monkeypatch, tmp_path, capsys):
    _no_gpu(monkeypatch)
    out = tmp_path / "report"
    error = _usage_error(capsys, ["train", "--device", "cuda", "--out", str(out)])
    assert "--device cuda: no CUDA device is visible here" in error, error
    assert not out.exists()


def test_a_device_index_beyond_the_visible_gpus_is_a_usage_error(no_job, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    error = _usage_error(capsys, ["train", "--device", "cuda:1", "--out", str(tmp_path / "report")])
    assert "--device cuda:1: only 1 CUDA device(s) visible (cuda:0 to cuda:0)" in error, error


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_an_unavailable_backend_is_one_usage_error(no_job, monkeypatch, tmp_path, capsys, backend):
    _no_gpu(monkeypatch)
    status = {s.name: s for s in backends.backends()}[backend]
    assert not status.available
    out = tmp_path / "report"
    error = _usage_error(capsys, ["train", "--backend", backend, "--device", "cpu", "--out", str(out)])
    assert f"--backend {backend}: not available here: {status.detail}" in error, error
    assert f"fix: {status.fix}" in error
    assert not out.exists()


def test_the_backend_environment_variable_is_checked_too(no_job, monkeypatch, tmp_path, capsys):
    _no_gpu(monkeypatch)
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    error = _usage_error(capsys, ["train", "--out", str(tmp_path / "report")])
    assert f"{backends.ENV_VAR}=cuda: not available here" in error, error
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    error = _usage_error(capsys, ["train", "--out", str(tmp_path / "report")])
    assert f"the {backends.ENV_VAR} environment variable must be one of" in error, error


@pytest.mark.parametrize("backend, device, expected", [
    ("cpu", "cuda", "--backend cpu: it runs on CPU tensors, not on --device cuda"),
    ("cuda", "cpu", "--backend cuda: it runs on CUDA tensors, not on --device cpu"),
])
def test_a_backend_of_another_device_is_a_usage_error(no_job, monkeypatch, tmp_path, capsys, backend, device,
                                                       expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    available = backends.BackendStatus(backend, True, "pretend")
    monkeypatch.setattr(backends, "backends", lambda: [available])
    error = _usage_error(capsys, ["train", "--backend", backend, "--device", device,
                                  "--out", str(tmp_path / "report")])
    assert expected in error, error


def test_the_seed_is_bounded(no_job, tmp_path, capsys):
    error = _usage_error(capsys, ["train", "--seed", str(2 ** 63), "--out", str(tmp_path / "report")])
    assert f"argument --seed: expected a non-negative integer below 2**63, got {2 ** 63}" in error, error


# ---- 4. --out '' ------------------------------------------------------------------------------------------

def test_an_empty_out_is_refused(no_job, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    error = _usage_error(capsys, ["train", "--out", ""])
    assert "argument --out: expected a folder path, got ''" in error, error
    assert list(tmp_path.iterdir()) == []


# ---- 5. duplicate --models ----------------------------------------------------------------------------------

def test_duplicate_models_are_dropped_keeping_their_order(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr(cli, "_train", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["train", "--models", "hiertcn,session_gru,hiertcn,session_gru",
                     "--out", str(tmp_path / "report")]) == 0
    assert seen["models"] == ("hiertcn", "session_gru")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "duplicates are dropped" in " ".join(capsys.readouterr().out.split())


# ---- the job on ml-100k, shrunk to seconds ---------------------------------------------------------------

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    pytest.importorskip("recbole")
    return str(tmp_path_factory.mktemp("cli_cache"))


def _job(out, cache_dir, *extra):
    return ["train", "--epochs", "1", "--dim", "4", "--models", "session_gru", "--no-rules", "--device", "cpu",
            "--out", str(out), "--cache-dir", cache_dir, *extra]


def _earlier_report(out):
    out.mkdir()
    for name in REPORT_FILES:
        (out / name).write_text("an earlier run")
    (out / "results.json").write_text(json.dumps({"models": {"old": {}}, "metadata": {"status": "complete"}}))
    (out / "mine.txt").write_text("kept")


def _failing_evaluate(monkeypatch, error):
    import hiertcn_fast.train as train

    calls = []

    def evaluate(model, *args, **kwargs):
        calls.append(type(model).__name__)
        raise error

    monkeypatch.setattr(train, "evaluate", evaluate)
    return calls


@pytest.mark.parametrize("how", ["every model fails", "stopped before the first model finishes"])
def test_an_earlier_report_never_outlives_a_job_that_replaces_it(monkeypatch, tmp_path, cache_dir, capsys, how):
    out = tmp_path / "report"
    _earlier_report(out)
    if how == "every model fails":
        _failing_evaluate(monkeypatch, RuntimeError("scores went bad"))
        assert cli.main(_job(out, cache_dir)) == 1
    else:
        _failing_evaluate(monkeypatch, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            cli.main(_job(out, cache_dir))
    assert "replacing the earlier report there" in capsys.readouterr().out
    # No finished model, no rules: no report at all (the earlier one, "complete", is gone), other files kept.
    assert [name for name in REPORT_FILES if (out / name).exists()] == []
    assert (out / "mine.txt").read_text() == "kept"


def test_duplicate_models_train_once_and_the_largest_seed_runs(monkeypatch, tmp_path, cache_dir, capsys):
    import hiertcn_fast.train as train

    real, calls = train.evaluate, []
    monkeypatch.setattr(train, "evaluate", lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
    out = tmp_path / "report"
    assert cli.main(_job(out, cache_dir, "--models", "session_gru,session_gru", "--seed", str(2 ** 63 - 1))) == 0
    assert len(calls) == 1
    document = json.loads((out / "results.json").read_text())
    assert list(document["models"]) == ["session_gru"] and document["metadata"]["status"] == "complete"


def test_tilde_in_out_and_cache_dir_is_the_home_folder(monkeypatch, tmp_path):
    """--out=~/x and --cache-dir=~/y (which a shell leaves as they are) name folders in the home folder, where the
    job writes: checked and created there, and no literal "~" folder in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    seen = {}
    monkeypatch.setattr(cli, "_train", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["train", "--out=~/report", "--cache-dir=~/cache", "--device", "cpu"]) == 0
    assert seen["out"] == str(tmp_path / "home" / "report") and seen["cache_dir"] == str(tmp_path / "home" / "cache")
    assert (tmp_path / "home" / "cache").is_dir() and (tmp_path / "home" / "report").is_dir()
    assert not (tmp_path / "~").exists()


def test_the_rule_report_expands_tilde_too(monkeypatch, tmp_path):
    from hiertcn_fast import rule_report

    monkeypatch.setenv("HOME", str(tmp_path))
    seen = {}
    monkeypatch.setattr(rule_report, "load_dataset", lambda name: None)
    monkeypatch.setattr(rule_report, "preprocess", lambda source, cache_dir, params: seen.update(cache=cache_dir))
    monkeypatch.setattr(rule_report, "evaluate_rules", lambda cache, split, history, out_dir: seen.update(out=out_dir)
                        or {})
    monkeypatch.setattr(rule_report, "format_table", lambda results, unit: "")
    rule_report.main(["--out=~/rules", "--cache-dir=~/cache"])
    assert seen == {"out": str(tmp_path / "rules"), "cache": str(tmp_path / "cache")}


# ---- Second audit (session 13) ---------------------------------------------------------------------------

def test_the_report_names_the_backend_the_job_ran_and_the_command_it_was_given(monkeypatch, tmp_path, cache_dir):
    """The note said 'backend auto' when HIERTCN_BACKEND chose another, and metadata had no backend; the argv
    recorded was the calling program's, not the one main() was given."""
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    monkeypatch.setattr(cli.sys, "argv", ["some-program", "--some-flag"])
    out = tmp_path / "report"
    argv = _job(out, cache_dir)
    assert cli.main(argv) == 0
    document = json.loads((out / "results.json").read_text())
    assert document["metadata"]["backend"] == "reference"
    assert document["metadata"]["argv"] == argv
    assert any("backend reference," in note for note in document["notes"])
    monkeypatch.delenv(backends.ENV_VAR)
    assert cli.main(argv) == 0
    assert json.loads((out / "results.json").read_text())["metadata"]["backend"].startswith("auto (cpu or reference")


def test_a_job_stopped_while_its_plots_are_drawn_is_not_complete(monkeypatch, tmp_path, cache_dir):
    """The write after the last model had nothing pending, so it said 'complete' before the plots were drawn; and
    a plot was written in place, so a stop left a truncated file. Now that write lists the plots as unfinished,
    and a plot is replaced whole or not at all."""
    from hiertcn_fast import report

    out = tmp_path / "report"
    real_save = report._save_figure

    def stopped_while_drawing(figure, path):
        if path.name == "quality.png":
            figure.savefig(path.with_name(f".{path.name}.tmp"), format="png")  # half way: the temporary only
            raise KeyboardInterrupt
        real_save(figure, path)

    monkeypatch.setattr(report, "_save_figure", lambda figure, path: stopped_while_drawing(figure, path))
    with pytest.raises(KeyboardInterrupt):
        cli.main(_job(out, cache_dir))
    document = json.loads((out / "results.json").read_text())
    assert document["metadata"]["status"] == "incomplete" and document["metadata"]["models_pending"] == []
    assert "not finished: the plots" in (out / "report.md").read_text()
    monkeypatch.undo()
    # The real _save_figure, stopped inside savefig: the old plot stays, whole, and no temporary is left.
    from matplotlib.figure import Figure

    plot = tmp_path / "plots" / "quality.png"
    plot.parent.mkdir()
    real_save(report._figure(2, 2), plot)
    earlier_plot = plot.read_bytes()
    assert earlier_plot.startswith(b"\x89PNG")
    real_savefig = Figure.savefig

    def interrupted(self, fname, *args, **kwargs):
        real_savefig(self, fname, *args, **kwargs)
        with open(fname, "r+b") as written:  # a truncated file, then the stop
            written.truncate(10)
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        report._save_figure(report._figure(3, 3), plot)
    assert plot.read_bytes() == earlier_plot
    assert [p.name for p in plot.parent.iterdir()] == ["quality.png"]


def test_results_json_is_written_before_report_md(monkeypatch, tmp_path):
    """A stop between the two files must leave the older report.md (which says what was unfinished then), not a
    report.md newer than the JSON."""
    from hiertcn_fast import report

    order = []
    real = report._write_text
    monkeypatch.setattr(report, "_write_text", lambda path, text: order.append(path.name) or real(path, text))
    quality = _a_quality()
    report.write_report({"m": {"quality": quality}}, tmp_path, plots=False)
    assert order == ["results.json", "report.md"]


def _a_quality():
    from hiertcn_fast.evaluate import RankingMetrics

    metrics = RankingMetrics()
    metrics.update(torch.tensor([[0.0, 3.0, 1.0], [0.0, 1.0, 2.0]]), torch.tensor([1, 1]), torch.tensor([0, 0]),
                   torch.tensor([True, False]))
    return metrics.result()


def test_missing_figures_are_marked_n_a_in_the_plots_not_drawn_as_zero(tmp_path):
    from hiertcn_fast import report

    axes = report._figure(3, 3).add_subplot()
    report._bars_or_na(axes, [0, 1, 2], [5.0, None, float("nan")])
    assert [bar.get_height() for bar in axes.patches] == [5.0, 0.0, 0.0]
    assert [(text.get_text(), text.get_position()[0]) for text in axes.texts] == [("n/a", 1), ("n/a", 2)]


@pytest.mark.parametrize("command", ["train", "rule_report"])
def test_a_folder_named_like_a_report_file_is_a_usage_error(no_job, monkeypatch, tmp_path, capsys, command):
    """A folder quality.png/ in --out passed the checks, was announced as the earlier report, and then failed
    to be removed with a traceback after the work."""
    from hiertcn_fast import rule_report

    monkeypatch.setattr(rule_report, "preprocess", lambda *args: pytest.fail("the job started"))
    out = tmp_path / "report"
    (out / "quality.png").mkdir(parents=True)
    argv = ["--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *argv]) if command == "train" else rule_report.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "quality.png there is not a file" in error, error


@pytest.mark.parametrize("out", ["", "   ", "under a file"])
def test_the_rule_report_refuses_an_unusable_out_before_any_work(monkeypatch, tmp_path, capsys, out):
    """--out '' wrote the report into the working directory; --out under a file failed after all the work."""
    from hiertcn_fast import rule_report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rule_report, "preprocess", lambda *args: pytest.fail("the job started"))
    if out == "under a file":
        (tmp_path / "a_file").write_text("not a folder")
        out = str(tmp_path / "a_file" / "report")
    with pytest.raises(SystemExit) as exit_info:
        rule_report.main(["--out", out, "--cache-dir", str(tmp_path / "cache")])
    assert exit_info.value.code == 2, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) in (["a_file", "cache"], ["cache"], [])


def test_an_interrupted_rule_evaluation_stops_tracing_and_a_callers_tracing_goes_on(monkeypatch, tmp_path):
    """evaluate_rules traces memory per rule: an error left the whole process traced (every later allocation),
    and a successful call stopped a caller's own tracing."""
    import tracemalloc

    from hiertcn_fast import rule_report
    from hiertcn_fast.data import PreprocessParams, SyntheticSource, preprocess

    cache = preprocess(SyntheticSource(2000, num_items=50, seed=3), tmp_path / "cache",
                       PreprocessParams(min_item_count=1, min_user_count=2))

    class Failing:
        def fit(self, *args, **kwargs):
            raise KeyboardInterrupt

    monkeypatch.setitem(rule_report.RULES, "failing", Failing)
    assert not tracemalloc.is_tracing()
    with pytest.raises(KeyboardInterrupt):
        rule_report.evaluate_rules(cache, "test", rules=("most_popular", "failing"))
    assert not tracemalloc.is_tracing()
    tracemalloc.start()
    try:
        results = rule_report.evaluate_rules(cache, "test", rules=("most_popular",))
        assert tracemalloc.is_tracing() and results["most_popular"].peak_memory_bytes > 0
    finally:
        tracemalloc.stop()


def test_a_closed_stdout_leaves_no_descriptor_open(monkeypatch, tmp_path, capsys):
    """Each main() that ended in BrokenPipeError opened /dev/null for stdout and never closed the descriptor."""
    opened = []
    real_open = os.open

    def recording_open(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if path == os.devnull:
            opened.append(fd)
        return fd

    monkeypatch.setattr(cli.os, "open", recording_open)
    monkeypatch.setattr(cli.os, "dup2", lambda *args: None)  # leave the test process's stdout alone

    def broken_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_train", broken_pipe)
    for _ in range(3):
        assert cli.main(["train", "--out", str(tmp_path / "report"), "--device", "cpu"]) == 1
    assert len(opened) == 3
    for fd in opened:
        with pytest.raises(OSError):
            os.fstat(fd)
