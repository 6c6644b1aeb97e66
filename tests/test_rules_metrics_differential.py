"""Differential tests: the rule baselines and RankingMetrics against slow, obviously-correct pure-Python
re-implementations of their docstrings, on small random event streams and random scores."""

import math
import random

import numpy as np
import pytest
import torch

from hiertcn_fast import evaluate as evaluate_module
from hiertcn_fast.data import ArraySource, PreprocessParams, preprocess
from hiertcn_fast.evaluate import RankingMetrics, target_ranks
from hiertcn_fast.models import MostPopular, RepeatPrevious, TransitionCounts, iter_split_events
from hiertcn_fast.models.rules import RULES

SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}


# ----------------------------------------------------------------------------------------------- random caches

def _random_log(seed, users=6, items=7, max_events=14):
    rng = random.Random(seed)
    user, item, timestamp = [], [], []
    for u in range(users):
        t = rng.uniform(0, 50)
        for _ in range(rng.randint(1, max_events)):
            user.append(100 + u)
            item.append(rng.choice(range(1, items + 1)) * 10)
            timestamp.append(t)
            # Small steps keep a session going, big ones cut it: one-event sessions happen often.
            t += rng.choice([1.0, 2.0, 5.0, 80.0, 300.0])
    return np.array(user), np.array(item), np.array(timestamp)


@pytest.fixture(scope="module", params=[("warm", 0, 7), ("warm", 1, 7), ("cold", 2, 7), ("warm", 3, 7), ("cold", 4, 7),
                                        ("warm", 5, 40)])   # 28 items kept, 4 never seen in training
def random_cache(request, tmp_path_factory):
    split, seed, items = request.param
    user, item, timestamp = _random_log(seed, items=items)
    params = PreprocessParams(min_item_count=1, min_user_count=1, max_user_count=None, session_gap=50.0,
                              max_session_length=None, split=split, split_fractions=(0.5, 0.2, 0.3),
                              num_partitions=2, seed=seed)
    return preprocess(ArraySource(user, item, timestamp, name=f"fuzz{seed}"), tmp_path_factory.mktemp("c"), params)


def _slow_events(cache, split, history):
    """[(user, target, first_in_session, history list)] of the split, in cache order, by plain loops."""
    item = [int(x) for x in np.asarray(cache.item)]
    session_offsets = [int(x) for x in np.asarray(cache.session_offsets)]
    session_split = [int(x) for x in np.asarray(cache.session_split)]
    user_session_offsets = [int(x) for x in np.asarray(cache.user_session_offsets)]
    out = []
    for u in range(len(user_session_offsets) - 1):
        seen_user, seen_split = [], []
        for s in range(user_session_offsets[u], user_session_offsets[u + 1]):
            seen_session = []
            for e in range(session_offsets[s], session_offsets[s + 1]):
                if session_split[s] == SPLIT_CODE[split]:
                    hist = {"user": seen_user, "split": seen_split, "session": seen_session}[history]
                    out.append((u, item[e], e == session_offsets[s], list(hist)))
                    seen_split.append(item[e])
                seen_user.append(item[e])
                seen_session.append(item[e])
    return out


def _slow_rule_ranking(rule_name, cache, history, train_events, event_history):
    """The catalogue as a list of item ids, best first, from the rules' docstrings."""
    n = cache.num_items
    counts = {i: 0 for i in range(1, n + 1)}
    for _, target, _, _ in train_events:
        counts[target] += 1
    if rule_name == "most_popular":
        signal = {i: 0 for i in counts}
    elif rule_name == "repeat_previous":
        signal = {i: int(bool(event_history) and event_history[-1] == i) for i in counts}
    else:
        previous = event_history[-1] if event_history else 0
        signal = {i: 0 for i in counts}
        for _, target, _, hist in train_events:
            if (hist[-1] if hist else 0) == previous:
                signal[target] += 1
    # Rule signal first, then popularity (more frequent first, equal counts: smaller id first).
    return sorted(counts, key=lambda i: (-signal[i], -counts[i], i)), signal


@pytest.mark.parametrize("history", ["user", "split", "session"])
@pytest.mark.parametrize("rule_name", sorted(RULES))
def test_rules_match_slow_reimplementation(random_cache, rule_name, history):
    cache = random_cache
    train_events = _slow_events(cache, "train", history)
    for split in ("valid", "test"):
        slow = _slow_events(cache, split, history)
        rule = RULES[rule_name]().fit(cache, "train", history=history, chunk_size=3)
        fast = list(iter_split_events(cache, split, history=history, chunk_size=4))
        assert sum(len(c) for c in fast) == len(slow)
        row = 0
        for chunk in fast:
            scores = rule.score(chunk)
            assert scores.dtype == torch.float64 and scores.device.type == "cpu"
            assert scores.shape == (len(chunk), cache.num_items + 1)
            assert torch.all(scores[:, 0] == -math.inf)
            for i in range(len(chunk)):
                user, target, first, hist = slow[row]
                got_fields = (int(chunk.user[i]), int(chunk.target[i]), bool(chunk.first_in_session[i]))
                assert got_fields == (user, target, first)
                expected_order, signal = _slow_rule_ranking(rule_name, cache, history, train_events, hist)
                got = scores[i, 1:].numpy()
                got_order = (np.argsort(-got, kind="stable") + 1).tolist()
                assert got_order == expected_order, (rule_name, history, split, row)
                assert len(set(got.tolist())) == cache.num_items       # no two items tie
                assert np.floor(got).astype(int).tolist() == [signal[j] for j in range(1, cache.num_items + 1)]
                row += 1


def test_rule_popularity_key_properties(random_cache):
    rule = MostPopular().fit(random_cache)
    key = rule.popularity_key
    assert key.dtype == np.float64 and key.shape == (random_cache.num_items + 1,) and key[0] == -np.inf
    assert np.all((key[1:] > 0) & (key[1:] < 1)) and len(set(key[1:].tolist())) == random_cache.num_items
    counts = rule.item_counts
    assert counts[0] == 0 and counts.dtype == np.int64
    slow = [0] * (random_cache.num_items + 1)
    for _, target, _, _ in _slow_events(random_cache, "train", "user"):
        slow[target] += 1
    assert counts.tolist() == slow


def test_rules_same_result_for_any_fit_chunk_size(random_cache):
    events = next(iter_split_events(random_cache, "test", chunk_size=1000), None)
    if events is None:
        pytest.skip("empty test split")
    for rule_class in (MostPopular, RepeatPrevious, TransitionCounts):
        reference = rule_class().fit(random_cache, chunk_size=1 << 16).score(events)
        for chunk_size in (1, 2, 5):
            assert torch.equal(rule_class().fit(random_cache, chunk_size=chunk_size).score(events), reference)


# ----------------------------------------------------------------------------------------------- metrics

def _slow_rank(row, target, policy, padding_item):
    t = row[target]
    higher = tied = 0
    for j, value in enumerate(row):
        if j == target or j == padding_item:
            continue
        if value > t:
            higher += 1
        elif value == t:
            tied += 1
    return {"optimistic": 1 + higher, "pessimistic": 1 + higher + tied, "average": 1 + higher + tied / 2}[policy], tied


def _slow_metrics(rows, targets, users, firsts, policy, padding_item, recall_ks, mrr_cutoffs, ndcg_ks):
    names = ([f"Recall@{k}" for k in recall_ks] + ["MRR" if k is None else f"MRR@{k}" for k in mrr_cutoffs]
             + [f"NDCG@{k}" for k in ndcg_ks])
    per_event = {g: [] for g in ("all", "first_in_session", "rest")}
    per_user = {g: {} for g in ("all", "first_in_session", "rest")}
    tie_events = tied_items = 0
    for row, target, user, first in zip(rows, targets, users, firsts):
        r, tied = _slow_rank(row, target, policy, padding_item)
        tie_events += tied > 0
        tied_items += tied
        values = ([float(r <= k) for k in recall_ks]
                  + [(1 / r if (k is None or r <= k) else 0.0) for k in mrr_cutoffs]
                  + [(1 / math.log2(r + 1) if r <= k else 0.0) for k in ndcg_ks])
        for g in ("all", "first_in_session" if first else "rest"):
            per_event[g].append(values)
            per_user[g].setdefault(user, []).append(values)
    out = {"per_event": {}, "per_user": {}}
    for g in per_event:
        ev = per_event[g]
        out["per_event"][g] = {name: (sum(v[i] for v in ev) / len(ev) if ev else math.nan)
                               for i, name in enumerate(names)}
        out["per_event"][g]["events"] = len(ev)
        means = [[sum(v[i] for v in vals) / len(vals) for i in range(len(names))] for vals in per_user[g].values()]
        out["per_user"][g] = {name: (sum(m[i] for m in means) / len(means) if means else math.nan)
                              for i, name in enumerate(names)}
        out["per_user"][g]["users"] = len(means)
    out["tie_events"], out["tied_items"] = tie_events, tied_items
    return out


def _assert_result_matches(result, slow, total_events):
    for unit in ("per_event", "per_user"):
        for g in ("all", "first_in_session", "rest"):
            for name, value in slow[unit][g].items():
                got = result[unit][g][name]
                if isinstance(value, float) and math.isnan(value):
                    assert math.isnan(got), (unit, g, name)
                else:
                    assert got == pytest.approx(value, rel=1e-12, abs=1e-12), (unit, g, name, got, value)
    assert result["counts"]["events"] == total_events
    assert result["ties"]["events_with_tied_target"] == slow["tie_events"]
    if total_events:
        assert result["ties"]["mean_items_tied_with_target"] == pytest.approx(slow["tied_items"] / total_events)


def _random_chunk(rng, n, columns, num_users, tie_levels, special=False):
    """Scores drawn from few levels so that ties are frequent; optionally with +-inf (and NaN in column 0)."""
    levels = torch.tensor(rng.sample(range(-50, 50), tie_levels), dtype=torch.float64) / 7
    generator = torch.Generator().manual_seed(rng.randrange(1 << 30))
    scores = levels[torch.randint(0, tie_levels, (n, columns), generator=generator)]
    if special and n:
        for _ in range(rng.randint(1, 4)):
            scores[rng.randrange(n), rng.randrange(1, columns)] = rng.choice([math.inf, -math.inf])
        scores[rng.randrange(n), 0] = math.nan  # padding column: never ranked, NaN allowed there
    targets = torch.tensor([rng.randrange(1, columns) for _ in range(n)], dtype=torch.int64)
    users = torch.tensor([rng.randrange(num_users) - 2 for _ in range(n)], dtype=torch.int64)
    firsts = torch.tensor([rng.random() < 0.4 for _ in range(n)], dtype=torch.bool)
    return scores, targets, users, firsts


@pytest.mark.parametrize("policy", ["optimistic", "pessimistic", "average"])
@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_brute_force(policy, seed, monkeypatch):
    rng = random.Random(seed)
    # Tiny row blocks and pending limits exercise the blocked ranking and the lazy per-user merge.
    monkeypatch.setattr(evaluate_module, "ROW_BLOCK_ELEMENTS", rng.choice([1, 7, 1 << 24]))
    monkeypatch.setattr(evaluate_module, "MIN_PENDING_ROWS", rng.choice([0, 1, 3, 1 << 16]))
    columns = rng.randint(2, 9)
    recall_ks, mrr_cutoffs, ndcg_ks = (1, 3, 50), (None, 2, 40), (1, 4, 60)     # some k > catalogue size
    metrics = RankingMetrics(recall_ks, mrr_cutoffs, ndcg_ks, ties=policy)
    rows, targets, users, firsts = [], [], [], []
    for _ in range(rng.randint(1, 6)):
        n = rng.choice([0, 1, 2, 5, 11])
        chunk = _random_chunk(rng, n, columns, num_users=5, tie_levels=rng.randint(1, 4), special=seed % 2 == 1)
        metrics.update(*chunk)
        rows += chunk[0].tolist()
        targets += chunk[1].tolist()
        users += chunk[2].tolist()
        firsts += chunk[3].tolist()
    slow = _slow_metrics(rows, targets, users, firsts, policy, 0, recall_ks, mrr_cutoffs, ndcg_ks)
    result = metrics.result()
    _assert_result_matches(result, slow, len(rows))
    assert result["counts"]["users"] == len(set(users))
    assert result["counts"]["catalogue_items"] == (columns - 1 if rows or metrics.num_columns else None)


@pytest.mark.parametrize("seed", range(4))
def test_metrics_no_padding_item_and_other_padding_column(seed):
    rng = random.Random(100 + seed)
    columns = rng.randint(2, 8)
    for padding_item in (None, columns - 1):
        metrics = RankingMetrics((1, 2), (None,), (3,), ties="average", padding_item=padding_item)
        scores, _, users, firsts = _random_chunk(rng, 9, columns, 3, tie_levels=2)
        if padding_item is None:
            targets = torch.tensor([rng.randrange(0, columns) for _ in range(9)])
        else:
            targets = torch.tensor([rng.randrange(0, columns - 1) for _ in range(9)])
        metrics.update(scores, targets, users, firsts)
        slow = _slow_metrics(scores.tolist(), targets.tolist(), users.tolist(), firsts.tolist(), "average",
                             padding_item, (1, 2), (None,), (3,))
        _assert_result_matches(metrics.result(), slow, 9)


@pytest.mark.parametrize("seed", range(4))
def test_metrics_merge_is_order_independent(seed, monkeypatch):
    rng = random.Random(200 + seed)
    monkeypatch.setattr(evaluate_module, "MIN_PENDING_ROWS", rng.choice([0, 2, 1 << 16]))
    columns = 6
    chunks = [_random_chunk(rng, rng.choice([0, 1, 4, 7]), columns, 4, tie_levels=3) for _ in range(6)]
    single = RankingMetrics(ties="pessimistic")
    for chunk in chunks:
        single.update(*chunk)
    expected = single.result()
    for _ in range(3):
        parts = [RankingMetrics(ties="pessimistic") for _ in range(3)]
        for chunk in chunks:
            rng.choice(parts).update(*chunk)
        order = rng.sample(range(3), 3)
        total = parts[order[0]]
        total.merge(parts[order[1]])
        total.merge(parts[order[2]])
        got = total.result()
        for unit in ("per_event", "per_user"):
            for g in ("all", "first_in_session", "rest"):
                for name, value in expected[unit][g].items():
                    if isinstance(value, float) and math.isnan(value):
                        assert math.isnan(got[unit][g][name])
                    else:
                        assert got[unit][g][name] == pytest.approx(value, rel=1e-12), (unit, g, name)
        assert got["counts"] == expected["counts"] and got["ties"] == expected["ties"]


def test_metrics_result_is_repeatable_and_update_after_result():
    rng = random.Random(7)
    a, b = (_random_chunk(rng, 5, 5, 3, tie_levels=3) for _ in range(2))
    metrics = RankingMetrics()
    metrics.update(*a)
    first = metrics.result()
    assert metrics.result() == first or all(  # NaN != NaN: compare through repr
        repr(metrics.result()[k]) == repr(first[k]) for k in first)
    metrics.update(*b)
    both = RankingMetrics()
    both.update(*a)
    both.update(*b)
    assert repr(metrics.result()) == repr(both.result())


def test_target_ranks_with_infinities_and_half_precision():
    scores = torch.tensor([[math.nan, math.inf, math.inf, 0.0, -math.inf],
                           [0.0, -math.inf, -math.inf, -math.inf, 1.0],
                           [math.inf, 1.0, 2.0, 2.0, 3.0]], dtype=torch.float64)
    targets = torch.tensor([1, 2, 3])
    higher, tied = target_ranks(scores, targets)
    assert higher.tolist() == [0, 1, 1] and tied.tolist() == [1, 2, 1]
    h16, t16 = target_ranks(scores.half(), targets)
    assert h16.tolist() == higher.tolist() and t16.tolist() == tied.tolist()
    metrics = RankingMetrics((1,), (None,), (), ties="average")
    metrics.update(scores.float(), targets, torch.zeros(3, dtype=torch.int64), torch.tensor([True, False, False]))
    result = metrics.result()
    assert result["per_event"]["all"]["MRR"] == pytest.approx((1 / 1.5 + 1 / 3 + 1 / 2.5) / 3)


def test_metrics_bad_inputs():
    metrics = RankingMetrics()
    good = (torch.zeros(2, 4), torch.tensor([1, 2]), torch.tensor([0, 1]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.update(torch.tensor([[0.0, 1.0, math.nan, 2.0], [0.0, 1.0, 2.0, 3.0]]), *good[1:])
    with pytest.raises(ValueError, match="not in the"):
        metrics.update(good[0], torch.tensor([0, 2]), *good[2:])
    with pytest.raises(ValueError, match="not in the"):
        metrics.update(good[0], torch.tensor([1, 4]), *good[2:])
    with pytest.raises(TypeError, match="floating"):
        metrics.update(torch.zeros(2, 4, dtype=torch.int64), *good[1:])
    with pytest.raises(TypeError, match="first_in_session"):
        metrics.update(*good[:3], torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="targets"):
        metrics.update(good[0], torch.tensor([1, 2, 3]), *good[2:])
    assert metrics.result()["counts"]["events"] == 0     # nothing from the refused chunks
    metrics.update(*good)
    with pytest.raises(ValueError, match="4 item columns"):
        metrics.update(torch.zeros(2, 5), *good[1:])
    assert metrics.result()["counts"]["events"] == 2


# ----------------------------------------------------------------------------------------------- rule_report

@pytest.mark.parametrize("history", ["user", "session"])
def test_evaluate_rules_matches_slow_pipeline(random_cache, history):
    from hiertcn_fast.rule_report import evaluate_rules, format_table

    cache = random_cache
    train_events = _slow_events(cache, "train", history)
    slow_events = _slow_events(cache, "test", history)
    results = evaluate_rules(cache, "test", history=history, chunk_size=3)
    assert list(results) == list(RULES)
    columns = cache.num_items + 1
    for name, result in results.items():
        # The slow ranking as scores: the best item gets the largest score, column 0 is padding.
        rows = []
        for _, _, _, hist in slow_events:
            order, _ = _slow_rule_ranking(name, cache, history, train_events, hist)
            row = [-math.inf] * columns
            for position, item in enumerate(order):
                row[item] = float(columns - position)
            rows.append(row)
        metrics = RankingMetrics()
        slow = _slow_metrics(rows, [e[1] for e in slow_events], [e[0] for e in slow_events],
                             [e[2] for e in slow_events], "optimistic", 0, metrics.recall_ks, metrics.mrr_cutoffs,
                             metrics.ndcg_ks)
        _assert_result_matches(result.quality, slow, len(slow_events))
        assert result.quality["ties"]["events_with_tied_target"] == 0      # the rules never tie
        assert result.extra["history"] == history
    table = format_table(results, "per_event")
    assert all(name in table for name in RULES)
