"""The main job's command line, audit fixes: an earlier report never outlives a job that replaces it;
bad --device/--dataset/--cache-dir/--seed/--out values and an unusable device or backend are usage errors
(exit status 2) before any work or folder; duplicate --models are dropped."""

import importlib
import json

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
