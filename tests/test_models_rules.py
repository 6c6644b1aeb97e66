"""Per-event evaluation streams and the rule baselines, on small logs with known answers."""

import dataclasses

import numpy as np
import pytest
import torch

from hiertcn_fast.data import ArraySource, PreprocessParams, SyntheticSource, preprocess
from hiertcn_fast.evaluate import RankingMetrics
from hiertcn_fast.models import EvalEvents, MostPopular, RepeatPrevious, TransitionCounts, iter_split_events
from hiertcn_fast.models.rules import RuleModel

# Raw items 10, 20, 30, 40 become dense ids 1, 2, 3, 4. Sessions split at gaps >= 50 s; warm split:
# sessions starting after 90% of the time span (0..9710) are the test split.
LOG = [  # (user, raw item, time)
    (1, 10, 0), (1, 20, 10), (1, 30, 20),                        # train
    (2, 10, 100), (2, 20, 110), (2, 20, 200), (2, 30, 210),      # train: two sessions
    (2, 30, 9700), (2, 10, 9710),                                # test
    (3, 10, 9500), (3, 20, 9510), (3, 40, 9600),                 # test: two sessions
]
PARAMS = PreprocessParams(min_item_count=1, min_user_count=1, max_user_count=None, session_gap=50.0,
                          max_session_length=None, split="warm", num_partitions=1)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    user, item, timestamp = (np.array(column) for column in zip(*LOG))
    return preprocess(ArraySource(user, item, timestamp, name="tiny"), tmp_path_factory.mktemp("cache"), PARAMS)


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    params = PreprocessParams(min_item_count=2, min_user_count=3, max_user_count=None, split="cold",
                              num_partitions=2)
    source = SyntheticSource(6000, num_items=300, num_topics=10, mean_events_per_user=40, seed=1)
    return preprocess(source, tmp_path_factory.mktemp("synthetic"), params)


def _one_chunk(cache, split="test", history="user"):
    """The split's events as one chunk, reordered by raw user id (the cache orders users by a hash)
    so that the expected values below can be written in the order of LOG."""
    chunks = list(iter_split_events(cache, split, history=history, chunk_size=1000))
    assert len(chunks) == 1
    events = chunks[0]
    order = np.argsort(np.asarray(cache.user_raw_id)[events.user], kind="stable")
    return dataclasses.replace(events, **{field: getattr(events, field)[order]
                              for field in ("user", "target", "first_in_session", "session", "event",
                                            "history_start")})


def _ranks(rule, events):
    scores = rule.score(events)
    target_scores = scores.gather(1, torch.from_numpy(events.target)[:, None])
    return (1 + (scores[:, 1:] > target_scores).sum(1)).tolist()


def test_stream_fields_and_history_scopes(tiny_cache):
    raw = np.asarray(tiny_cache.user_raw_id)
    events = _one_chunk(tiny_cache)
    assert raw[events.user].tolist() == [2, 2, 3, 3, 3]
    assert events.target.tolist() == [3, 1, 1, 2, 4]
    assert events.first_in_session.tolist() == [True, False, True, False, True]
    assert events.history_length.tolist() == [4, 5, 0, 1, 2]       # user 2's four training events count
    assert events.previous_item().tolist() == [3, 3, 0, 1, 2]
    session_scope = _one_chunk(tiny_cache, history="session")
    assert session_scope.history_length.tolist() == [0, 1, 0, 1, 0]
    assert session_scope.previous_item().tolist() == [0, 3, 0, 1, 0]
    split_scope = _one_chunk(tiny_cache, history="split")
    assert split_scope.history_length.tolist() == [0, 1, 0, 1, 2]
    history = events.item_log[events.history_start[1]:events.event[1]]
    assert history.tolist() == [1, 2, 2, 3, 3]


def test_stream_chunking_covers_split_once(synthetic_cache):
    chunks = list(iter_split_events(synthetic_cache, "train", chunk_size=37))
    assert all(len(c) <= 37 for c in chunks)
    event = np.concatenate([c.event for c in chunks])
    split = np.asarray(synthetic_cache.session_split)
    offsets = np.asarray(synthetic_cache.session_offsets)
    expected = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in np.flatnonzero(split == 0)])
    assert np.array_equal(event, expected)
    first = np.concatenate([c.first_in_session for c in chunks])
    assert np.array_equal(np.flatnonzero(first), np.flatnonzero(np.isin(expected, offsets[:-1])))


def test_most_popular_known_ranks(tiny_cache):
    rule = MostPopular().fit(tiny_cache)
    assert rule.item_counts.tolist() == [0, 2, 3, 2, 0]
    # Popularity: item 2 (3), item 1 (2, smaller id), item 3 (2), item 4 (0).
    assert _ranks(rule, _one_chunk(tiny_cache)) == [3, 2, 2, 1, 4]


def test_repeat_previous_known_ranks(tiny_cache):
    rule = RepeatPrevious().fit(tiny_cache)
    assert _ranks(rule, _one_chunk(tiny_cache)) == [1, 3, 2, 2, 4]
    assert _ranks(rule, _one_chunk(tiny_cache, history="session")) == [3, 3, 2, 2, 4]


def test_transition_counts_known_ranks(tiny_cache):
    rule = TransitionCounts().fit(tiny_cache)
    # Training pairs: 0->1 twice, 1->2 twice, 2->3 twice, 2->2 once (user 2 across sessions).
    events = _one_chunk(tiny_cache)
    scores = rule.score(events)
    assert int(scores[4, 3]) == 2 and int(scores[4, 2]) == 1 and int(scores[4, 1]) == 0  # after item 2
    assert _ranks(rule, events) == [3, 2, 1, 1, 4]
    metrics = RankingMetrics()
    metrics.update(scores, events.target, events.user, events.first_in_session)
    result = metrics.result()
    assert result["per_event"]["all"]["Recall@1"] == pytest.approx(2 / 5)
    assert result["per_user"]["all"]["MRR"] == pytest.approx(((1 / 3 + 1 / 2) / 2 + (1 + 1 + 1 / 4) / 3) / 2)
    assert result["ties"]["events_with_tied_target"] == 0


def test_transitions_match_dense_counts_and_never_tie(synthetic_cache):
    rule = TransitionCounts().fit(synthetic_cache, chunk_size=101)
    same = TransitionCounts().fit(synthetic_cache, chunk_size=1 << 16)
    width = synthetic_cache.num_items + 1
    dense = np.zeros((width, width), np.int64)
    for events in iter_split_events(synthetic_cache, "train"):
        np.add.at(dense, (events.previous_item(), events.target), 1)
    for events in iter_split_events(synthetic_cache, "test", chunk_size=64):
        scores = rule.score(events).numpy()
        assert scores.shape == (len(events), width) and scores.dtype == np.float64
        assert np.array_equal(np.floor(scores[:, 1:]), dense[events.previous_item()][:, 1:].astype(np.float64))
        assert np.all(scores[:, 0] == -np.inf)
        # The popularity key leaves no ties anywhere in a row.
        assert all(np.unique(row[1:]).shape[0] == width - 1 for row in scores)
        assert np.array_equal(scores, same.score(events).numpy())


def test_transitions_beat_popularity_on_sequential_data(synthetic_cache):
    """The synthetic users walk through topics item by item: the transition rule must see it."""
    mrr = {}
    for rule_class in (MostPopular, TransitionCounts):
        rule = rule_class().fit(synthetic_cache)
        metrics = RankingMetrics()
        for events in iter_split_events(synthetic_cache, "test", chunk_size=256):
            metrics.update(rule.score(events), events.target, events.user, events.first_in_session)
        mrr[rule.name] = metrics.result()["per_event"]["rest"]["MRR"]
    assert mrr["transitions"] > 2 * mrr["most_popular"]


def test_rule_bad_inputs(tiny_cache, synthetic_cache):
    with pytest.raises(RuntimeError, match="before fit"):
        MostPopular().score(_one_chunk(tiny_cache))
    with pytest.raises(TypeError, match="cache must be a SessionCache"):
        MostPopular().fit("not a cache")
    rule = MostPopular().fit(tiny_cache)
    with pytest.raises(TypeError, match="events must be an EvalEvents"):
        rule.score(np.zeros(3))
    with pytest.raises(ValueError, match="events: catalogue of"):
        rule.score(next(iter_split_events(synthetic_cache, "test")))
    with pytest.raises(ValueError, match="history must be one of"):
        list(iter_split_events(tiny_cache, "test", history="all"))
    with pytest.raises(ValueError, match="chunk_size"):
        list(iter_split_events(tiny_cache, "test", chunk_size=0))
    with pytest.raises(ValueError, match="split must be one of"):
        list(iter_split_events(tiny_cache, "dev"))
    assert isinstance(_one_chunk(tiny_cache), EvalEvents)


@pytest.mark.parametrize("rule_class", [MostPopular, RepeatPrevious, TransitionCounts])
@pytest.mark.parametrize("how", ["bad split", "bad history", "interrupt"])
def test_a_refit_that_raises_leaves_the_rule_as_it_was(tiny_cache, synthetic_cache, rule_class, how):
    """A fit is all or nothing. fit set num_items from the new cache before the event stream checked split,
    history and chunk_size (a generator: at its first item), so a refit that raised left the new catalogue's
    size with the old fit's counts: MostPopular then scored the new cache's events over the old catalogue,
    silently, and the other rules failed with an IndexError."""
    from helpers import interrupt_at

    rule = rule_class().fit(tiny_cache)
    before = rule.score(_one_chunk(tiny_cache))
    if how == "interrupt":  # a Ctrl-C in the middle of the new counts (the 2nd chunk of the stream)
        with pytest.raises(KeyboardInterrupt), interrupt_at(RuleModel.fit, "np.bincount", hit=2):
            rule.fit(synthetic_cache, chunk_size=50)
    else:
        with pytest.raises(ValueError, match="split must be one of" if how == "bad split" else "history"):
            rule.fit(synthetic_cache, **({"split": "dev"} if how == "bad split" else {"history": "all"}))
    assert torch.equal(rule.score(_one_chunk(tiny_cache)), before)
    with pytest.raises(ValueError, match="events: catalogue of"):
        rule.score(next(iter_split_events(synthetic_cache, "test")))
    fresh = rule_class()
    with pytest.raises(ValueError, match="split must be one of"):
        fresh.fit(synthetic_cache, split="dev")
    with pytest.raises(RuntimeError, match="before fit"):
        fresh.score(_one_chunk(tiny_cache))


def test_evaluate_rules_takes_any_iterable_of_names(tiny_cache):
    """The names were read twice (the check for unknown ones, then the evaluation): a generator was spent by the
    check, and nothing was evaluated, without an error. A single string is refused (it read as its letters)."""
    from hiertcn_fast.rule_report import evaluate_rules

    results = evaluate_rules(tiny_cache, "test", rules=(name for name in ("transitions",)))
    assert list(results) == ["transitions"]
    with pytest.raises(TypeError, match="collection of rule names"):
        evaluate_rules(tiny_cache, "test", rules="transitions")


def test_evaluate_rules_writes_report(synthetic_cache, tmp_path):

    from hiertcn_fast.rule_report import evaluate_rules, format_table

    results = evaluate_rules(synthetic_cache, "valid", rules=("most_popular", "transitions"), chunk_size=100,
                             out_dir=tmp_path)
    assert list(results) == ["most_popular", "transitions"]
    counts = synthetic_cache.manifest["counts"]["splits"]["valid"]
    assert results["transitions"].quality["counts"]["events"] == counts["events"]
    assert results["transitions"].events_per_second > 0 and results["transitions"].peak_memory_bytes > 0
    assert {"report.md", "results.json", "quality.png", "throughput.png"} <= {p.name for p in tmp_path.iterdir()}
    table = format_table(results)
    assert f"{results['transitions'].quality['per_user']['all']['MRR']:.4f}" in table
    with pytest.raises(ValueError, match="rules: unknown names"):
        evaluate_rules(synthetic_cache, rules=("oracle",))


def test_format_table_of_no_results_is_a_clear_error():
    """format_table read its first model's tie policy before any check: format_table({}) raised a bare
    StopIteration with no message (a RuntimeError inside a generator). It is now a ValueError, as write_report's."""
    from hiertcn_fast.rule_report import format_table

    with pytest.raises(ValueError, match="results must hold at least one model"):
        format_table({})
    with pytest.raises(TypeError, match="results must be a dict model name -> ModelResult, got list"):
        format_table([])


@pytest.mark.parametrize("split", ["train", "test"])
def test_batcher_events_equal_stream_events(synthetic_cache, split):
    """The lane batches (the neural models' path) and the per-event stream (the rules' path)
    deliver the same prediction events, so every model is evaluated on the same events."""
    from hiertcn_fast.data import SessionBatcher
    from hiertcn_fast.evaluate import batch_targets

    from_batches = []
    for batch in SessionBatcher(synthetic_cache, split, lanes=5, sessions_per_batch=3):
        fields = batch_targets(batch)
        assert fields["mask"].sum() == fields["targets"].shape[0]
        from_batches += zip(fields["users"].tolist(), fields["targets"].tolist(), fields["first_in_session"].tolist())
    from_stream = []
    for events in iter_split_events(synthetic_cache, split, chunk_size=500):
        from_stream += zip(events.user.tolist(), events.target.tolist(), events.first_in_session.tolist())
    assert len(from_stream) > 100 and sorted(from_batches) == sorted(from_stream)
