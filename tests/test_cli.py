"""The main job's command line: bad arguments are usage errors before any work, the report folder is
checked first, and results are written as each model finishes (a failed model costs only itself)."""

import json
import os
import subprocess
import sys
import time

import pytest

from hiertcn_fast import cli
from model_helpers import one_thread  # noqa: F401 (autouse fixture)
from test_cli_audit_fixes import _usage_error


@pytest.fixture
def no_job(monkeypatch):
    """Fail the test if the job itself starts: these errors must come before any work."""
    monkeypatch.setattr(cli, "_train", lambda args: pytest.fail("the job started"))


@pytest.mark.parametrize("flag, value, expected", [
    ("--epochs", "0", "positive integer"), ("--epochs", "-1", "positive integer"),
    ("--epochs", "1.5", "positive integer"), ("--dim", "0", "positive integer"),
    ("--lanes", "0", "positive integer"), ("--sessions-per-batch", "0", "positive integer"),
    ("--num-sampled", "0", "positive integer"), ("--threads", "-2", "non-negative integer"),
    ("--producers", "-1", "non-negative integer"), ("--log-every", "-1", "non-negative integer"),
    ("--seed", "-3", "non-negative integer"), ("--lr", "0", "positive finite number"),
    ("--lr", "nan", "positive finite number"), ("--dropout", "1.5", "number in [0, 1)"),
    ("--dropout", "-0.1", "number in [0, 1)"),
])
def test_bad_numbers_are_usage_errors(no_job, tmp_path, capsys, flag, value, expected):
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", flag, value, "--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}: expected a {expected}" in error and "usage:" in error, error
    assert not out.exists()


def test_num_sampled_with_the_full_softmax_is_a_usage_error(no_job, tmp_path, capsys, monkeypatch):
    """--num-sampled did nothing with --loss full (the default), without a word; with --loss sampled it is taken,
    and its default is 1024."""
    out = tmp_path / "report"
    for argv in (["--num-sampled", "64"], ["--loss", "full", "--num-sampled", "1024"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", *argv, "--out", str(out)])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert "applies to --loss sampled only (this job's loss is full)" in error and "usage:" in error, error
        assert not out.exists()
    taken = []
    monkeypatch.setattr(cli, "_train", lambda args: taken.append(args.num_sampled) or 0)
    for argv, expected in ((["--loss", "sampled", "--num-sampled", "64"], 64), (["--loss", "sampled"], 1024),
                           ([], 1024)):
        assert cli.main(["train", *argv, "--out", str(out)]) == 0
        assert taken[-1] == expected


@pytest.mark.parametrize("world_size, lanes, expected", [
    ("3", "32", "--lanes 32: the 3 ranks (WORLD_SIZE) each take an equal share of the lanes; use a multiple of 3"),
    ("two", "32", "WORLD_SIZE='two': expected the number of ranks"),
])
def test_lanes_the_world_size_does_not_divide_are_a_usage_error(no_job, tmp_path, capsys, monkeypatch, world_size,
                                                                lanes, expected):
    """Before, every rank's Trainer refused them, after the data's preprocessing and the rule baselines."""
    monkeypatch.setenv("WORLD_SIZE", world_size)
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--lanes", lanes, "--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert expected in error and "usage:" in error, error
    assert not out.exists()


@pytest.mark.parametrize("flag, value, expected", [
    ("--threads", str(2**31), "a non-negative integer up to 1024, got 2147483648"),
    ("--threads", "1025", "a non-negative integer up to 1024, got 1025"),
    ("--producers", "65", "a non-negative integer up to 64, got 65"),
])
def test_thread_counts_are_bounded_above(no_job, tmp_path, capsys, flag, value, expected):
    """--threads and --producers were bounded below only: --threads 2147483648 started the job, which then died in
    torch.set_num_threads (a C int) with a traceback, "Overflow when unpacking long", naming no flag. Both are now
    bounded (1024 threads, 64 producers), the bounds stated in --help, and a count above is a usage error."""
    out = tmp_path / "report"
    error = _usage_error(capsys, ["train", flag, value, "--out", str(out), "--device", "cpu"])
    assert f"argument {flag}: expected {expected}" in error, error
    assert not out.exists()
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "torch CPU threads, at most 1024" in text and "ring queue, at most 64" in text


@pytest.mark.parametrize("rank", ["x", "", "-1", "1.0"])
def test_a_rank_that_is_not_a_non_negative_integer_is_a_usage_error(no_job, monkeypatch, tmp_path, capsys, rank):
    """The job read torchrun's RANK with int() unguarded: RANK=x failed with a traceback, "invalid literal for int()
    with base 10: 'x'", naming neither the variable nor the fix (and RANK=-1 ran the job as a rank that is not 0).
    Like WORLD_SIZE, it is now a usage error naming RANK, before the report folder is made."""
    monkeypatch.setenv("RANK", rank)
    out = tmp_path / "report"
    error = _usage_error(capsys, ["train", "--out", str(out)])
    assert f"RANK={rank!r}: expected this process's rank, a non-negative integer (torchrun sets it)" in error, error
    assert not out.exists()


def test_good_numbers_pass(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(cli, "_train", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["train", "--epochs", "1", "--dim", "8", "--dropout", "0", "--threads", "0", "--lr", "1e-3",
                     "--out", str(tmp_path / "report")]) == 0
    assert (seen["epochs"], seen["dim"], seen["dropout"], seen["threads"], seen["lr"]) == (1, 8, 0.0, 0, 1e-3)


@pytest.mark.parametrize("where", ["under a file", "is a file"])
def test_an_unusable_report_folder_is_refused_before_any_work(no_job, tmp_path, capsys, where):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    out = a_file / "report" if where == "under a file" else a_file
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"--out {out}: cannot create or write the report folder" in error, error
    assert a_file.read_text() == "not a folder"


def test_the_report_folder_is_created_and_left_without_a_probe_file(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_train", lambda args: 0)
    out = tmp_path / "deep" / "report"
    assert cli.main(["train", "--out", str(out)]) == 0
    assert out.is_dir() and list(out.iterdir()) == []


# ---- the job on ml-100k, shrunk to seconds ---------------------------------------------------------

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    pytest.importorskip("recbole")
    return str(tmp_path_factory.mktemp("cli_cache"))


def _job(out, cache_dir, *extra):
    return ["train", "--epochs", "1", "--dim", "8", "--models", "session_gru,hiertcn", "--out", str(out),
            "--cache-dir", cache_dir, *extra]


def _failing_evaluate(monkeypatch, error, on_call=1):
    """evaluate() raises ``error`` on its ``on_call``-th call and runs normally on the others."""
    import hiertcn_fast.train as train

    real, calls = train.evaluate, []

    def evaluate(model, *args, **kwargs):
        calls.append(type(model).__name__)
        if len(calls) == on_call:
            raise error
        return real(model, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate", evaluate)
    return calls


def test_a_failed_model_keeps_the_others_and_fails_the_job(monkeypatch, tmp_path, cache_dir, capsys):
    calls = _failing_evaluate(monkeypatch, RuntimeError("scores went bad"))
    out = tmp_path / "report"
    assert cli.main(_job(out, cache_dir)) == 1
    assert len(calls) == 2
    captured = capsys.readouterr()
    assert "[session_gru] FAILED (RuntimeError: scores went bad)" in captured.err
    assert "Traceback" in captured.err and "scores went bad" in captured.err
    document = json.loads((out / "results.json").read_text())
    assert set(document["models"]) == {"most_popular", "repeat_previous", "transitions", "hiertcn"}
    assert document["metadata"]["status"] == "failed"
    assert document["metadata"]["models_failed"] == {"session_gru": "RuntimeError: scores went bad"}
    report = (out / "report.md").read_text()
    assert "| hiertcn |" in report and "| session_gru |" not in report
    assert "- FAILED: session_gru (RuntimeError: scores went bad)" in report
    assert (out / "quality.png").exists()


def test_a_closed_stdout_stops_the_job_quietly(monkeypatch, tmp_path, cache_dir, capsys):
    """Piped into `head`, the job's stdout closes: that is no model's failure, and the job stops."""
    calls = _failing_evaluate(monkeypatch, BrokenPipeError(32, "Broken pipe"))
    monkeypatch.setattr(cli.os, "dup2", lambda *args: None)  # leave the test process's stdout alone
    assert cli.main(_job(tmp_path / "report", cache_dir, "--no-rules")) == 1
    assert len(calls) == 1  # the second model never started
    assert "FAILED" not in capsys.readouterr().err


def test_results_are_written_as_each_model_finishes(monkeypatch, tmp_path, cache_dir):
    """A job stopped during its second model (here by Ctrl-C) leaves the first one's results."""
    _failing_evaluate(monkeypatch, KeyboardInterrupt(), on_call=2)
    out = tmp_path / "report"
    with pytest.raises(KeyboardInterrupt):
        cli.main(_job(out, cache_dir, "--no-rules"))
    document = json.loads((out / "results.json").read_text())
    assert list(document["models"]) == ["session_gru"]
    assert document["metadata"]["status"] == "incomplete"
    assert document["metadata"]["models_pending"] == ["hiertcn"]
    report = (out / "report.md").read_text()
    assert "| session_gru |" in report and "INCOMPLETE" in report and "not finished: hiertcn" in report
    assert not (out / "quality.png").exists()  # the plots come with the final write


def test_an_earlier_report_is_replaced_and_the_job_says_so(tmp_path, cache_dir, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("an earlier run")
    (out / "throughput.png").write_bytes(b"an earlier plot")
    (out / "mine.txt").write_text("kept")
    assert cli.main(_job(out, cache_dir, "--no-rules", "--models", "session_gru")) == 0
    stdout = capsys.readouterr().out
    assert f"--out {out}: replacing the earlier report there (report.md, throughput.png)" in stdout
    assert stdout.index("replacing the earlier report") < stdout.index("[session_gru]")
    assert "| session_gru |" in (out / "report.md").read_text()
    assert (out / "throughput.png").read_bytes()[:4] == b"\x89PNG" and (out / "mine.txt").read_text() == "kept"
    document = json.loads((out / "results.json").read_text())
    assert document["metadata"]["status"] == "complete" and document["metadata"]["models_failed"] == {}
    # The data notes say how preprocessing filtered and truncated the log (finding: filters see the whole log).
    assert any("BEFORE the split" in note and "dropped 67,768 events" in note for note in document["notes"])
    # The report says its models were trained once, at one setting and seed, and where the spread is measured.
    assert any("at this one setting and seed" in note and "quality_sweep.py" in note for note in document["notes"])


def test_the_evaluated_split_is_named_as_it_is_and_rules_only_when_fitted(tmp_path, cache_dir, capsys):
    """The console line said "test" whatever --split named, and the notes said "rules fitted on train" after
    --no-rules."""
    out = tmp_path / "report"
    assert cli.main(_job(out, cache_dir, "--no-rules", "--models", "session_gru", "--split", "valid")) == 0
    stdout = capsys.readouterr().out
    assert "[session_gru] valid Recall@10" in stdout and "[session_gru] test" not in stdout
    notes = json.loads((out / "results.json").read_text())["notes"]
    assert any("every event of the valid split" in note for note in notes)
    assert not any("rules fitted" in note for note in notes)


def test_the_reports_wall_time_counts_from_the_commands_start(tmp_path):
    """report.md's note "wall time from the command's start to this report" and results.json's
    ``metadata.wall_seconds`` count from the command's start: ``python -m hiertcn_fast`` (and the ``hiertcn-fast``
    script) reach cli.main() only after importing the package, torch and the extension, seconds the report left out
    (the first write, after the rules, said ~0.2 s into a job that had run ~2.5 s). Measured on the first write (no
    plots) against its own ``created_unix``; the job is then stopped."""

    out = tmp_path / "report"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = time.time()
    job = subprocess.Popen([sys.executable, "-m", "hiertcn_fast", "train", "--out", str(out), "--cache-dir",
                            str(tmp_path / "cache"), "--epochs", "1000", "--dim", "2", "--models", "session_gru"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 170
        while True:
            try:
                document = json.loads((out / "results.json").read_text())
                break
            except (FileNotFoundError, json.JSONDecodeError):
                assert time.time() < deadline and job.poll() is None, "the job wrote no report"
                time.sleep(0.05)
    finally:
        job.kill()
        job.wait()
    since_start = document["created_unix"] - started
    reported = document["metadata"]["wall_seconds"]
    assert document["metadata"]["status"] == "incomplete"
    assert reported >= 0.5 * since_start, (reported, since_start)


def test_a_damaged_cache_is_refused_before_any_work_with_the_way_out(tmp_path, capsys):
    """A damaged session cache ended the job in a traceback from the rule baselines' first read (lazy checksums),
    with an API-only way out; it is now refused before any work, and --rebuild-cache replaces it."""
    pytest.importorskip("recbole")
    cache_dir, out = tmp_path / "cache", tmp_path / "report"
    job = ["train", "--epochs", "1", "--dim", "8", "--models", "session_gru", "--out", str(out), "--cache-dir",
           str(cache_dir)]
    assert cli.main(job) == 0
    item = next(cache_dir.glob("ml-100k-*/item.bin"))
    data = bytearray(item.read_bytes())
    data[len(data) // 2] ^= 0xFF
    item.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(job) == 1
    captured = capsys.readouterr()
    assert f"{item}: checksum mismatch in partition" in captured.err
    assert "run again with --rebuild-cache" in captured.err and "Traceback" not in captured.err
    assert captured.err.count("rebuild=True") == 1, captured.err  # the advice once, not once per layer
    assert "[session_gru]" not in captured.out and not (out / "results.json").exists()
    assert item.read_bytes() == bytes(data)  # refused, not replaced
    assert cli.main([*job, "--rebuild-cache"]) == 0
    assert item.read_bytes() != bytes(data)
    assert json.loads((out / "results.json").read_text())["metadata"]["status"] == "complete"


def test_a_model_too_large_for_the_memory_is_refused_before_it_is_built(monkeypatch, tmp_path, cache_dir, capsys):
    """A width whose parameters alone overflow the memory was allocated (failing late, or, memory being granted
    before it is touched, ending in the kernel's out-of-memory killer with the whole job). Such a model is now
    reported as failed before it is built, with its figures, and the others go on."""
    import torch
    from hiertcn_fast.train import build_model

    hiertcn = sum(p.numel() for p in build_model("hiertcn", 1295, **cli.MODEL_SIZES["hiertcn"](8)).parameters())
    session_gru = sum(p.numel() for p in build_model("session_gru", 1295,
                                                     **cli.MODEL_SIZES["session_gru"](8)).parameters())
    assert session_gru < hiertcn
    limit = 16 * (session_gru + hiertcn) // 2  # session_gru's 16 bytes a parameter fit, hiertcn's do not
    seen = []
    monkeypatch.setattr(cli, "_available_memory_bytes", lambda device: seen.append(device) or limit)
    built = []
    import hiertcn_fast.train as train
    real_build = train.build_model
    monkeypatch.setattr(train, "build_model", lambda name, *a, **k: built.append(
        (name, torch.get_default_device().type)) or real_build(name, *a, **k))
    out = tmp_path / "report"
    assert cli.main(_job(out, cache_dir, "--no-rules")) == 1
    captured = capsys.readouterr()
    expected = (f"hiertcn at --dim 8 needs at least {16 * hiertcn / 2**30:.2f} GiB to train: {hiertcn:,} parameters "
                f"and their gradients and Adam's two moments, 16 bytes a parameter, before any activation; cpu has "
                f"{limit / 2**30:.2f} GiB available. Not trained")
    assert f"[hiertcn] FAILED (MemoryError: {expected}" in captured.err and "Traceback" not in captured.err
    assert [name for name, where in built if where == "cpu"] == ["session_gru"]  # hiertcn: only on meta
    assert len(seen) == 2
    document = json.loads((out / "results.json").read_text())
    assert list(document["models"]) == ["session_gru"] and document["metadata"]["status"] == "failed"
    assert any(note.startswith("FAILED: hiertcn (MemoryError") and "traceback" not in note
               for note in document["notes"])


def test_the_available_memory_is_read_on_linux():
    import torch

    available = cli._available_memory_bytes(torch.device("cpu"))
    if not os.path.exists("/proc/meminfo"):
        assert available is None
    else:
        with open("/proc/meminfo") as meminfo:
            total = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1]) * 1024
        assert 0 < available <= total


def test_a_missing_recbole_wheel_is_a_usage_error_before_any_folder(no_job, monkeypatch, tmp_path, capsys):
    """ml-100k ships inside the recbole wheel. Without it the job made its report and cache folders and then
    ended in a traceback from the data's reader."""
    import importlib.util

    import hiertcn_fast.data.readers as readers

    real = importlib.util.find_spec
    monkeypatch.setattr(readers.importlib.util, "find_spec", lambda name, *a: None if name == "recbole"
                        else real(name, *a))
    out, cache = tmp_path / "report", tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--out", str(out), "--cache-dir", str(cache)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert ("--dataset ml-100k: data set 'ml-100k' ships inside the 'recbole' wheel, which is not installed; install "
            "it without its dependencies: pip install --no-deps recbole==1.2.1") in error and "usage:" in error, error
    assert not out.exists() and not cache.exists()


def test_help_and_version_say_what_the_tool_is(capsys):
    """--help began with the module docstring's markup (``python -m hiertcn_fast <command>``), --version was an
    error, and --epochs, --lanes and --sessions-per-batch had no help and showed no default."""
    from hiertcn_fast import __version__

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"hiertcn-fast {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "``" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (("--epochs EPOCHS", 15), ("--lanes LANES", 32), ("--dim DIM", 64), ("--lr LR", 0.01),
                            ("--sessions-per-batch SESSIONS_PER_BATCH", 10)):
        described = text.split(f" {option} ", 1)[1].split(" --", 1)[0]
        assert f"(default: {default}" in described, (option, described)
