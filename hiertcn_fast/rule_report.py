"""Evaluate the rule baselines with full-catalogue metrics and write a report.

``python -m hiertcn_fast.rule_report [--out DIR] [--cache-dir DIR] [--split test]`` preprocesses the
built-in ml-100k data (cold split by user), fits every rule on the training split, scores every
event of the evaluated split against the whole catalogue and writes a report folder
(:func:`hiertcn_fast.report.write_report`). It sits above models/, evaluate.py and report.py and
is imported by none of them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from collections.abc import Mapping
from pathlib import Path

from .data import PreprocessParams, SessionCache, load_dataset, preprocess
from .evaluate import RankingMetrics
from .models.events import iter_split_events
from .models.rules import RULES
from .report import ModelResult, format_figure, scored_on_same_events, write_report

__all__ = ["evaluate_rules", "ML100K_PARAMS", "preprocessing_note", "format_table", "main"]

# ml-100k users have >= 20 ratings and items are sparse, so the XING filters (items >= 50, users
# 10..500) would drop most of it; sessions keep the paper's 30 min gap and 20-event truncation.
ML100K_PARAMS = PreprocessParams(min_item_count=5, min_user_count=5, max_user_count=None, split="cold")


def preprocessing_note(cache: SessionCache) -> str:
    """What preprocessing removed from the log, from the cache's manifest, for a report's data notes.

    The item and user filters count the WHOLE log before it is split (as the paper's code does), so
    the evaluated split's events take part in deciding which items and users are kept.
    """
    stats, params = cache.manifest["stats"], cache.params
    users = f"users with fewer than {params['min_user_count']}"
    if params.get("max_user_count") is not None:
        users += f" or more than {params['max_user_count']}"
    users_dropped = stats["users_dropped_too_few_events"] + stats["users_dropped_too_many_events"]
    user_events = stats["events_dropped_user_too_few_events"] + stats["events_dropped_user_too_many_events"]
    truncation = ("no session truncation" if params.get("max_session_length") is None else
                  f"truncating sessions to their first {params['max_session_length']} events dropped "
                  f"{stats['events_dropped_session_truncation']:,} events")
    return (f"preprocessing, the paper's procedure (filters counted before the split) with this data set's "
            f"thresholds: of {stats['events_read']:,} events read, items with fewer than "
            f"{params['min_item_count']} events ({stats['items_dropped_item_filter']:,} items, "
            f"{stats['events_dropped_item_filter']:,} events) and {users} events ({users_dropped:,} users, "
            f"{user_events:,} events) were dropped, counted over the whole log BEFORE the split (the evaluated "
            f"split's events included); {truncation}")


def evaluate_rules(cache: SessionCache, split: str = "test", rules=tuple(RULES), history: str = "user",
                   chunk_size: int = 2048, out_dir: str | os.PathLike | None = None,
                   notes: tuple[str, ...] = ()) -> dict[str, ModelResult]:
    """Fit each rule on the cache's training split and evaluate it on ``split``.

    rules: names from :data:`hiertcn_fast.models.rules.RULES`. history: the visible history of
    each event (see :data:`hiertcn_fast.models.events.HISTORY_SCOPES`). Returns name ->
    :class:`ModelResult` with the quality dict, scoring events/s (fit excluded, evaluation
    included) and the peak host memory traced while fitting and scoring; writes the report folder
    when ``out_dir`` is given.
    """
    if isinstance(rules, str):
        raise TypeError(f"rules must be a collection of rule names, got the string {rules!r}; "
                        f"write ({rules!r},) for one rule")
    rules = tuple(rules)  # read twice below: a generator would be spent by the check
    unknown = [name for name in rules if name not in RULES]
    if unknown:
        raise ValueError(f"rules: unknown names {unknown}; known: {sorted(RULES)}")
    results = {}
    for name in rules:
        # Traced only for the rule, and stopped on every way out (an error left the whole process traced);
        # a caller's own tracing is left running (its peak is reset for the rule).
        started_tracing = not tracemalloc.is_tracing()
        if started_tracing:
            tracemalloc.start()
        else:
            tracemalloc.reset_peak()
        try:
            fit_started = time.perf_counter()
            rule = RULES[name]().fit(cache, "train", history=history)
            fit_seconds = time.perf_counter() - fit_started
            metrics = RankingMetrics()
            started = time.perf_counter()
            for events in iter_split_events(cache, split, history=history, chunk_size=chunk_size):
                metrics.update(rule.score(events), events.target, events.user, events.first_in_session)
            seconds = time.perf_counter() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            if started_tracing:
                tracemalloc.stop()
        quality = metrics.result()
        results[name] = ModelResult(
            name, quality, events_per_second=quality["counts"]["events"] / seconds, peak_memory_bytes=peak,
            extra={"fit_seconds": fit_seconds, "evaluate_seconds": seconds, "history": history,
                   "events_per_second_means": "scoring + full-catalogue ranking of the evaluated split",
                   "peak_memory_means": "peak host memory traced by tracemalloc while fitting and scoring"})
    if out_dir is not None:
        split_counts = cache.manifest["counts"]["splits"]
        cap = cache.params["max_session_length"]
        truncation = "no session truncation" if cap is None else f"sessions truncated to {cap} events"
        lines = [f"data: {cache.manifest['source_name']}, {cache.num_events} events, {cache.num_users} users, "
                 f"{cache.num_items} items after preprocessing ({cache.params['split']} split, "
                 f"{truncation})",
                 preprocessing_note(cache),
                 f"evaluated split: {split} ({split_counts[split]['events']} events, "
                 f"{split_counts[split]['users']} users); rules fitted on train "
                 f"({split_counts['train']['events']} events); history scope: {history}",
                 *notes]
        write_report(list(results.values()), out_dir, title="Rule baselines, full-catalogue evaluation",
                     notes=lines, metadata={"cache_key": cache.key, "params": cache.params, "split": split})
    return results


def format_table(results: dict[str, ModelResult], unit: str = "per_user") -> str:
    """A plain-text table of the headline figures, for the terminal. A missing figure (None, or NaN
    for an empty group) prints as "-"; an ``events`` column appears when the models were scored on
    different events. ``results`` must hold at least one model (a ValueError otherwise)."""
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be a dict model name -> ModelResult, got {type(results).__name__}")
    if not results:
        raise ValueError("results must hold at least one model, got an empty dict")
    same_events = scored_on_same_events(list(results.values()))
    header = f"{'model':<16}{'Recall@10':>10}{'MRR':>8}{'NDCG@10':>9}{'R@10 first':>11}{'R@10 rest':>10}{'events/s':>12}"
    lines = [f"[{unit.replace('_', ' ')}; {next(iter(results.values())).quality['tie_policy'].split(':')[0]} ties]",
             header + ("" if same_events else f"{'events':>9}")]
    for name, r in results.items():
        q = r.quality[unit]
        cells = [(q["all"].get("Recall@10"), 10), (q["all"].get("MRR"), 8), (q["all"].get("NDCG@10"), 9),
                 (q["first_in_session"].get("Recall@10"), 11), (q["rest"].get("Recall@10"), 10)]
        line = f"{name:<16}" + "".join(f"{format_figure(value, '.4f', '-'):>{width}}" for value, width in cells)
        line += f"{format_figure(r.events_per_second, ',.0f', '-'):>12}"
        if not same_events:
            line += f"{format_figure(r.quality.get('counts', {}).get('events'), 'd', '-'):>9}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    from .cli import _folder, _prepare_report_folder, _writable_folder

    parser = argparse.ArgumentParser(prog="python -m hiertcn_fast.rule_report", description=__doc__.split("\n")[0])
    # ~ expanded (a shell leaves --out=~/x as it is); an empty path is refused, not read as the working directory.
    parser.add_argument("--out", type=_folder, default="reports/rules-ml-100k",
                        help="report folder (default: %(default)s); created and checked writable before any work")
    parser.add_argument("--cache-dir", type=_folder,
                        default=os.path.join(tempfile.gettempdir(), "hiertcn_fast_cache"),
                        help="session cache folder (default: %(default)s)")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    parser.add_argument("--history", default="user", choices=("user", "split", "session"))
    args = parser.parse_args(argv)
    problem = (_writable_folder(args.cache_dir, "--cache-dir", "cache folder")
               or _prepare_report_folder(args.out)[0])
    if problem:
        parser.error(problem)
    cache = preprocess(load_dataset("ml-100k"), args.cache_dir, ML100K_PARAMS)
    results = evaluate_rules(cache, args.split, history=args.history, out_dir=args.out)
    print(format_table(results, "per_user"))
    print(format_table(results, "per_event"))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
