"""The main job's report folder: a markdown table, PNG plots and the JSON of every figure.

``write_report(results, out_dir)`` writes

- ``report.md``: per model Recall@10, MRR and NDCG@10 (per user, the paper's unit, and per event),
  events/s and peak memory; which model leads each of those quality metrics, and by how much HierTCN leads or
  trails; the first-of-session / other-events breakdown; the tie policy and the
  averaging units stated under the tables;
- ``training_curves.png`` (loss against step, when any model has a curve), ``quality.png`` (metric
  bars per model, per user and per event), ``throughput.png`` (events/s and peak memory bars, when
  any model has them);
- ``results.json``: everything above and every metric of every model. Non-finite numbers (an empty
  group's NaN) are written as null so the file is strict JSON.

Models scored on different events (e.g. a neural model whose ``max_session_length`` is shorter than
the cache's sessions, against rules that score every event) are reported, not refused: the main table
then gains an ``events`` column and the notes list each model's events. The folder's report files
(:data:`REPORT_FILES`) are exactly those of the last call: a plot the call does not draw is removed,
and report.md and results.json are replaced atomically, so the folder can be rewritten as results
come in (``plots=False`` for the quick intermediate writes).

A call that is refused (a bad argument, a figure that is not JSON-able) changes nothing in the folder: every
check, results.json's JSON text, report.md's text and the plots' figures are made before any file is written or
removed; each file is then written to a temporary name and renamed into place.

Model names are reported as written: in results.json as they are, in the plots drawn literally (no mathtext for
``$``, and a name starting with ``_`` is in the legends like any other), and in report.md with markdown's
table separator ``|`` escaped as ``\\|`` (and ``\\`` as ``\\\\``) and each control character or line break (a newline,
a tab, U+2028...) replaced by its Python escape (a newline shows as ``\\n``), so that a name is one table cell.

Plots are drawn with matplotlib's Agg canvas directly (no pyplot), so nothing global changes and
no display is needed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import time
import unicodedata
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["ModelResult", "write_report", "TABLE_METRICS", "REPORT_FILES", "evaluated_events",
           "scored_on_same_events", "format_figure"]

TABLE_METRICS = ("Recall@10", "MRR", "NDCG@10")
GROUPS = ("all", "first_in_session", "rest")
UNITS = ("per_user", "per_event")
PLOT_DPI = 110
PLOT_FILES = ("training_curves.png", "quality.png", "throughput.png")
REPORT_FILES = ("report.md", "results.json", *PLOT_FILES)


@dataclasses.dataclass
class ModelResult:
    """One model's figures.

    name: any non-empty string (see the module docstring for how report.md and the plots show it).
    quality: the dict of :meth:`hiertcn_fast.evaluate.RankingMetrics.result`.
    training_curve: (step, loss) pairs, in step order (empty for models that are not trained); kept as
        pairs of floats. A loss of None (how results.json writes a NaN loss) is taken as NaN, so the
        "models" of a results.json read back are ModelResults again.
    events_per_second: training (or, for rules, scoring) throughput; None if not measured.
    peak_memory_bytes: peak memory of the run; None if not measured.
    Both figures may be any real number, Python's or NumPy's (np.int64, np.float32...), but not a
    bool; they are kept as Python ints / floats, so results.json holds plain numbers.
    extra: any other JSON-able figures (written to results.json only).
    """

    name: str
    quality: dict
    training_curve: Sequence[tuple[float, float]] = ()
    events_per_second: float | None = None
    peak_memory_bytes: int | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.quality, Mapping):
            raise TypeError(f"quality of {self.name!r} must be a dict from RankingMetrics.result(), "
                            f"got {type(self.quality).__name__}")
        for key in ("per_user", "per_event", "tie_policy", "averaging"):
            if key not in self.quality:
                raise ValueError(f"quality of {self.name!r} has no {key!r}; pass RankingMetrics.result()")
        self.training_curve = [self._curve_point(point) for point in self.training_curve]
        for field in ("events_per_second", "peak_memory_bytes"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                number = int(value)  # np.int64 and the like: a plain int for JSON
            elif isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
                number = float(value)  # np.float32 and the like
            else:  # a bool (np.bool_ is no numbers.Real), a string, anything else
                number = None
            if number is None or not 0 <= number < math.inf:  # (NaN fails both comparisons)
                raise ValueError(f"{field} of {self.name!r} must be a finite non-negative number or None, got "
                                 f"{value!r}")
            setattr(self, field, number)

    def _curve_point(self, point) -> tuple[float, float]:
        """One (step, loss) pair as floats: a finite step, a loss that may be NaN (None, as results.json writes
        it) or infinite; anything else a ValueError naming the model and the field."""
        problem = f"training_curve of {self.name!r} must hold (step, loss) pairs of numbers, got {point!r}"
        if isinstance(point, (str, bytes, Mapping)):
            raise ValueError(problem)
        try:
            step, loss = point
        except (TypeError, ValueError):
            raise ValueError(problem) from None
        if loss is None:
            loss = math.nan
        values = []
        for value in (step, loss):
            if isinstance(value, (str, bytes, bool)):
                raise ValueError(problem)
            try:
                values.append(float(value))
            except (TypeError, ValueError):
                raise ValueError(problem) from None
        if not math.isfinite(values[0]):
            raise ValueError(f"{problem} (a step must be finite)")
        return values[0], values[1]


def _as_results(results) -> list[ModelResult]:
    if isinstance(results, Mapping):
        results = [value if isinstance(value, ModelResult) else ModelResult(name=name, **value)
                   for name, value in results.items()]
    results = list(results)
    if not results:
        raise ValueError("results must hold at least one model")
    for result in results:
        if not isinstance(result, ModelResult):
            raise TypeError(f"results must hold ModelResult objects, got {type(result).__name__}")
    names = [r.name for r in results]
    if len(set(names)) != len(names):
        raise ValueError(f"results: model names must be unique, got {names}")
    policies = {r.quality["tie_policy"] for r in results}
    if len(policies) != 1:
        raise ValueError(f"results: models were evaluated with different tie policies {sorted(policies)}; "
                         "their numbers are not comparable")
    return results


def evaluated_events(quality: Mapping) -> str:
    """What a model was scored on, from its quality dict's counts, e.g. "3227 events of 94 users
    (287 first-of-session)", plus the events it did not score, if any."""
    counts = quality.get("counts", {})
    text = (f"{counts.get('events', 'n/a')} events of {counts.get('users', 'n/a')} users "
            f"({counts.get('first_in_session_events', 'n/a')} first-of-session")
    truncation = quality.get("session_truncation") or {}
    if truncation.get("events_not_scored"):
        text += (f"; {truncation['events_not_scored']} more events, after the first "
                 f"{truncation['max_session_length']} of their session, not scored")
    return text + ")"


def scored_on_same_events(results: Sequence[ModelResult]) -> bool:
    """Whether every model was scored on the same events (by their counts)."""
    return len({evaluated_events(r.quality) for r in results}) == 1


def format_figure(value, spec: str, missing: str) -> str:
    """``value`` formatted with ``spec``, or ``missing`` for None / NaN / infinity."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def _finite_or_none(value):
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _markdown_name(name: str) -> str:
    """``name`` as one cell of a markdown table (and one line of a list): ``\\`` and ``|`` escaped with a backslash,
    each control character or line break replaced by its Python escape (a newline by ``\\n``)."""
    text = name.replace("\\", "\\\\").replace("|", "\\|")
    return "".join(char.encode("unicode_escape").decode("ascii")
                   if unicodedata.category(char) in ("Cc", "Zl", "Zp") else char for char in text)


def _number(value, digits: int = 4) -> str:
    return format_figure(value, f".{digits}f", "n/a")


def _throughput(value) -> str:
    return format_figure(value, ",.0f", "n/a")


def _memory(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f} MiB"


def _leaders(results: list[ModelResult], focus: str = "hiertcn") -> list[str]:
    """Which model leads each table metric, and where ``focus`` (when reported) stands: its lead over the
    runner-up, or how far it is behind the leader, in absolute and relative terms. For Recall@10 per event, one
    standard error of a model's figure (a mean of 0/1 hits over the events), to judge the gaps by."""
    if len(results) < 2:
        return []
    lines = ["", "## Who leads", ""]
    if not scored_on_same_events(results):
        lines += ["Not every model was scored on the same events (see below): these comparisons mix event sets.",
                  ""]
    for unit in UNITS:
        for metric in TABLE_METRICS:
            # Ranked as shown (4 digits): figures that print alike tie, rather than one leading "by 0.0000".
            scored = sorted(((round(value, 4), r.name) for r in results
                             if (value := _finite_or_none(r.quality[unit]["all"].get(metric))) is not None),
                            key=lambda pair: -pair[0])
            if not scored:
                continue
            label = f"{metric} ({unit.replace('_', ' ')})"
            best = scored[0][0]
            leaders = [name for value, name in scored if value == best]
            text = f"- {label}: {' and '.join(map(_markdown_name, leaders))} {_number(best)}"
            value = next((value for value, name in scored if name == focus), None)
            if value is not None and len(scored) > 1:
                place = sum(1 for other, _ in scored if other > value)  # ties share a place
                if value == best and len(leaders) == 1:
                    runner_value, runner = scored[1]
                    text += (f", ahead of {_markdown_name(runner)} ({_number(runner_value)}) by "
                             f"{_number(value - runner_value)}")
                elif value != best:
                    gap = best - value
                    relative = f" ({100 * gap / best:.1f}%)" if best else ""
                    text += (f"; {_markdown_name(focus)} is {place + 1} of {len(scored)} with {_number(value)}, "
                             f"{_number(gap)}{relative} behind")
            lines.append(text)
    events = results[0].quality.get("counts", {}).get("events")
    recall = _finite_or_none(results[0].quality["per_event"]["all"].get("Recall@10"))
    if scored_on_same_events(results) and isinstance(events, int) and events > 0 and recall is not None:
        hits = [v for r in results if (v := _finite_or_none(r.quality["per_event"]["all"].get("Recall@10")))
                is not None]
        errors = [math.sqrt(p * (1 - p) / events) for p in hits]
        lines.append(f"- One standard error of a Recall@10 per event over these {events} events: "
                     f"{_number(min(errors))} to {_number(max(errors))} (sqrt(p (1 - p) / events)); gaps of that "
                     f"size are within the noise of one evaluation.")
    return lines


def _markdown(results: list[ModelResult], title: str, notes: Sequence[str], plots: list[str]) -> str:
    quality = results[0].quality
    same_events = scored_on_same_events(results)
    lines = [f"# {title}", ""]
    lines += [f"- {note}" for note in notes]
    if notes:
        lines.append("")
    header = ["model", *[f"{m} (per user)" for m in TABLE_METRICS], *[f"{m} (per event)" for m in TABLE_METRICS],
              "events/s", "peak memory", *([] if same_events else ["events"])]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        row = [_markdown_name(r.name), *[_number(r.quality["per_user"]["all"].get(m)) for m in TABLE_METRICS],
               *[_number(r.quality["per_event"]["all"].get(m)) for m in TABLE_METRICS],
               _throughput(r.events_per_second), _memory(r.peak_memory_bytes),
               *([] if same_events else [str(r.quality.get("counts", {}).get("events", "n/a"))])]
        lines.append("| " + " | ".join(row) + " |")
    lines += _leaders(results)
    lines += ["", "## First event of a session vs the other events (per user)", ""]
    header = ["model", *[f"{m} (first)" for m in TABLE_METRICS], *[f"{m} (rest)" for m in TABLE_METRICS]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        per_user = r.quality["per_user"]
        row = [_markdown_name(r.name), *[_number(per_user["first_in_session"].get(m)) for m in TABLE_METRICS],
               *[_number(per_user["rest"].get(m)) for m in TABLE_METRICS]]
        lines.append("| " + " | ".join(row) + " |")
    counts = quality.get("counts", {})
    evaluated = (evaluated_events(quality) if same_events else
                 "NOT the same events for every model, so compare their figures with care: "
                 + "; ".join(f"{_markdown_name(r.name)} {evaluated_events(r.quality)}" for r in results))
    lines += ["", "## How these numbers were made", "",
              f"- Catalogue: {quality.get('catalogue', 'full')}; "
              f"{format_figure(counts.get('catalogue_items'), '', 'n/a')} items, no sampled negatives.",
              f"- Tie policy: {quality['tie_policy']}.",
              f"- Per user: {quality['averaging']['per_user']}.",
              f"- Per event: {quality['averaging']['per_event']}.",
              f"- Evaluated: {evaluated}.",
              "- Targets tied with another item (fraction of events): "
              + ", ".join(f"{_markdown_name(r.name)} "
                          f"{_number(r.quality.get('ties', {}).get('fraction_events_with_tied_target'))}"
                          for r in results) + ".",
              "- events/s: training throughput for trained models, scoring throughput for rules "
              "(see results.json for each model's notes)."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=PLOT_DPI)
    FigureCanvasAgg(figure)
    return figure


def _literal_legend(axes, handles, names, **kwargs) -> None:
    """A legend of ``names`` as written: given explicitly, so a name starting with "_" is not left out (matplotlib
    skips such labels when it collects them itself), and drawn literally (a "$" is no mathtext)."""
    legend = axes.legend(handles, names, **kwargs)
    for text in legend.get_texts():
        text.set_parse_math(False)


def _training_curves_figure(results):
    """The training-curves figure, or None when no model has a curve."""
    curves = [r for r in results if r.training_curve]
    if not curves:
        return None
    figure = _figure(7, 4)
    axes = figure.add_subplot()
    lines = []
    for r in curves:
        steps, losses = zip(*r.training_curve)
        lines += axes.plot(steps, losses)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title("Training curves")
    axes.grid(alpha=0.3)
    _literal_legend(axes, lines, [r.name for r in curves])
    figure.tight_layout()
    return figure


def _save_figure(figure, path: Path) -> None:
    """Replace ``path`` atomically, as _write_text does: a stopped job leaves the old plot or the new one, never a
    truncated file."""
    temp = path.with_name(f".{path.name}.tmp")
    try:
        figure.savefig(temp, format=path.suffix.lstrip(".") or "png")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _bars_or_na(axes, positions, values, **kwargs):
    """Bars of ``values``; a missing value (None or not finite: 'n/a' in report.md) is written 'n/a' at its
    place, not drawn as a bar of height 0. Returns the bars (a legend handle)."""
    missing = [v is None or not math.isfinite(v) for v in values]
    bars = axes.bar(positions, [0.0 if gone else v for v, gone in zip(values, missing)], **kwargs)
    for position, gone in zip(positions, missing):
        if gone:
            axes.text(position, 0, "n/a", ha="center", va="bottom", fontsize="x-small", rotation=90)
    return bars


def _grouped_bars(axes, labels, series: dict[str, list[float]], title: str) -> list:
    """One group of bars per label, one bar per series in it; returns the series' bars (legend handles)."""
    width = 0.8 / max(len(series), 1)
    handles = []
    for i, values in enumerate(series.values()):
        positions = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        handles.append(_bars_or_na(axes, positions, values, width=width))
    axes.set_xticks(range(len(labels)))
    axes.set_xticklabels(labels, rotation=30, ha="right", parse_math=False)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    return handles


def _quality_figure(results):
    metrics = results[0].quality.get("metrics") or list(TABLE_METRICS)
    figure = _figure(11, 4)
    for k, unit in enumerate(UNITS):
        axes = figure.add_subplot(1, 2, k + 1)
        series = {r.name: [r.quality[unit]["all"].get(m, math.nan) for m in metrics] for r in results}
        handles = _grouped_bars(axes, metrics, series, f"Full-catalogue quality ({unit.replace('_', ' ')})")
    _literal_legend(axes, handles, list(series), fontsize="small")
    figure.tight_layout()
    return figure


def _throughput_figure(results):
    """The events/s and peak-memory figure, or None when no model has either."""
    if all(r.events_per_second is None and r.peak_memory_bytes is None for r in results):
        return None
    figure = _figure(10, 4)
    names = [r.name for r in results]
    for k, (title, values) in enumerate((
            ("events/s (training; rules: scoring)", [r.events_per_second for r in results]),
            ("peak memory (MiB; see report.md)", [None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**20
                                                  for r in results]))):
        axes = figure.add_subplot(1, 2, k + 1)
        _bars_or_na(axes, range(len(names)), values, color=f"C{k}")
        axes.set_xticks(range(len(names)))
        axes.set_xticklabels(names, rotation=30, ha="right", parse_math=False)  # names as written, "$" too
        axes.set_title(title)
        axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def _write_text(path: Path, text: str) -> None:
    """Replace ``path`` atomically: a reader (or a crash) never sees half a file."""
    temp = path.with_name(f".{path.name}.tmp")
    try:
        temp.write_text(text, encoding="utf-8")  # not the locale's: an ASCII locale failed on any other name
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_report(results, out_dir: str | os.PathLike, title: str = "HierTCN report",
                 notes: Sequence[str] = (), metadata: Mapping | None = None, plots: bool = True) -> dict[str, Path]:
    """Write the report folder and return the paths written, by name.

    results: a list of :class:`ModelResult`, or a dict model name -> dict with the fields of
    ModelResult (quality, training_curve, events_per_second, peak_memory_bytes, extra).
    All models must share one tie policy; models scored on different events are flagged (see the
    module docstring). notes: lines placed under the title (data set, split, machine...). metadata:
    JSON-able, copied into results.json. plots: False writes report.md and results.json only (a
    quick update while a job runs). Report files of an earlier call that this one does not write
    (a plot) are removed; other files in the folder are left alone. A refused call (e.g. a figure in
    ``extra`` or ``metadata`` that is not JSON-able: TypeError) writes and removes nothing.
    """
    results = _as_results(results)
    if isinstance(notes, str):
        raise TypeError("notes must be a sequence of strings, not one string")
    notes = list(notes)
    out = Path(out_dir)
    # Everything that can refuse the call comes first (checks, the JSON and markdown texts, the figures, whose
    # drawing is where matplotlib would fail), so a refused call leaves the folder as the last call wrote it.
    figures = {}
    if plots:
        figures = {"training_curves": _training_curves_figure(results), "quality": _quality_figure(results),
                   "throughput": _throughput_figure(results)}
        figures = {key: figure for key, figure in figures.items() if figure is not None}
    plot_names = [f"{key}.png" for key in figures]
    document = {
        "title": title,
        "created_unix": time.time(),
        "notes": notes,
        "metadata": dict(metadata or {}),
        "tie_policy": results[0].quality["tie_policy"],
        "averaging": results[0].quality["averaging"],
        "models": {r.name: {"quality": r.quality, "training_curve": [list(p) for p in r.training_curve],
                            "events_per_second": r.events_per_second, "peak_memory_bytes": r.peak_memory_bytes,
                            "extra": r.extra} for r in results},
        "files": plot_names + ["report.md"],
    }
    results_text = json.dumps(_finite_or_none(document), indent=1, allow_nan=False)
    report_text = _markdown(results, title, notes, plot_names)

    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for key, figure in figures.items():  # each written to a temporary name and renamed into place
        _save_figure(figure, out / f"{key}.png")
        written[key] = out / f"{key}.png"
    for name in PLOT_FILES:
        if name not in plot_names:
            (out / name).unlink(missing_ok=True)
    # results.json first: a job stopped between the two leaves report.md of the earlier write, which says what
    # was unfinished then, rather than a report.md newer than the JSON that marks the job unfinished.
    _write_text(out / "results.json", results_text)
    written["results"] = out / "results.json"
    _write_text(out / "report.md", report_text)
    written["report"] = out / "report.md"
    return written
