"""Full-catalogue ranking metrics: hand-computed cases, tie policies, averaging units, streaming,
and a brute-force numpy implementation on random data."""

import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from hiertcn_fast import evaluate
from hiertcn_fast.evaluate import RankingMetrics, target_ranks


def _update(metrics, scores, targets, users=None, first=None):
    n = len(targets)
    users = torch.zeros(n, dtype=torch.int64) if users is None else torch.as_tensor(users, dtype=torch.int64)
    first = torch.zeros(n, dtype=torch.bool) if first is None else torch.as_tensor(first, dtype=torch.bool)
    metrics.update(torch.as_tensor(scores, dtype=torch.float32), torch.as_tensor(targets, dtype=torch.int64),
                   users, first)


def test_hand_computed_ranks_and_metrics(device):
    # Column 0 is padding and scores highest: it must not count.
    scores = torch.tensor([[9.0, 0.5, 0.9, 0.1, 0.7],    # target 1: items 2, 4 higher -> rank 3
                           [9.0, 0.5, 0.9, 0.1, 0.7],    # target 2 -> rank 1
                           [9.0, 0.5, 0.9, 0.1, 0.7]],   # target 3 -> rank 4
                          device=device)
    metrics = RankingMetrics()
    metrics.update(scores, torch.tensor([1, 2, 3], device=device), torch.tensor([7, 7, 7]),
                   torch.tensor([True, False, False]))
    result = metrics.result()
    all_events = result["per_event"]["all"]
    ranks = np.array([3.0, 1.0, 4.0])
    assert all_events["events"] == 3
    assert all_events["Recall@1"] == pytest.approx(1 / 3)
    assert all_events["Recall@5"] == pytest.approx(1.0)
    assert all_events["MRR"] == pytest.approx(np.mean(1 / ranks))
    assert all_events["MRR@20"] == pytest.approx(np.mean(1 / ranks))
    assert all_events["NDCG@10"] == pytest.approx(np.mean(1 / np.log2(ranks + 1)))
    assert result["per_event"]["first_in_session"]["MRR"] == pytest.approx(1 / 3)
    assert result["per_event"]["rest"]["MRR"] == pytest.approx((1 + 1 / 4) / 2)
    assert result["counts"]["catalogue_items"] == 4
    assert result["counts"]["first_in_session_events"] == 1 and result["counts"]["rest_events"] == 2
    assert "strictly higher" in result["tie_policy"]
    assert set(result["averaging"]) == {"per_event", "per_user"}


def test_cutoffs_exclude_ranks_beyond_them():
    scores = torch.arange(30, dtype=torch.float32).flip(0)[None]  # item i has rank i (column 0 padding)
    metrics = RankingMetrics()
    _update(metrics, scores.repeat(2, 1), [11, 25])  # ranks 11 and 25
    result = metrics.result()["per_event"]["all"]
    assert result["Recall@10"] == 0.0 and result["Recall@20"] == 0.5 and result["NDCG@10"] == 0.0
    assert result["MRR"] == pytest.approx((1 / 11 + 1 / 25) / 2)
    assert result["MRR@20"] == pytest.approx((1 / 11) / 2)


def test_ties_do_not_hurt_the_target_by_default():
    scores = torch.tensor([[5.0, 1.0, 1.0, 1.0, 2.0, 0.0]])  # target 2 tied with items 1 and 3; item 4 higher
    policies = {"optimistic": 2.0, "pessimistic": 4.0, "average": 3.0}
    for ties, rank in policies.items():
        metrics = RankingMetrics(ties=ties)
        _update(metrics, scores, [2])
        result = metrics.result()
        assert result["per_event"]["all"]["MRR"] == pytest.approx(1 / rank), ties
        assert result["tie_policy"].startswith(ties)
        assert result["ties"]["events_with_tied_target"] == 1
        assert result["ties"]["mean_items_tied_with_target"] == 2.0


def test_constant_scores_are_flagged():
    metrics = RankingMetrics()
    _update(metrics, torch.zeros(4, 10), [1, 2, 3, 9])
    result = metrics.result()
    assert result["per_event"]["all"]["Recall@1"] == 1.0  # the optimistic policy's known blind spot...
    assert result["ties"]["fraction_events_with_tied_target"] == 1.0  # ...which the result reports
    assert result["ties"]["mean_items_tied_with_target"] == 8.0


def test_padding_item_tie_is_not_counted():
    metrics = RankingMetrics(ties="pessimistic")
    _update(metrics, torch.tensor([[1.0, 1.0, 0.0]]), [1])
    assert metrics.result()["per_event"]["all"]["Recall@1"] == 1.0
    every_column = RankingMetrics(ties="pessimistic", padding_item=None)
    _update(every_column, torch.tensor([[1.0, 1.0, 0.0]]), [0])
    assert every_column.result()["per_event"]["all"]["MRR"] == 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_in_the_padding_column_is_ignored(dtype):
    """Column 0 is never ranked (a model's output bias for it may be anything, NaN included), so a NaN
    there must not stop the evaluation; a NaN in a catalogue column still does."""
    scores = torch.tensor([[float("nan"), 1.0, 3.0, 2.0], [float("nan"), 4.0, 1.0, 2.0]], dtype=dtype)
    metrics = RankingMetrics()
    metrics.update(scores, torch.tensor([3, 1]), torch.tensor([0, 1]), torch.tensor([True, False]))
    assert metrics.result()["per_event"]["all"]["MRR"] == pytest.approx((1 / 2 + 1) / 2)
    scores[1, 2] = float("nan")
    with pytest.raises(ValueError, match="scores: NaN in 1 of 2 events \\(first at event 1\\)"):
        RankingMetrics().update(scores, torch.tensor([3, 1]), torch.tensor([0, 1]), torch.tensor([True, False]))
    # With no padding column, column 0 is an item and its NaN counts.
    with pytest.raises(ValueError, match="scores: NaN in 2 of 2 events"):
        RankingMetrics(padding_item=None).update(scores, torch.tensor([3, 1]), torch.tensor([0, 1]),
                                                 torch.tensor([True, False]))


def test_per_user_and_per_event_averages_differ():
    # User 1: three events, all rank 1. User 2: one event, rank 2.
    scores = torch.tensor([[0.0, 3.0, 2.0, 1.0]]).repeat(4, 1)
    metrics = RankingMetrics()
    _update(metrics, scores, [1, 1, 1, 2], users=[1, 1, 1, 2], first=[True, False, False, True])
    result = metrics.result()
    assert result["per_event"]["all"]["MRR"] == pytest.approx((3 + 0.5) / 4)
    assert result["per_user"]["all"]["MRR"] == pytest.approx((1 + 0.5) / 2)
    assert result["per_event"]["all"]["Recall@1"] == pytest.approx(0.75)
    assert result["per_user"]["all"]["Recall@1"] == pytest.approx(0.5)
    assert result["per_user"]["all"]["users"] == 2
    # First-of-session: both users; rest: only user 1.
    assert result["per_user"]["first_in_session"]["MRR"] == pytest.approx(0.75)
    assert result["per_user"]["rest"]["users"] == 1
    assert result["per_user"]["rest"]["MRR"] == 1.0
    assert result["counts"]["users"] == 2


def test_empty_group_is_nan_and_result_is_json():
    metrics = RankingMetrics()
    _update(metrics, torch.rand(3, 6), [1, 2, 3], first=[False] * 3)
    result = metrics.result()
    assert math.isnan(result["per_event"]["first_in_session"]["MRR"])
    assert result["per_user"]["first_in_session"]["users"] == 0
    again = json.loads(json.dumps(result))
    assert again["per_event"]["rest"]["events"] == 3
    assert math.isnan(RankingMetrics().result()["per_event"]["all"]["Recall@10"])


def _brute_force(scores, targets, users, first, ties, padding_item=0):
    """Ranks by sorting each row with numpy, then plain-Python averaging."""
    per_event = []
    for row, target in zip(scores, targets):
        catalogue = np.delete(row, padding_item) if padding_item is not None else row
        descending = np.sort(catalogue)[::-1]
        positions = np.flatnonzero(descending == row[target])
        best, worst = positions[0] + 1, positions[-1] + 1
        rank = {"optimistic": best, "pessimistic": worst, "average": (best + worst) / 2}[ties]
        per_event.append({"Recall@1": rank <= 1, "Recall@5": rank <= 5, "Recall@10": rank <= 10,
                          "Recall@20": rank <= 20, "MRR": 1 / rank, "MRR@20": (rank <= 20) / rank,
                          "NDCG@10": (rank <= 10) / math.log2(rank + 1)})
    out = {}
    for group, select in (("all", lambda f: True), ("first_in_session", lambda f: f), ("rest", lambda f: not f)):
        chosen = [i for i in range(len(targets)) if select(first[i])]
        by_user = defaultdict(list)
        for i in chosen:
            by_user[users[i]].append(per_event[i])
        out[group] = {
            "per_event": {m: np.mean([per_event[i][m] for i in chosen]) for m in per_event[0]},
            "per_user": {m: np.mean([np.mean([e[m] for e in evs]) for evs in by_user.values()]) for m in per_event[0]},
        }
    return out


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic", "average"])
def test_matches_brute_force_on_random_data(ties, device):
    rng = np.random.default_rng(3)
    n, num_columns = 300, 41
    # Rounded scores so that ties are frequent.
    scores = np.round(rng.normal(size=(n, num_columns)), 1).astype(np.float32)
    targets = rng.integers(1, num_columns, n)
    users = rng.integers(0, 25, n) * 1000 - 7000  # arbitrary, negative included
    first = rng.random(n) < 0.3
    metrics = RankingMetrics(ties=ties)
    metrics.update(torch.from_numpy(scores).to(device), torch.from_numpy(targets).to(device),
                   torch.from_numpy(users), torch.from_numpy(first))
    result = metrics.result()
    expected = _brute_force(scores, targets, users, first, ties)
    for group in ("all", "first_in_session", "rest"):
        for unit in ("per_event", "per_user"):
            for name, value in expected[group][unit].items():
                assert result[unit][group][name] == pytest.approx(value, abs=1e-12), (group, unit, name)


def test_chunked_updates_equal_one_update(monkeypatch):
    rng = np.random.default_rng(5)
    n, num_columns = 500, 30
    scores = torch.from_numpy(np.round(rng.normal(size=(n, num_columns)), 1))
    targets = torch.from_numpy(rng.integers(1, num_columns, n))
    users = torch.from_numpy(rng.integers(0, 60, n))
    first = torch.from_numpy(rng.random(n) < 0.2)
    whole = RankingMetrics()
    whole.update(scores, targets, users, first)
    # Small pending limit and row blocks: exercise the per-user merging and the blocked rank kernel.
    monkeypatch.setattr(evaluate, "MIN_PENDING_ROWS", 7)
    monkeypatch.setattr(evaluate, "ROW_BLOCK_ELEMENTS", 100)
    chunked = RankingMetrics()
    bounds = [0, 1, 1, 50, 173, 400, n]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        chunked.update(scores[lo:hi], targets[lo:hi], users[lo:hi], first[lo:hi])
    _close(chunked.result(), whole.result())
    halves = [RankingMetrics(), RankingMetrics()]
    halves[0].update(scores[:200], targets[:200], users[:200], first[:200])
    halves[1].update(scores[200:], targets[200:], users[200:], first[200:])
    halves[0].merge(halves[1])
    _close(halves[0].result(), whole.result())


def _close(a, b):
    for unit in ("per_event", "per_user"):
        for group in ("all", "first_in_session", "rest"):
            for name, value in b[unit][group].items():
                assert a[unit][group][name] == pytest.approx(value, rel=1e-12, abs=1e-12), (unit, group, name)
    assert a["counts"] == b["counts"] and a["ties"] == b["ties"]
    return True


def test_target_ranks_counts():
    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0], [0.0, 5.0, 5.0, 5.0]])
    higher, tied = target_ranks(scores, torch.tensor([2, 1]))
    assert higher.tolist() == [0, 0] and tied.tolist() == [1, 2]
    higher, tied = target_ranks(scores, torch.tensor([2, 1]), padding_item=None)
    assert higher.tolist() == [1, 0] and tied.tolist() == [1, 2]
    # A target outside the catalogue is refused, as RankingMetrics.update refuses it: the padding column gave a
    # tie count of -1, an id past the columns an index error, a float target a gather error.
    for targets, message in ((torch.tensor([0, 1]), "item id 0 at event 0 is not in the catalogue"),
                             (torch.tensor([2, 4]), "item id 4 at event 1 is not in the catalogue"),
                             (torch.tensor([2, -1]), "item id -1 at event 1"),
                             (torch.tensor([2.0, 1.0]), "integer item ids"), (torch.tensor([2]), r"\(events,\)")):
        with pytest.raises(ValueError, match=message):
            target_ranks(scores, targets)
    # Any integer dtype of ids (uint8 and int16 ids failed inside gather); a NaN-scored target has no rank (it was
    # counted as tied with -1 items).
    # (uint16, uint32 and uint64 failed in the check's comparison, which torch does not have for them.)
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.uint16, torch.uint32, torch.uint64):
        higher, tied = target_ranks(scores, torch.tensor([2, 1], dtype=dtype))
        assert higher.tolist() == [0, 0] and tied.tolist() == [1, 2], dtype
    # A uint64 id past int64's range is named by its value (the conversion to int64 made it negative).
    huge = torch.tensor([2, 2 ** 63 + 3], dtype=torch.uint64)
    with pytest.raises(ValueError, match="item id 9223372036854775811 at event 1 is not in the catalogue"):
        target_ranks(scores, huge)
    with pytest.raises(ValueError, match="item id 9223372036854775811 at event 1 is not in the catalogue"):
        RankingMetrics().update(scores, huge, torch.tensor([0, 1]), torch.tensor([True, False]))
    nan_target = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, float("nan"), 2.0]])
    with pytest.raises(ValueError, match="the target of event 1 scores NaN"):
        target_ranks(nan_target, torch.tensor([1, 2]))
    # Targets on another device than the scores: a ValueError that says so (it was gather's RuntimeError). The meta
    # device stands in for a GPU here.
    with pytest.raises(ValueError, match=r"targets must be on the scores' device \(cpu\), got meta"):
        target_ranks(scores, torch.tensor([2, 1], device="meta"))
    # scores not (events, items) floating point: an error naming them (a 1-D or 3-D tensor failed as the shape was
    # unpacked, "not enough values to unpack"; a NumPy array was told its targets were not on device "cpu").
    for bad, error, message in ((torch.randn(4), ValueError, r"scores must be \(events, items\).*shape \(4,\)"),
                                (torch.randn(2, 3, 4), ValueError, r"shape \(2, 3, 4\)"),
                                (torch.ones(2, 4, dtype=torch.int64), ValueError, "floating point.*torch.int64"),
                                (np.zeros((2, 4)), TypeError, "scores must be a torch.Tensor, got ndarray")):
        with pytest.raises(error, match=message):
            target_ranks(bad, torch.tensor([2, 1]))
    with pytest.raises(TypeError, match="targets must be a torch.Tensor, got list"):
        target_ranks(scores, [2, 1])


def test_half_precision_scores(device):
    metrics = RankingMetrics()
    scores = torch.tensor([[0.0, 1.0, 3.0, 2.0]], dtype=torch.bfloat16, device=device)
    metrics.update(scores, torch.tensor([3]), torch.tensor([0]), torch.tensor([False]))
    assert metrics.result()["per_event"]["all"]["MRR"] == 0.5


def test_bad_inputs_raise_clear_errors():
    metrics = RankingMetrics()
    good = dict(scores=torch.rand(2, 5), targets=torch.tensor([1, 2]), users=torch.tensor([0, 1]),
                first_in_session=torch.tensor([True, False]))

    def call(**override):
        metrics.update(**(good | override))

    nan_scores = torch.rand(2, 5)
    nan_scores[1, 3] = float("nan")
    with pytest.raises(ValueError, match="scores: NaN"):
        call(scores=nan_scores)
    infinite = torch.rand(2, 5)
    infinite[0, 1], infinite[0, 2] = float("inf"), float("-inf")  # a NaN row sum, but no NaN score
    call(scores=infinite)
    with pytest.raises(ValueError, match="scores: NaN in 1 of 2 events"):
        call(scores=torch.cat([infinite[:1], nan_scores[1:]]).to(torch.float16))
    with pytest.raises(ValueError, match="scores: expected shape"):
        call(scores=torch.rand(10))
    with pytest.raises(TypeError, match="scores: expected a floating point"):
        call(scores=torch.ones(2, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="scores must be"):
        call(scores=[[0.1, 0.2]])
    with pytest.raises(ValueError, match="targets: expected shape"):
        call(targets=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="targets: expected an integer"):
        call(targets=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="targets: item id 0"):
        call(targets=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="targets: item id 5"):
        call(targets=torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="users: expected shape"):
        call(users=torch.tensor([0]))
    with pytest.raises(TypeError, match="first_in_session: expected dtype torch.bool"):
        call(first_in_session=torch.tensor([1, 0]))
    call()
    with pytest.raises(ValueError, match="expected 5 item columns"):
        call(scores=torch.rand(2, 6))
    with pytest.raises(ValueError, match="ties must be"):
        RankingMetrics(ties="random")
    with pytest.raises(ValueError, match="recall_ks"):
        RankingMetrics(recall_ks=(0, 5))
    with pytest.raises(ValueError, match="padding_item"):
        RankingMetrics(padding_item=-1)
    with pytest.raises(ValueError, match="padding_item 9"):
        RankingMetrics(padding_item=9).update(**good)
    with pytest.raises(ValueError, match="other: metrics"):
        metrics.merge(RankingMetrics(ties="average"))


def test_a_refused_first_update_fixes_nothing():
    """The first chunk fixes the catalogue's width only once it passed every check; a metric set with no metric
    at all is refused when made, not at its first update."""
    metrics = RankingMetrics()
    with pytest.raises(ValueError, match="not in the catalogue"):
        metrics.update(torch.randn(2, 5), torch.tensor([1, 9]), torch.tensor([0, 0]), torch.tensor([True, False]))
    assert metrics.num_columns is None
    metrics.update(torch.randn(2, 7), torch.tensor([1, 6]), torch.tensor([0, 0]), torch.tensor([True, False]))
    assert metrics.num_columns == 7 and metrics.result()["counts"]["events"] == 2
    with pytest.raises(ValueError, match="at least one metric"):
        RankingMetrics(recall_ks=(), mrr_cutoffs=(), ndcg_ks=())


def test_cutoffs_and_padding_column_are_checked_with_clear_messages():
    from hiertcn_fast.evaluate import RankingMetrics, target_ranks
    for name in ("recall_ks", "mrr_cutoffs", "ndcg_ks"):
        for bad in (5, None, "10"):
            with pytest.raises(TypeError, match=f"{name} must be a sequence of cutoffs"):
                RankingMetrics(**{name: bad})
    assert RankingMetrics(recall_ks={5, 10}).recall_ks in ((5, 10), (10, 5))
    scores, targets = torch.randn(3, 4), torch.tensor([1, 2, 3])
    for bad in (4, 7, -1):
        with pytest.raises(ValueError, match=r"padding_item must be a column of the scores \(0..3\) or None"):
            target_ranks(scores, targets, padding_item=bad)
    higher, _ = target_ranks(scores, targets, padding_item=None)
    assert higher.tolist() == [(scores[i] > scores[i, targets[i]]).sum().item() for i in range(3)]


def _metrics_chunks():
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(40, 30, generator=generator), torch.randint(1, 30, (40,), generator=generator),
             torch.randint(0, 6, (40,), generator=generator), torch.rand(40, generator=generator) < 0.3)
            for _ in range(3)]


def _fed(chunks):
    metrics = RankingMetrics()
    for chunk in chunks:
        metrics.update(*chunk)
    return metrics


def _interrupted_at_line(call, codes, n):
    """Run call() with KeyboardInterrupt raised before the n-th line it executes inside ``codes``; whether it fired."""
    import sys

    count = [0]

    def local(frame, event, arg):
        if event == "line":
            count[0] += 1
            if count[0] == n:
                sys.settrace(None)
                raise KeyboardInterrupt
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code in codes else None)
    try:
        call()
    except KeyboardInterrupt:
        return True
    finally:
        sys.settrace(None)
    return False


@pytest.mark.parametrize("how", ["update", "merge", "update with a compaction"])
def test_an_accumulator_interrupted_at_any_line_is_as_before_or_after_and_a_retry_counts_the_chunk_once(
        monkeypatch, how):
    """update() added a chunk to the first group's sums, then the other's, then the per-user sums (merge() the
    same): an interrupt between them (the loop's back edge, the entry of _UserSums.add: real Ctrl-C landing points)
    left sums that matched neither the accumulator before nor after, and a retry counted part of the chunk twice.
    Now everything is computed first and stored in one assignment."""
    if how == "update with a compaction":
        monkeypatch.setattr(evaluate, "MIN_PENDING_ROWS", 1)
    chunks = _metrics_chunks()
    before, after = _fed(chunks[:2]).result(), _fed(chunks).result()
    if how == "merge":
        def act(metrics):
            metrics.merge(_fed(chunks[2:]))
    else:
        def act(metrics):
            metrics.update(*chunks[2])
    codes = {RankingMetrics.update.__code__, RankingMetrics.merge.__code__,
             *(f.__code__ for f in (evaluate._UserSums.added, evaluate._UserSums.merged,
                                    evaluate._UserSums._with_pending, evaluate._UserSums._compacted.__func__))}
    n = 0
    while True:
        n += 1
        metrics = _fed(chunks[:2])
        if not _interrupted_at_line(lambda: act(metrics), codes, n):
            break
        now = metrics.result()
        assert now in (before, after), f"line {n}: torn accumulator ({now['counts']} vs {before['counts']})"
        if now == before:
            act(metrics)
            assert metrics.result() == after, f"line {n}: the retry did not count the chunk exactly once"
    assert n > 20 and metrics.result() == after


def test_adding_a_chunk_copies_none_of_the_pending_ones():
    """The pending chunks are a chain: each new state links to the one before. A tuple of them, copied whole on every
    chunk, made a split's evaluation quadratic in its chunks (60,000 one-user chunks: 0.45 s before, 7.9 s)."""
    sums = evaluate._UserSums(3)
    previous = sums.state[2]
    for i in range(5):
        sums.state = sums.added(np.array([i, i + 1]), np.ones((2, 3)))
        assert sums.state[2][0] is previous  # the earlier chain itself, not a copy
        previous = sums.state[2]
    keys, table = sums.compact()
    assert keys.tolist() == list(range(6)) and table[:, 0].tolist() == [1, 2, 2, 2, 2, 1]
