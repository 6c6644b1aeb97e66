"""The report folder: files written, strict JSON that round-trips, numbers in the markdown, valid PNGs."""

import json
import math
import re
import unicodedata

import numpy as np
import pytest
import torch

import hiertcn_fast.report as report_module
from hiertcn_fast.evaluate import RankingMetrics
from hiertcn_fast.report import ModelResult, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

def _quality(seed: int, ties: str = "optimistic", with_first: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    metrics = RankingMetrics(ties=ties)
    n = 40
    first = rng.random(n) < 0.3 if with_first else np.zeros(n, dtype=bool)
    metrics.update(torch.from_numpy(rng.normal(size=(n, 25))), torch.from_numpy(rng.integers(1, 25, n)),
                   torch.from_numpy(rng.integers(0, 6, n)), torch.from_numpy(first))
    return metrics.result()

def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity tokens (which Python's json accepts by default)."""
    def refuse(token):
        raise AssertionError(f"results.json holds the non-JSON token {token}")
    return json.loads(text, parse_constant=refuse)

# A cell of a markdown table row: up to an unescaped "|" (a backslash escapes the next character, as GitHub's
# markdown reads a table row); then a backslash-escaped ASCII punctuation character shows as itself.
_CELL = re.compile(r"((?:\\.|[^\\|])*)\|")
_ESCAPED_PUNCTUATION = re.compile(r"\\([!-/:-@\[-`{-~])")

def _tables(markdown: str) -> list[list[list[str]]]:
    """Every markdown table: rows of cells as a markdown reader shows them (header first, the |---| line dropped)."""
    tables, current = [], None
    for line in markdown.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
            if not line.startswith("|---"):
                current.append([_ESCAPED_PUNCTUATION.sub(r"\1", cell.strip()) for cell in _CELL.findall(line[1:])])
        else:
            current = None
    return tables

def _drawn(monkeypatch) -> dict:
    """The figures write_report saves (as usual), by file name."""
    figures, save = {}, report_module._save_figure

    def capture(figure, path):
        figures[path.name] = figure
        save(figure, path)

    monkeypatch.setattr(report_module, "_save_figure", capture)
    return figures

def _legend_texts(figure) -> list:
    """The legend entries (matplotlib Text objects) of every axes of ``figure``."""
    return [text for axes in figure.axes if axes.get_legend() for text in axes.get_legend().get_texts()]

def _results():
    return [
        ModelResult("hiertcn", _quality(0), training_curve=[(0, 3.5), (10, 2.25), (20, 1.75)],
                    events_per_second=123456.7, peak_memory_bytes=300 * 2**20, extra={"epochs": 2}),
        ModelResult("most_popular", _quality(1, with_first=False), events_per_second=9.9e6),
    ]

def test_files_json_markdown_and_pngs(tmp_path):
    results = _results()
    written = write_report(results, tmp_path / "report", title="Test report", notes=["data: synthetic"],
                           metadata={"seed": 3})
    assert set(written) == {"training_curves", "quality", "throughput", "report", "results"}
    for name in ("training_curves", "quality", "throughput"):
        data = written[name].read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000, name
        assert data[12:16] == b"IHDR"

    document = json.loads(written["results"].read_text())
    assert document["metadata"] == {"seed": 3} and document["notes"] == ["data: synthetic"]
    assert document["tie_policy"] == results[0].quality["tie_policy"]
    hiertcn = document["models"]["hiertcn"]
    assert hiertcn["training_curve"] == [[0.0, 3.5], [10.0, 2.25], [20.0, 1.75]]
    assert hiertcn["events_per_second"] == 123456.7 and hiertcn["peak_memory_bytes"] == 300 * 2**20
    assert hiertcn["extra"] == {"epochs": 2}
    for result in results:
        stored = document["models"][result.name]["quality"]
        for unit in ("per_user", "per_event"):
            for group, values in result.quality[unit].items():
                for metric, value in values.items():
                    expected = None if isinstance(value, float) and math.isnan(value) else value
                    assert stored[unit][group][metric] == expected, (result.name, unit, group, metric)
    # The empty first-of-session group is NaN in memory and null in the strict JSON.
    assert document["models"]["most_popular"]["quality"]["per_event"]["first_in_session"]["MRR"] is None

    markdown = written["report"].read_text()
    assert markdown.startswith("# Test report")
    rows = {}  # the main table's row of each model (the breakdown table comes after it)
    for line in markdown.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    for result in results:
        for unit in ("per_user", "per_event"):
            for metric in ("Recall@10", "MRR", "NDCG@10"):
                assert f"{result.quality[unit]['all'][metric]:.4f}" in rows[result.name]
    assert "123,457" in rows["hiertcn"] and "300.0 MiB" in rows["hiertcn"]
    assert "9,900,000" in rows["most_popular"] and "n/a" in rows["most_popular"]
    assert "strictly higher" in markdown and "then mean over users" in markdown
    assert "![quality](quality.png)" in markdown

def test_optional_plots_are_skipped(tmp_path):
    written = write_report({"rule": {"quality": _quality(2)}}, tmp_path)
    assert set(written) == {"quality", "report", "results"}
    assert not (tmp_path / "training_curves.png").exists()
    assert json.loads((tmp_path / "results.json").read_text())["files"] == ["quality.png", "report.md"]

def test_bad_results_raise(tmp_path):
    with pytest.raises(ValueError, match="at least one model"):
        write_report([], tmp_path)
    with pytest.raises(ValueError, match="different tie policies"):
        write_report([ModelResult("a", _quality(0)), ModelResult("b", _quality(0, ties="average"))], tmp_path)
    with pytest.raises(ValueError, match="names must be unique"):
        write_report([ModelResult("a", _quality(0)), ModelResult("a", _quality(1))], tmp_path)
    with pytest.raises(ValueError, match="has no 'per_user'"):
        ModelResult("a", {"MRR": 0.1})
    with pytest.raises(ValueError, match="training_curve of 'a'"):
        ModelResult("a", _quality(0), training_curve=[(1, 2, 3)])
    with pytest.raises(ValueError, match="events_per_second of 'a'"):
        ModelResult("a", _quality(0), events_per_second=-1.0)
    with pytest.raises(TypeError, match="notes must be"):
        write_report([ModelResult("a", _quality(0))], tmp_path, notes="one string")


def _truncated(quality: dict, beyond: int, max_length: int = 5) -> dict:
    """``quality`` as evaluate() gives it for a model that left ``beyond`` events unscored."""
    quality = json.loads(json.dumps(quality))
    quality["counts"]["events"] -= beyond
    quality["session_truncation"] = {"max_session_length": max_length, "events_not_scored": beyond}
    return quality


def test_models_scored_on_different_events_show_each_count(tmp_path):
    rules = ModelResult("most_popular", _quality(1))
    short = ModelResult("hiertcn", _truncated(_quality(1), beyond=7))
    markdown = write_report([rules, short], tmp_path)["report"].read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| model |"))
    assert header.endswith("| events |")
    rows = {}  # the main table's row of each model
    for line in markdown.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), line)
    assert rows["most_popular"].endswith(" 40 |") and rows["hiertcn"].endswith(" 33 |")
    evaluated = next(line for line in markdown.splitlines() if line.startswith("- Evaluated:"))
    assert "NOT the same events" in evaluated
    assert "most_popular 40 events of" in evaluated and "hiertcn 33 events of" in evaluated
    assert "7 more events, after the first 5 of their session, not scored" in evaluated

    # The same events for every model: one line, no extra column (the main job's usual report).
    same = ModelResult("hiertcn", _quality(1))
    markdown = write_report([rules, same], tmp_path)["report"].read_text()
    assert "| events |" not in markdown and "NOT the same" not in markdown
    assert "- Evaluated: 40 events of 6 users (" in markdown


def test_format_table_prints_missing_figures_as_a_dash():
    from hiertcn_fast.rule_report import format_table

    quality = _quality(1, with_first=False)  # NaN in the empty first-of-session group
    quality["per_user"]["all"]["MRR"] = None  # e.g. read back from results.json
    table = format_table({"rule": ModelResult("rule", quality, events_per_second=None)})
    row = table.splitlines()[2].split()
    assert row[0] == "rule" and row[2] == "-" and row[4] == "-" and row[6] == "-", table
    assert table.splitlines()[1].split()[-1] == "events/s"
    table = format_table({"rule": ModelResult("rule", _quality(1)),
                          "hiertcn": ModelResult("hiertcn", _truncated(_quality(0), beyond=7), events_per_second=1.0)})
    assert table.splitlines()[1].split()[-1] == "events"
    assert table.splitlines()[2].split()[-1] == "40" and table.splitlines()[3].split()[-1] == "33"


def test_rewriting_a_folder_keeps_exactly_this_calls_report_files(tmp_path):
    """The main job rewrites its folder as results come in: a quick write (no plots) removes the plots of an
    earlier write, and no temporary file is left behind."""
    (tmp_path / "notes.txt").write_text("mine")
    write_report(_results(), tmp_path)
    assert (tmp_path / "throughput.png").exists()
    written = write_report(_results()[1:], tmp_path, plots=False)
    assert set(written) == {"report", "results"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "report.md", "results.json"]
    assert "## Plots" not in written["report"].read_text()
    assert list(json.loads(written["results"].read_text())["models"]) == ["most_popular"]


def _with_figures(name, seed, figures):
    """A model whose per-user and per-event Recall@10 / MRR / NDCG@10 over all events are ``figures``."""
    quality = _quality(seed)
    for unit in ("per_user", "per_event"):
        quality[unit]["all"].update(zip(("Recall@10", "MRR", "NDCG@10"), figures))
    return ModelResult(name, quality)


def test_report_says_which_model_leads_and_how_far_hiertcn_is_from_it(tmp_path):
    results = [_with_figures("hiertcn", 0, (0.25, 0.12, 0.13)), _with_figures("session_gru", 0, (0.26, 0.11, 0.13)),
               _with_figures("hrnn", 0, (0.24, 0.10, 0.12))]
    markdown = write_report(results, tmp_path, plots=False)["report"].read_text()
    section = markdown.split("## Who leads")[1].split("##")[0]
    assert ("- Recall@10 (per user): session_gru 0.2600; hiertcn is 2 of 3 with 0.2500, 0.0100 (3.8%) behind"
            in section)
    assert "- MRR (per event): hiertcn 0.1200, ahead of session_gru (0.1100) by 0.0100" in section
    assert "- NDCG@10 (per user): hiertcn and session_gru 0.1300\n" in section  # a shared lead
    events = results[0].quality["counts"]["events"]
    low, high = sorted(math.sqrt(p * (1 - p) / events) for p in (0.24, 0.26))
    assert f"over these {events} events: {low:.4f} to {high:.4f}" in section
    # One model: nothing to compare.
    alone = write_report(results[:1], tmp_path / "alone", plots=False)["report"].read_text()
    assert "## Who leads" not in alone


def test_who_leads_ranks_ties_alike_and_flags_different_event_sets(tmp_path):
    figures = {"session_gru": (0.30, 0.1, 0.1), "hrnn": (0.25, 0.1, 0.1), "hiertcn": (0.25, 0.1, 0.1)}
    for order in (["session_gru", "hrnn", "hiertcn"], ["session_gru", "hiertcn", "hrnn"]):
        results = [_with_figures(name, 0, figures[name]) for name in order]
        section = write_report(results, tmp_path / "-".join(order), plots=False)["report"].read_text().split(
            "## Who leads")[1]
        assert "hiertcn is 2 of 3 with 0.2500" in section
        assert "mix event sets" not in section
    # Figures that differ below the 4 digits shown tie (there was "ahead of hrnn (0.2500) by 0.0000").
    close = [_with_figures("hiertcn", 0, (0.250049, 0.1, 0.1)), _with_figures("hrnn", 0, (0.250041, 0.1, 0.1))]
    section = write_report(close, tmp_path / "close", plots=False)["report"].read_text().split(
        "## Who leads")[1].split("##")[0]
    assert "Recall@10 (per user): hiertcn and hrnn 0.2500\n" in section and "0.0000" not in section
    results = [_with_figures("session_gru", 0, figures["session_gru"]), _with_figures("hiertcn", 1, figures["hiertcn"])]
    results[1].quality["counts"]["events"] += 1
    section = write_report(results, tmp_path / "mixed", plots=False)["report"].read_text().split("## Who leads")[1]
    assert "Not every model was scored on the same events" in section


@pytest.mark.parametrize("name, shown", [
    ("a|b", "a|b"), ("x\ny", "x\\ny"), ("back\\|slash", "back\\|slash"), ("tab\there\u2028", "tab\\there\\u2028"),
])
def test_a_name_with_a_pipe_or_a_line_break_is_one_table_cell(tmp_path, name, shown):
    """report.md put a model's name into its rows as it was: "a|b" added a cell (the numbers shifted one column to
    the right) and "x\ny" cut the row in two. Now "|" and "\\" are escaped with a backslash and a control character
    or line break is written as its Python escape, so the name is one cell; results.json keeps it as written."""
    results = [ModelResult(name, _quality(0)), ModelResult("hiertcn", _quality(1))]
    written = write_report(results, tmp_path / "odd", plots=False)
    markdown = written["report"].read_text()
    tables = _tables(markdown)
    assert len(tables) == 2
    for table in tables:
        assert all(len(row) == len(table[0]) for row in table), table
        assert [row[0] for row in table[1:]] == [shown, "hiertcn"]
    assert not any(unicodedata.category(char) in ("Cc", "Zl", "Zp") for char in markdown.replace("\n", ""))
    plain = write_report([ModelResult("plain", _quality(0)), results[1]], tmp_path / "plain", plots=False)
    assert len(markdown.splitlines()) == len(plain["report"].read_text().splitlines())
    assert list(_strict_json(written["results"].read_text())["models"]) == [name, "hiertcn"]


def test_a_name_starting_with_an_underscore_is_in_the_plot_legends(tmp_path, monkeypatch):
    """The model name was the matplotlib label of its curve and bars, and matplotlib leaves labels starting with
    "_" out of a legend: a model named "_baseline" was missing from the legends of training_curves.png and
    quality.png."""
    figures = _drawn(monkeypatch)
    results = [ModelResult("_baseline", _quality(0), training_curve=[(0, 2.0), (1, 1.0)]),
               ModelResult("hiertcn", _quality(1), training_curve=[(0, 2.5), (1, 1.5)])]
    write_report(results, tmp_path)
    for plot in ("training_curves.png", "quality.png"):
        assert [text.get_text() for text in _legend_texts(figures[plot])] == ["_baseline", "hiertcn"], plot


@pytest.mark.parametrize("name", ["cost$_$rule", "$x$"])
def test_a_name_with_dollar_signs_is_drawn_as_written(tmp_path, monkeypatch, name):
    """Matplotlib read the text between two "$" of a model name as mathtext: "cost$_$rule" made write_report fail
    with matplotlib's ParseSyntaxException (naming neither the model nor the plot), and "$x$" was drawn as a math x.
    Now names are drawn literally, in the legends and in the throughput plot's tick labels."""
    figures = _drawn(monkeypatch)
    results = [ModelResult(name, _quality(0), training_curve=[(0, 2.0), (1, 1.0)], events_per_second=5.0),
               ModelResult("hiertcn", _quality(1))]
    written = write_report(results, tmp_path)
    texts = [*_legend_texts(figures["training_curves.png"]), *_legend_texts(figures["quality.png"]),
             *[label for axes in figures["throughput.png"].axes for label in axes.get_xticklabels()]]
    named = [text for text in texts if text.get_text() == name]
    assert len(named) == 4 and not any(text.get_parse_math() for text in named)
    assert written["quality"].read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("field, value, expected", [
    ("peak_memory_bytes", np.int64(5 * 2**20), 5 * 2**20), ("peak_memory_bytes", np.uint32(7), 7),
    ("events_per_second", np.float32(2.5), 2.5), ("events_per_second", np.int64(9), 9),
])
def test_numpy_scalars_are_taken_as_python_numbers(tmp_path, field, value, expected):
    """ModelResult took only Python ints and floats: np.int64(5 MiB) as peak_memory_bytes was refused with "must
    be a finite non-negative number or None, got np.int64(5242880)", a message that contradicts itself. NumPy
    numbers are now kept as Python ints / floats (plain numbers in results.json); bools and strings are still
    refused."""
    result = ModelResult("a", _quality(0), **{field: value})
    assert type(getattr(result, field)) is type(expected) and getattr(result, field) == expected
    document = _strict_json(write_report([result], tmp_path, plots=False)["results"].read_text())
    assert document["models"]["a"][field] == expected
    for bad in (np.bool_(True), True, "5", np.float64("nan"), np.int64(-1)):
        with pytest.raises(ValueError, match=f"{field} of 'a' must be a finite non-negative number"):
            ModelResult("a", _quality(0), **{field: bad})


@pytest.mark.parametrize("refused", [
    dict(extra={"parameters": np.int64(3)}), dict(metadata={"when": object()}),
])
def test_a_refused_call_leaves_the_earlier_report_as_it_was(tmp_path, refused):
    """write_report drew the plots (replacing the earlier call's, and removing those it did not draw) before it
    made the JSON, so a call refused for a figure that is not JSON-able had already changed the folder: the earlier
    report.md and results.json linked plots that were gone, next to a quality.png of the refused call. Now every
    text and figure is made before any file is written or removed."""
    earlier = [ModelResult("hiertcn", _quality(0), training_curve=[(0, 1.0), (1, 0.5)], events_per_second=5.0),
               ModelResult("pop", _quality(1))]
    write_report(earlier, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["quality.png", "report.md", "results.json", "throughput.png", "training_curves.png"]
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_report([ModelResult("pop", _quality(1), extra=refused.get("extra", {}))], tmp_path,
                     metadata=refused.get("metadata"))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_training_curve_read_back_from_results_json_is_taken(tmp_path):
    """results.json writes a NaN loss as null, and its "models" entries have ModelResult's fields, but ModelResult
    turned each point into floats unguarded: a curve read back failed with a bare TypeError "float() argument must
    be a string or a real number, not 'NoneType'", naming neither the model nor the field. A null loss is now NaN,
    and any other bad point a ValueError naming both."""
    result = ModelResult("hiertcn", _quality(0), training_curve=[(0, 3.5), (1, math.nan), (2, 1.0)])
    document = _strict_json(write_report([result], tmp_path, plots=False)["results"].read_text())
    stored = document["models"]["hiertcn"]
    assert stored["training_curve"] == [[0.0, 3.5], [1.0, None], [2.0, 1.0]]
    again = ModelResult("hiertcn", **stored)
    assert again.training_curve[0] == (0.0, 3.5) and again.training_curve[2] == (2.0, 1.0)
    assert again.training_curve[1][0] == 1.0 and math.isnan(again.training_curve[1][1])
    assert write_report({"hiertcn": stored}, tmp_path / "again", plots=False)["report"].exists()
    for bad in ([(0, "abc")], [(None, 1.0)], [(math.nan, 1.0)], [5], ["ab"], [(0, object())], [(True, 1.0)]):
        with pytest.raises(ValueError, match="training_curve of 'hiertcn' must hold \\(step, loss\\) pairs"):
            ModelResult("hiertcn", _quality(0), training_curve=bad)


def test_a_result_with_no_events_prints_n_a_not_none(tmp_path):
    """RankingMetrics.result() of a model that scored no event holds catalogue_items None (the key is there), and
    report.md printed "None items" where the report's mark for a missing figure is "n/a"."""
    markdown = write_report([ModelResult("empty", RankingMetrics().result())], tmp_path, plots=False)[
        "report"].read_text()
    assert "; n/a items, no sampled negatives." in markdown
    assert "None" not in markdown, [line for line in markdown.splitlines() if "None" in line]
