"""Differential checks of the report writer (report.py), the rule report's output functions (format_table,
preprocessing_note) and the command line (cli.py, __main__.py), from a fuzzing pass: numbers in report.md equal
results.json and the ModelResults, NaN / inf / zero-event results, odd model names, failed writes, strict JSON, bad
flags, --help, README flags. (The defects that pass found are tested in test_report.py, test_models_rules.py and
test_cli.py.)"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hiertcn_fast import cli
from hiertcn_fast.evaluate import RankingMetrics
from hiertcn_fast.report import TABLE_METRICS, ModelResult, write_report
from hiertcn_fast.rule_report import format_table
from test_cli import no_job  # noqa: F401 (fixture)
from test_cli_audit_fixes import _usage_error
from test_report import _drawn, _legend_texts, _quality, _strict_json, _tables, _truncated

ROOT = Path(__file__).resolve().parents[1]


def _figure(value, spec=".4f"):
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


# ---- numbers: report.md == ModelResult == results.json ----------------------------------------------------

def _mixed_results():
    return [
        ModelResult("hiertcn", _quality(0), training_curve=[(0, 3.5), (1, math.nan), (2, math.inf), (3, 1.0)],
                    events_per_second=1234567.5, peak_memory_bytes=3 * 2**20 + 12345),
        ModelResult("most_popular", _quality(2, with_first=False), events_per_second=0.49, peak_memory_bytes=0),
        ModelResult("session_gru", _truncated(_quality(1), beyond=7)),
        ModelResult("empty", RankingMetrics().result()),  # zero events: every metric NaN
    ]


def test_every_table_cell_equals_the_model_result_and_results_json(tmp_path):
    results = _mixed_results()
    written = write_report(results, tmp_path, notes=["n"], metadata={"nan": math.nan, "inf": [math.inf]})
    document = _strict_json(written["results"].read_text())
    assert document["metadata"] == {"nan": None, "inf": [None]}
    assert document["models"]["hiertcn"]["training_curve"] == [[0.0, 3.5], [1.0, None], [2.0, None], [3.0, 1.0]]
    main, breakdown = _tables(written["report"].read_text())
    header, rows = main[0], {row[0]: row for row in main[1:]}
    assert len(rows) == len(results) and all(len(row) == len(header) for row in main)
    for r in results:
        stored = document["models"][r.name]
        row = dict(zip(header, rows[r.name]))
        for unit, label in (("per_user", "per user"), ("per_event", "per event")):
            for metric in TABLE_METRICS:
                value = r.quality[unit]["all"][metric]
                assert row[f"{metric} ({label})"] == _figure(value) == _figure(stored["quality"][unit]["all"][metric])
        assert row["events/s"] == _figure(r.events_per_second, ",.0f") == _figure(stored["events_per_second"], ",.0f")
        assert row["peak memory"] == ("n/a" if r.peak_memory_bytes is None else
                                      f"{stored['peak_memory_bytes'] / 2**20:,.1f} MiB")
        assert row["events"] == str(r.quality["counts"]["events"]) == str(stored["quality"]["counts"]["events"])
    assert rows["hiertcn"][header.index("events/s")] == "1,234,568"
    assert rows["hiertcn"][header.index("peak memory")] == "3.0 MiB"
    assert rows["most_popular"][header.index("peak memory")] == "0.0 MiB"
    assert set(rows["empty"][1:header.index("peak memory") + 1]) == {"n/a"}
    header, rows = breakdown[0], {row[0]: row for row in breakdown[1:]}
    for r in results:
        row = dict(zip(header, rows[r.name]))
        for group, label in (("first_in_session", "first"), ("rest", "rest")):
            for metric in TABLE_METRICS:
                assert row[f"{metric} ({label})"] == _figure(r.quality["per_user"][group][metric])
    markdown = written["report"].read_text()
    assert not re.search(r"\b(nan|inf)\b", markdown, re.IGNORECASE), markdown


def test_results_json_read_back_writes_the_same_report(tmp_path):
    """results.json's "models" has ModelResult's fields: feeding it back (NaN now null) gives the same report.md."""
    results = _mixed_results()
    results[0].training_curve = [(0, 3.5), (3, 1.0)]  # (a NaN loss reads back as null: see test_report.py)
    first = write_report(results, tmp_path / "a", title="T", notes=["n"])
    document = _strict_json(first["results"].read_text())
    second = write_report(document["models"], tmp_path / "b", title="T", notes=["n"])
    assert second["report"].read_text() == first["report"].read_text()
    assert _strict_json(second["results"].read_text())["models"] == document["models"]


def test_format_table_shows_the_numbers_report_md_shows(tmp_path):
    results = {r.name: r for r in _mixed_results()}
    markdown = write_report(list(results.values()), tmp_path, plots=False)["report"].read_text()
    main = _tables(markdown)[0]
    rows = {row[0]: dict(zip(main[0], row)) for row in main[1:]}
    for unit, label in (("per_user", "per user"), ("per_event", "per event")):
        table = format_table(results, unit).splitlines()
        assert table[1].split()[-1] == "events"  # different event sets: the column is there
        for line in table[2:]:
            cells = line.split()
            row = rows[cells[0]]
            shown = [row[f"{m} ({label})"] for m in ("Recall@10", "MRR", "NDCG@10")]
            assert [c if c != "-" else "n/a" for c in cells[1:4]] == shown, (line, shown)
            assert (cells[6] if cells[6] != "-" else "n/a") == row["events/s"]
            assert cells[7] == row["events"]


# ---- odd model names --------------------------------------------------------------------------------------

def test_names_with_slashes_spaces_and_unicode_are_reported_as_written(tmp_path, monkeypatch):
    figures = _drawn(monkeypatch)
    names = ["a/b", "with spaces", "ünïcode ✓", "..", "-x"]
    results = [ModelResult(name, _quality(i), training_curve=[(0, 1.0), (1, 0.5)], events_per_second=1.0)
               for i, name in enumerate(names)]
    written = write_report(results, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["report.md", "results.json", "training_curves.png", "quality.png", "throughput.png"])
    assert list(_strict_json(written["results"].read_text())["models"]) == names
    assert [row[0] for row in _tables(written["report"].read_text())[0][1:]] == names
    for plot in ("training_curves.png", "quality.png"):
        assert [text.get_text() for text in _legend_texts(figures[plot])] == names, plot


# ---- ModelResult's numbers --------------------------------------------------------------------------------

def test_bad_figures_are_refused_naming_the_field():
    for field, value in (("events_per_second", math.nan), ("events_per_second", math.inf),
                         ("peak_memory_bytes", -1), ("peak_memory_bytes", True), ("events_per_second", "5")):
        with pytest.raises(ValueError, match=f"{field} of 'a'"):
            ModelResult("a", _quality(0), **{field: value})
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        ModelResult("", _quality(0))


# ---- failed writes ----------------------------------------------------------------------------------------

def test_an_out_dir_that_is_a_file_is_refused_and_left_alone(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("mine")
    for out in (a_file, a_file / "sub"):
        with pytest.raises(OSError):
            write_report([ModelResult("a", _quality(0))], out)
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


# ---- the rule report's preprocessing note ----------------------------------------------------------------

def test_preprocessing_note_counts_add_up_to_the_cache(tmp_path):
    pytest.importorskip("recbole")
    from hiertcn_fast.data import load_dataset, preprocess
    from hiertcn_fast.rule_report import ML100K_PARAMS, preprocessing_note

    cache = preprocess(load_dataset("ml-100k"), tmp_path / "cache", ML100K_PARAMS)
    note = preprocessing_note(cache)
    stats = cache.manifest["stats"]
    numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", note)]
    assert f"of {stats['events_read']:,} events read" in note
    assert "(333 items, 713 events)" in note and "(0 users, 0 events)" in note  # README's figures
    assert "first 20 events dropped 67,768 events" in note and "BEFORE the split" in note
    dropped = (stats["events_dropped_item_filter"] + stats["events_dropped_user_too_few_events"]
               + stats["events_dropped_user_too_many_events"] + stats["events_dropped_session_truncation"])
    assert stats["events_read"] - dropped == cache.num_events == 31519 and 100000 in numbers


# ---- the command line -------------------------------------------------------------------------------------

NUMERIC_FLAGS = ["--epochs", "--dim", "--lr", "--dropout", "--num-sampled", "--lanes", "--sessions-per-batch",
                 "--producers", "--seed", "--threads", "--log-every"]


@pytest.mark.parametrize("value", ["abc", "1,5"])
@pytest.mark.parametrize("flag", NUMERIC_FLAGS)
def test_non_numeric_values_are_usage_errors_naming_the_flag(no_job, tmp_path, capsys, flag, value):
    out = tmp_path / "report"
    error = _usage_error(capsys, ["train", flag, value, "--out", str(out)])
    assert f"argument {flag}:" in error, error
    assert not out.exists()


@pytest.mark.parametrize("argv, flag", [
    (["--dim", "-5"], "--dim"), (["--lanes", "-1"], "--lanes"), (["--num-sampled", "-1"], "--num-sampled"),
    (["--lr", "-1e-3"], "--lr"), (["--lr", "-inf"], "--lr"), (["--dropout", "1"], "--dropout"),
    (["--dropout", "nan"], "--dropout"), (["--lr", "1e-400"], "--lr"), (["--seed", str(2**63)], "--seed"),
    (["--loss", "softmax"], "--loss"), (["--split", "train"], "--split"), (["--split-by", "item"], "--split-by"),
    (["--backend", "auto"], "--backend"), (["--models", "hiertcn,nope"], "--models"),
    (["--out", " "], "--out"), (["--cache-dir", ""], "--cache-dir"), (["--epochs"], "--epochs"),
])
def test_bad_values_are_usage_errors_naming_the_flag(no_job, tmp_path, capsys, argv, flag):
    out = tmp_path / "report"
    error = _usage_error(capsys, ["train", *argv] + ([] if flag == "--out" else ["--out", str(out)]))
    assert f"argument {flag}" in error, error
    assert not out.exists()


def test_help_exits_zero_and_lists_every_option(capsys):
    from hiertcn_fast import rule_report

    for argv in (["--help"], ["train", "--help"], ["info", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0, argv
    text = capsys.readouterr().out
    for flag in ["--out", "--dataset", "--cache-dir", "--models", "--no-rules", "--split", "--split-by",
                 "--backend", "--device", "--loss", *NUMERIC_FLAGS]:
        assert flag in text, flag
    assert "%" not in text.replace("80%/90%", "")  # no unexpanded %(default)s
    with pytest.raises(SystemExit) as exit_info:
        rule_report.main(["--help"])
    assert exit_info.value.code == 0
    _usage_error(capsys, [])  # no command: a usage error


def _train_help(capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    return capsys.readouterr().out


def test_every_flag_the_docs_name_exists(capsys):
    """README's main-job paragraph and cli.py's docstring name only flags that `train` has; the rule report's
    docstring only flags that it has."""
    from hiertcn_fast import rule_report

    readme = (ROOT / "README.md").read_text()
    paragraph = readme[readme.index("The main job (`python -m hiertcn_fast train`)"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    named = set(re.findall(r"`(--[a-z][a-z-]*)", paragraph)) | set(re.findall(r"``(--[a-z][a-z-]*)", cli.__doc__))
    assert {"--out", "--epochs", "--dim", "--dropout", "--seed", "--backend", "--models"} <= named
    options = set(re.findall(r"(--[a-z][a-z-]*)", _train_help(capsys)))
    assert named <= options, named - options
    with pytest.raises(SystemExit):
        rule_report.main(["--help"])
    rule_options = set(re.findall(r"(--[a-z][a-z-]*)", capsys.readouterr().out))
    assert set(re.findall(r"\[(--[a-z-]+)", rule_report.__doc__)) <= rule_options


def test_python_m_exits_2_on_a_usage_error_before_making_the_folder(tmp_path):
    out = tmp_path / "report"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "hiertcn_fast", "train", "--dim", "0", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "argument --dim: expected a positive integer, got 0" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and done.stdout == ""
