"""Differential fuzz tests of hiertcn_fast.evaluate (target_ranks, batch_targets, RankingMetrics) and of how
train.evaluate feeds it, against an independent brute-force peer written here from the documented definitions:

- rank of the target = 1 + catalogue items scoring strictly higher (optimistic, the default), + every tied item
  (pessimistic), + half of them (average); the padding column is not part of the catalogue;
- Recall@k = [r <= k], MRR = 1/r, MRR@k = [r <= k]/r, NDCG@k = [r <= k]/log2(r + 1);
- per event (every event weighs the same) and per user (mean over each user's events, then over users), for all
  events, the first event of each session, and the rest; a NaN in a catalogue column is a ValueError, +-inf are
  ordinary scores, NaN in the padding column is ignored.

Randomised with fixed seeds: integer-valued scores with many ties, +-inf, float16/bfloat16/float32/float64, unsorted
and out-of-range cut-offs, padding anywhere (or none), chunked/merged accumulation, empty chunks, non-contiguous
views, catalogue size 1, bad arguments.
"""

import collections
import json
import math
import random

import numpy as np
import pytest
import torch

from hiertcn_fast import evaluate as ev
from hiertcn_fast.data import SessionBatch
from hiertcn_fast.evaluate import TIE_POLICIES, RankingMetrics, batch_targets, target_ranks
from test_rules_metrics_differential import _slow_rank
from model_helpers import one_thread  # noqa: E402,F401  (an autouse fixture: one intra-op thread)


GROUPS = ("all", "first_in_session", "rest")
POLICIES = ("optimistic", "pessimistic", "average")
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------------------ peer

def peer_counts(row, target, padding_item):
    """(higher, tied) of one event by a plain Python loop over a float64 row (exact for every input dtype): the
    rules-and-metrics differential test's loop."""
    rank, tied = _slow_rank(row, target, "optimistic", padding_item)
    return rank - 1, tied


def peer_rank(higher, tied, policy):
    return {"optimistic": 1.0 + higher, "pessimistic": 1.0 + higher + tied, "average": 1.0 + higher + tied / 2.0}[
        policy]


def peer_names(recall_ks, mrr_cutoffs, ndcg_ks):
    return ([f"Recall@{k}" for k in recall_ks] + ["MRR" if k is None else f"MRR@{k}" for k in mrr_cutoffs]
            + [f"NDCG@{k}" for k in ndcg_ks])


def peer_values(rank, recall_ks, mrr_cutoffs, ndcg_ks):
    values = [1.0 if rank <= k else 0.0 for k in recall_ks]
    values += [1.0 / rank if (k is None or rank <= k) else 0.0 for k in mrr_cutoffs]
    values += [1.0 / math.log2(rank + 1.0) if rank <= k else 0.0 for k in ndcg_ks]
    return values


def peer_result(events, recall_ks, mrr_cutoffs, ndcg_ks, policy, padding_item, num_columns):
    """events: list of (float64 row as a Python list, target, user, first)."""
    names = peer_names(recall_ks, mrr_cutoffs, ndcg_ks)
    per_event_values = []
    tie_events = tied_items = 0
    for row, target, user, first in events:
        higher, tied = peer_counts(row, target, padding_item)
        tie_events += tied > 0
        tied_items += tied
        per_event_values.append(peer_values(peer_rank(higher, tied, policy), recall_ks, mrr_cutoffs, ndcg_ks))
    out = {"metrics": names, "per_event": {}, "per_user": {}}
    for group in GROUPS:
        chosen = [i for i, e in enumerate(events)
                  if group == "all" or (group == "first_in_session") == bool(e[3])]
        pe = {}
        for m, name in enumerate(names):
            pe[name] = math.fsum(per_event_values[i][m] for i in chosen) / len(chosen) if chosen else math.nan
        pe["events"] = len(chosen)
        out["per_event"][group] = pe
        by_user = collections.defaultdict(list)
        for i in chosen:
            by_user[events[i][2]].append(i)
        pu = {}
        for m, name in enumerate(names):
            means = [math.fsum(per_event_values[i][m] for i in idx) / len(idx) for idx in by_user.values()]
            pu[name] = math.fsum(means) / len(means) if means else math.nan
        pu["users"] = len(by_user)
        out["per_user"][group] = pu
    n = len(events)
    out["counts"] = {"events": n, "users": len({e[2] for e in events}),
                     "first_in_session_events": sum(1 for e in events if e[3]),
                     "rest_events": sum(1 for e in events if not e[3]),
                     "catalogue_items": None if num_columns is None else num_columns - (padding_item is not None)}
    out["ties"] = {"events_with_tied_target": tie_events,
                   "fraction_events_with_tied_target": tie_events / n if n else math.nan,
                   "mean_items_tied_with_target": tied_items / n if n else math.nan}
    return out


def _same(got, want, where):
    if isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), (where, got, want)
    elif isinstance(want, int) and not isinstance(want, bool):
        assert got == want and isinstance(got, int), (where, got, want)
    else:
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12), (where, got, want)


def assert_matches_peer(result, peer, policy):
    assert result["metrics"] == peer["metrics"]
    for unit in ("per_event", "per_user"):
        assert set(result[unit]) == set(GROUPS), unit
        for group in GROUPS:
            assert set(result[unit][group]) == set(peer[unit][group]), (unit, group)
            for name, want in peer[unit][group].items():
                _same(result[unit][group][name], want, (unit, group, name))
    assert result["counts"] == peer["counts"]
    for name, want in peer["ties"].items():
        _same(result["ties"][name], want, ("ties", name))
    # The labels: the policy's name and its definition, and the averaging units.
    assert result["tie_policy"] == f"{policy}: {TIE_POLICIES[policy]}"
    assert set(result["averaging"]) == {"per_event", "per_user"}
    assert "each user" in result["averaging"]["per_user"] and "event" in result["averaging"]["per_event"]
    json.loads(json.dumps(result))  # plain JSON-able values


def rows64(scores):
    return scores.detach().to(torch.float64).cpu().tolist()


# ------------------------------------------------------------------------------------------------------------ inputs

def random_cutoffs(rng, num_columns):
    """Unsorted cut-offs, some beyond the catalogue's size; None somewhere in the MRR cut-offs."""
    pool = list(range(1, num_columns + 3)) + [num_columns * 5 + 7, 1000, 2 ** 40]
    recall = tuple(rng.sample(pool, rng.randint(0, 4)))
    mrr = list(rng.sample(pool, rng.randint(0, 3)))
    if rng.random() < 0.7:
        mrr.insert(rng.randint(0, len(mrr)), None)
    ndcg = tuple(rng.sample(pool, rng.randint(1, 3)))
    if rng.random() < 0.3:  # NumPy integers are integers too
        ndcg = tuple(np.int64(k) for k in ndcg)
    return recall, tuple(mrr), ndcg


def random_padding(rng, num_columns):
    options = [0, None, num_columns - 1, rng.randrange(num_columns)]
    padding = rng.choice(options)
    if padding is not None and num_columns == 1:
        padding = None  # a lone padding column leaves no catalogue
    return padding


def random_scores(rng, n, num_columns, dtype, levels, special):
    """Integer-valued (hence exact in every dtype) scores from few levels: ties everywhere; +-inf if special."""
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    values = torch.randint(-levels, levels + 1, (n, num_columns), generator=gen).to(torch.float64) * 0.5
    if special and n:
        for _ in range(rng.randint(1, 5)):
            values[rng.randrange(n), rng.randrange(num_columns)] = rng.choice([math.inf, -math.inf])
    return values.to(dtype)


def random_targets(rng, n, num_columns, padding_item):
    choices = [j for j in range(num_columns) if j != padding_item]
    return [rng.choice(choices) for _ in range(n)]


USER_POOL = [-2 ** 63, -7, -1, 0, 1, 2, 3, 5, 8, 13, 1000, 2 ** 31, 2 ** 63 - 1]


# ------------------------------------------------------------------------------------------------------------ fuzz

@pytest.mark.parametrize("seed", range(48))
def test_fuzz_metrics_match_peer_over_chunks(seed, monkeypatch):
    """Random chunks of random dtype (ties, +-inf), cut-offs, padding column and tie policy, users spread over the
    chunks (and over int64's whole range), tiny row blocks and merge thresholds: every number of result() equals
    the peer's."""
    rng = random.Random(seed)
    monkeypatch.setattr(ev, "ROW_BLOCK_ELEMENTS", rng.choice([1, 5, 64, 1 << 24]))
    monkeypatch.setattr(ev, "MIN_PENDING_ROWS", rng.choice([0, 1, 3, 1 << 16]))
    num_columns = rng.choice([1, 2, 3, 5, 9, 17, 40])
    padding = random_padding(rng, num_columns)
    policy = POLICIES[seed % 3]
    recall, mrr, ndcg = random_cutoffs(rng, num_columns)
    metrics = RankingMetrics(recall, mrr, ndcg, ties=policy, padding_item=padding)
    users_pool = rng.sample(USER_POOL, rng.randint(1, len(USER_POOL)))
    events = []
    for _ in range(rng.randint(1, 12)):
        n = rng.choice([0, 0, 1, 2, 3, 7, 20])
        dtype = rng.choice(DTYPES)
        scores = random_scores(rng, n, num_columns, dtype, levels=rng.randint(0, 3), special=rng.random() < 0.5)
        if padding is not None and n and rng.random() < 0.5:
            scores[rng.randrange(n), padding] = math.nan  # never ranked: allowed
        if rng.random() < 0.2:
            scores.requires_grad_(True)  # a model's output straight from a forward pass
        targets = random_targets(rng, n, num_columns, padding)
        users = [rng.choice(users_pool) for _ in range(n)]
        first = [rng.random() < 0.35 for _ in range(n)]
        metrics.update(scores, torch.tensor(targets, dtype=rng.choice([torch.int64, torch.int32, torch.int16])),
                       torch.tensor(users, dtype=torch.int64), torch.tensor(first, dtype=torch.bool))
        events += list(zip(rows64(scores), targets, users, first))
    peer = peer_result(events, recall, mrr, ndcg, policy, padding, num_columns)
    assert_matches_peer(metrics.result(), peer, policy)


@pytest.mark.parametrize("seed", range(12))
def test_accumulation_is_independent_of_how_the_events_are_cut(seed, monkeypatch):
    """The same events in one update, in many random pieces (empty ones included), and spread over several
    accumulators merged in random order: the same result, equal to the peer's."""
    rng = random.Random(1000 + seed)
    monkeypatch.setattr(ev, "MIN_PENDING_ROWS", rng.choice([0, 2, 1 << 16]))
    num_columns = rng.randint(2, 30)
    policy = rng.choice(POLICIES)
    n = rng.randint(30, 200)
    scores = random_scores(rng, n, num_columns, torch.float32, levels=rng.randint(1, 4), special=True)
    targets = torch.tensor(random_targets(rng, n, num_columns, 0))
    users = torch.tensor([rng.randrange(-3, 40) for _ in range(n)])
    first = torch.tensor([rng.random() < 0.3 for _ in range(n)])
    whole = RankingMetrics(ties=policy)
    whole.update(scores, targets, users, first)
    expected = whole.result()
    assert_matches_peer(expected, peer_result(list(zip(rows64(scores), targets.tolist(), users.tolist(),
                                                       first.tolist())),
                                              ev.DEFAULT_RECALL_KS, ev.DEFAULT_MRR_CUTOFFS, ev.DEFAULT_NDCG_KS,
                                              policy, 0, num_columns), policy)
    for _ in range(3):
        bounds = sorted(rng.choices(range(n + 1), k=rng.randint(1, 12))) + [n]
        pieces = [RankingMetrics(ties=policy) for _ in range(rng.randint(1, 4))]
        start = 0
        for stop in bounds:
            rng.choice(pieces).update(scores[start:stop], targets[start:stop], users[start:stop], first[start:stop])
            start = stop
        rng.shuffle(pieces)
        total = pieces[0]
        for other in pieces[1:]:
            total.merge(other)
        got = total.result()
        assert_matches_peer(got, peer_result(list(zip(rows64(scores), targets.tolist(), users.tolist(),
                                                      first.tolist())),
                                             ev.DEFAULT_RECALL_KS, ev.DEFAULT_MRR_CUTOFFS, ev.DEFAULT_NDCG_KS,
                                             policy, 0, num_columns), policy)
        assert got["counts"] == expected["counts"] and got["ties"] == expected["ties"]


@pytest.mark.parametrize("seed", range(6))
def test_one_event_per_update_for_users_spread_over_many_batches(seed, monkeypatch):
    """Hundreds of one-event (and empty) updates, each user's events scattered among them, with pending per-user
    chunks merged at random thresholds: per-user averages as the peer's."""
    rng = random.Random(2000 + seed)
    monkeypatch.setattr(ev, "MIN_PENDING_ROWS", rng.choice([1, 4, 1 << 16]))
    num_columns = 7
    metrics = RankingMetrics((3, 1), (None, 2), (4,), ties="average")
    events = []
    for _ in range(300):
        n = rng.choice([0, 1, 1, 1, 2])
        scores = random_scores(rng, n, num_columns, torch.float64, levels=2, special=False)
        targets = random_targets(rng, n, num_columns, 0)
        users = [rng.randrange(25) * 1_000_003 - 9 for _ in range(n)]
        first = [rng.random() < 0.2 for _ in range(n)]
        metrics.update(scores.numpy(), np.array(targets, dtype=np.int64).reshape(n),
                       np.array(users, dtype=np.int64).reshape(n), np.array(first, dtype=bool).reshape(n))
        events += list(zip(rows64(scores), targets, users, first))
    assert_matches_peer(metrics.result(), peer_result(events, (3, 1), (None, 2), (4,), "average", 0, num_columns),
                        "average")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(3))
def test_target_ranks_on_views_and_dtypes_match_peer(dtype, seed, monkeypatch):
    """target_ranks on contiguous scores, a transposed view, a column-strided slice and a broadcast (stride 0)
    view, each dtype, padding anywhere or none, +-inf included: (higher, tied) as the peer counts them, int64 on the
    scores' device."""
    rng = random.Random(3000 + seed)
    monkeypatch.setattr(ev, "ROW_BLOCK_ELEMENTS", rng.choice([1, 13, 1 << 24]))
    n, num_columns = rng.randint(1, 40), rng.randint(1, 25)
    base = random_scores(rng, num_columns * 2, n, dtype, levels=3, special=True)
    views = {
        "contiguous": base[:num_columns].t().contiguous(),
        "transposed": base[:num_columns].t(),
        "strided": base.t()[:, ::2],
        "broadcast": base[:1].t()[:, :1].expand(n, num_columns) if n else base[:num_columns].t(),
    }
    for label, scores in views.items():
        assert scores.shape == (n, num_columns), label
        padding = random_padding(rng, num_columns)
        targets = random_targets(rng, n, num_columns, padding)
        higher, tied = target_ranks(scores, torch.tensor(targets), padding_item=padding)
        assert higher.dtype == torch.int64 and tied.dtype == torch.int64 and higher.shape == (n,)
        rows = rows64(scores)
        expected = [peer_counts(rows[i], targets[i], padding) for i in range(n)]
        assert list(zip(higher.tolist(), tied.tolist())) == expected, (label, dtype)


def test_float64_scores_are_ranked_at_float64_precision():
    """Differences far below float32's resolution (and values beyond float32's range) still order the items."""
    rng = random.Random(11)
    n, num_columns = 50, 12
    rows = []
    for _ in range(n):
        base = rng.choice([1.0, 1e300, -1e-300, 3.0e38 * 10])
        rows.append([base * (1 + rng.randrange(-3, 4) * 2.0 ** -50) for _ in range(num_columns)])
    scores = torch.tensor(rows, dtype=torch.float64)
    targets = random_targets(rng, n, num_columns, 0)
    for policy in POLICIES:
        metrics = RankingMetrics((1, 2, 5), (None,), (3,), ties=policy)
        metrics.update(scores, torch.tensor(targets), torch.arange(n) % 4, torch.arange(n) % 3 == 0)
        events = list(zip(rows, targets, [i % 4 for i in range(n)], [i % 3 == 0 for i in range(n)]))
        assert_matches_peer(metrics.result(), peer_result(events, (1, 2, 5), (None,), (3,), policy, 0, num_columns),
                            policy)
    # In float32 they would all tie: the float64 ranks must differ from those.
    h64, _ = target_ranks(scores, torch.tensor(targets))
    h32, _ = target_ranks(scores.float(), torch.tensor(targets))
    assert not torch.equal(h64, h32)


@pytest.mark.parametrize("policy", POLICIES)
def test_catalogue_of_one_item(policy):
    """One catalogue item: every target has rank 1 (nothing higher, nothing tied), whatever the padding scores."""
    for padding, columns, target in ((0, 2, 1), (None, 1, 0), (1, 2, 0)):
        metrics = RankingMetrics((1, 5), (None, 3), (1, 10), ties=policy, padding_item=padding)
        item_column = torch.tensor([-math.inf, math.inf, 5.0, 0.0])
        pad_column = torch.tensor([math.inf, -math.inf, 5.0, math.nan])
        if padding is None:
            scores = item_column[:, None]
        elif padding == 0:
            scores = torch.stack([pad_column, item_column], 1)
        else:
            scores = torch.stack([item_column, pad_column], 1)
        n = scores.shape[0]
        metrics.update(scores, torch.full((n,), target), torch.tensor([4, 4, 9, 9]),
                       torch.tensor([True, False, True, False]))
        result = metrics.result()
        for group in GROUPS:
            for name in ("Recall@1", "Recall@5", "MRR", "MRR@3", "NDCG@1", "NDCG@10"):
                assert result["per_event"][group][name] == 1.0 and result["per_user"][group][name] == 1.0
        assert result["counts"]["catalogue_items"] == 1
        assert result["ties"]["events_with_tied_target"] == 0


def test_empty_updates_change_nothing_and_an_empty_accumulator_is_nan():
    rng = random.Random(5)
    empty = RankingMetrics(ties="pessimistic")
    for _ in range(5):
        empty.update(torch.empty(0, 6, dtype=rng.choice(DTYPES)), torch.empty(0, dtype=torch.int64),
                     torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.bool))
    result = empty.result()
    assert_matches_peer(result, peer_result([], ev.DEFAULT_RECALL_KS, ev.DEFAULT_MRR_CUTOFFS, ev.DEFAULT_NDCG_KS,
                                            "pessimistic", 0, 6), "pessimistic")
    fresh = RankingMetrics(ties="pessimistic").result()
    assert fresh["counts"]["catalogue_items"] is None and fresh["counts"]["events"] == 0
    # Empty chunks between real ones: the same as the real ones alone.
    scores = random_scores(rng, 9, 6, torch.float32, 2, True)
    args = (scores, torch.tensor(random_targets(rng, 9, 6, 0)), torch.arange(9) % 2, torch.arange(9) < 3)
    plain, padded = RankingMetrics(), RankingMetrics()
    plain.update(*args)
    for lo, hi in ((0, 0), (0, 4), (4, 4), (4, 4), (4, 9), (9, 9)):
        padded.update(*(a[lo:hi] for a in args))
    assert repr(plain.result()) == repr(padded.result())


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_a_catalogue_column_is_refused_and_changes_nothing(dtype):
    """NaN anywhere in a catalogue column (the target's or another's) is a ValueError naming the scores and the
    first bad event; a NaN in the padding column is ranked around; the accumulator is left as it was."""
    rng = random.Random(6)
    for trial in range(20):
        n, columns = rng.randint(1, 12), rng.randint(2, 9)
        padding = rng.choice([0, None, columns - 1])
        metrics = RankingMetrics(padding_item=padding)
        warm = random_scores(rng, 3, columns, dtype, 2, True)
        if padding is not None:
            warm[:, padding] = math.nan
        metrics.update(warm, torch.tensor(random_targets(rng, 3, columns, padding)), torch.arange(3),
                       torch.ones(3, dtype=torch.bool))
        before = repr(metrics.result())
        scores = random_scores(rng, n, columns, dtype, 2, True)
        bad_rows = sorted(rng.sample(range(n), rng.randint(1, n)))
        catalogue = [j for j in range(columns) if j != padding]
        for i in bad_rows:
            scores[i, rng.choice(catalogue)] = math.nan
        targets = torch.tensor(random_targets(rng, n, columns, padding))
        with pytest.raises(ValueError, match=r"scores.*NaN") as info:
            metrics.update(scores, targets, torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.bool))
        assert f"event {bad_rows[0]}" in str(info.value), (trial, str(info.value))
        assert repr(metrics.result()) == before


@pytest.mark.parametrize("seed", range(3))
def test_targets_out_of_the_catalogue_are_refused_clearly(seed):
    """A target id below 0, at or past the columns, or the padding column: ValueError naming the targets, the id
    and the event, from update and from target_ranks; nothing counted."""
    rng = random.Random(7000 + seed)
    for _ in range(25):
        n, columns = rng.randint(1, 10), rng.randint(1, 8)
        padding = random_padding(rng, columns)
        targets = random_targets(rng, n, columns, padding) if columns > (padding is not None) else [0] * n
        bad_values = [-1, -(2 ** 40), columns, columns + 5, 2 ** 40] + ([padding] if padding is not None else [])
        i = rng.randrange(n)
        targets[i] = rng.choice(bad_values)
        first_bad = min(j for j, t in enumerate(targets)
                        if t < 0 or t >= columns or t == padding)
        scores = random_scores(rng, n, columns, torch.float32, 2, False)
        metrics = RankingMetrics(padding_item=padding)
        with pytest.raises(ValueError, match=rf"targets.*item id {targets[first_bad]} at event {first_bad}\b"):
            metrics.update(scores, torch.tensor(targets), torch.zeros(n, dtype=torch.int64),
                           torch.zeros(n, dtype=torch.bool))
        assert metrics.result()["counts"]["events"] == 0 and metrics.num_columns is None
        with pytest.raises(ValueError, match=rf"item id {targets[first_bad]} at event {first_bad}\b"):
            target_ranks(scores, torch.tensor(targets), padding_item=padding)


@pytest.mark.parametrize("layout", ["fortran", "row_step", "column_step", "readonly"])
def test_numpy_inputs_equal_tensor_inputs(layout):
    """NumPy arrays (update takes them) in any positive-stride layout give the same result as the tensors."""
    rng = random.Random(8)
    n, columns = 40, 11
    scores = random_scores(rng, 2 * n, 2 * columns, torch.float64, 3, True).numpy()
    targets = np.array(random_targets(rng, 2 * n, columns, 0))
    users = np.array([rng.randrange(6) for _ in range(2 * n)])
    first = np.array([rng.random() < 0.3 for _ in range(2 * n)])
    if layout == "fortran":
        s, t, u, f = np.asfortranarray(scores[:n, :columns]), targets[:n], users[:n], first[:n]
    elif layout == "row_step":
        s, t, u, f = scores[::2, :columns], targets[::2], users[::2], first[::2]
    elif layout == "column_step":
        s, t, u, f = scores[:n, ::2][:, :columns], targets[:n], users[:n], first[:n]
    else:
        s, t, u, f = (a.copy() for a in (scores[:n, :columns], targets[:n], users[:n], first[:n]))
        for a in (s, t, u, f):
            a.setflags(write=False)
    from_numpy = RankingMetrics(ties="average")
    from_numpy.update(s, t, u, f)
    from_torch = RankingMetrics(ties="average")
    from_torch.update(torch.tensor(np.ascontiguousarray(s)), torch.tensor(t), torch.tensor(u), torch.tensor(f))
    assert repr(from_numpy.result()) == repr(from_torch.result())
    events = list(zip(np.asarray(s, dtype=np.float64).tolist(), t.tolist(), u.tolist(), f.tolist()))
    assert_matches_peer(from_numpy.result(), peer_result(events, ev.DEFAULT_RECALL_KS, ev.DEFAULT_MRR_CUTOFFS,
                                                         ev.DEFAULT_NDCG_KS, "average", 0, columns), "average")


# update() takes NumPy arrays, a reversed view (negative strides, which torch.from_numpy refuses) included.
def test_numpy_views_with_negative_strides_are_taken():
    rng = random.Random(9)
    scores = random_scores(rng, 8, 6, torch.float32, 3, False).numpy()
    targets = np.array(random_targets(rng, 8, 6, 0))
    users, first = np.arange(8) % 3, np.arange(8) % 2 == 0
    metrics = RankingMetrics()
    metrics.update(scores[::-1], targets[::-1], users[::-1], first[::-1])
    events = list(zip(scores[::-1].astype(np.float64).tolist(), targets[::-1].tolist(), users[::-1].tolist(),
                      first[::-1].tolist()))
    assert_matches_peer(metrics.result(), peer_result(events, ev.DEFAULT_RECALL_KS, ev.DEFAULT_MRR_CUTOFFS,
                                                      ev.DEFAULT_NDCG_KS, "optimistic", 0, 6), "optimistic")


def test_unsorted_cutoffs_keep_their_order_and_labels():
    rng = random.Random(10)
    recall, mrr, ndcg = (20, 1, 7, 3), (50, None, 2), (10, 1)
    metrics = RankingMetrics(recall, mrr, ndcg, ties="pessimistic")
    assert metrics.metric_names == peer_names(recall, mrr, ndcg)
    scores = random_scores(rng, 60, 30, torch.float32, 4, False)
    targets = random_targets(rng, 60, 30, 0)
    users = [rng.randrange(5) for _ in range(60)]
    first = [rng.random() < 0.3 for _ in range(60)]
    metrics.update(scores, torch.tensor(targets), torch.tensor(users), torch.tensor(first))
    result = metrics.result()
    assert list(result["per_event"]["all"]) == peer_names(recall, mrr, ndcg) + ["events"]
    assert list(result["per_user"]["rest"]) == peer_names(recall, mrr, ndcg) + ["users"]
    assert_matches_peer(result, peer_result(list(zip(rows64(scores), targets, users, first)), recall, mrr, ndcg,
                                            "pessimistic", 0, 30), "pessimistic")
    assert "strictly higher" in RankingMetrics(ties="optimistic").result()["tie_policy"]
    assert result["catalogue"] == "all score columns except the padding item 0"
    assert RankingMetrics(padding_item=None).result()["catalogue"] == "all score columns"


# A cut-off too large for a float is accepted by the constructor; update() then crashes.
# A cutoff beyond any float (10**400) cuts nothing; it once raised OverflowError in update().
def test_a_huge_cutoff_counts_every_event():
    metrics = RankingMetrics(recall_ks=(10 ** 400,), mrr_cutoffs=(10 ** 400,), ndcg_ks=(10 ** 400,))
    metrics.update(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.tensor([1]), torch.tensor([0]), torch.tensor([True]))
    values = metrics.result()["per_event"]["all"]
    assert values[f"Recall@{10 ** 400}"] == 1.0
    assert values[f"MRR@{10 ** 400}"] == pytest.approx(1 / 3)
    assert values[f"NDCG@{10 ** 400}"] == pytest.approx(1 / math.log2(4))


def test_bad_arguments_give_clear_errors_naming_them():
    good = dict(scores=torch.rand(3, 5), targets=torch.tensor([1, 2, 3]), users=torch.tensor([0, 1, 0]),
                first_in_session=torch.tensor([True, False, False]))
    cases = [
        (dict(scores=torch.rand(3, 5)[None]), ValueError, "scores"),
        (dict(scores=torch.tensor(1.0)), ValueError, "scores"),
        (dict(scores=torch.ones(3, 5, dtype=torch.int32)), TypeError, "scores"),
        (dict(scores=torch.ones(3, 5, dtype=torch.complex64)), TypeError, "scores"),
        (dict(scores=[[0.0] * 5] * 3), TypeError, "scores"),
        (dict(targets=torch.tensor([1.0, 2.0, 3.0])), TypeError, "targets"),
        (dict(targets=torch.tensor([True, False, True])), TypeError, "targets"),
        (dict(targets=torch.tensor([[1, 2, 3]])), ValueError, "targets"),
        (dict(targets=[1, 2, 3]), TypeError, "targets"),
        (dict(users=torch.tensor([0.0, 1.0, 0.0])), TypeError, "users"),
        (dict(users=torch.tensor([0, 1])), ValueError, "users"),
        (dict(users=(0, 1, 0)), TypeError, "users"),
        (dict(first_in_session=torch.tensor([1, 0, 0])), TypeError, "first_in_session"),
        (dict(first_in_session=torch.tensor([True, False])), ValueError, "first_in_session"),
        (dict(first_in_session=np.array([1, 0, 0])), TypeError, "first_in_session"),
    ]
    for override, error, name in cases:
        metrics = RankingMetrics()
        with pytest.raises(error, match=name):
            metrics.update(**(good | override))
        assert metrics.num_columns is None and metrics.result()["counts"]["events"] == 0, override
    constructor_cases = [
        (dict(recall_ks=(0,)), ValueError, "recall_ks"), (dict(recall_ks=(-3,)), ValueError, "recall_ks"),
        (dict(recall_ks=(2.0,)), ValueError, "recall_ks"), (dict(recall_ks=(True,)), ValueError, "recall_ks"),
        (dict(recall_ks=(None,)), ValueError, "recall_ks"), (dict(recall_ks=(5, 5)), ValueError, "recall_ks"),
        (dict(recall_ks=10), TypeError, "recall_ks"), (dict(mrr_cutoffs=(0,)), ValueError, "mrr_cutoffs"),
        (dict(mrr_cutoffs=(None, None)), ValueError, "mrr_cutoffs"), (dict(ndcg_ks="10"), TypeError, "ndcg_ks"),
        (dict(ndcg_ks=(1, np.int64(1))), ValueError, "ndcg_ks"), (dict(ties="random"), ValueError, "ties"),
        (dict(ties=None), ValueError, "ties"), (dict(padding_item=-1), ValueError, "padding_item"),
        (dict(padding_item=1.0), ValueError, "padding_item"), (dict(padding_item=False), ValueError, "padding_item"),
    ]
    for kwargs, error, name in constructor_cases:
        with pytest.raises(error, match=name):
            RankingMetrics(**kwargs)
    with pytest.raises(ValueError, match="padding_item"):
        RankingMetrics(padding_item=5).update(**good)
    with pytest.raises(ValueError, match="padding_item"):
        target_ranks(good["scores"], good["targets"], padding_item=5)
    with pytest.raises(TypeError, match="scores"):
        target_ranks(good["scores"].numpy(), good["targets"])
    with pytest.raises(TypeError, match="other"):
        RankingMetrics().merge({"per_event": {}})
    with pytest.raises(TypeError, match="batch"):
        batch_targets({"items": torch.zeros(1, 1, 2)})


# Users are "any integers", but they are cast to int64 with wrap-around.
# A uint64 user id above int64's range was wrapped onto -1 and merged with that user; it is refused now, by name,
# and the accumulator is left as it was. uint64 ids in range are taken.
def test_user_ids_beyond_int64_are_refused_by_name():
    metrics = RankingMetrics()
    scores = torch.tensor([[0.0, 1.0, 2.0], [0.0, 2.0, 1.0]])
    metrics.update(scores[1:], torch.tensor([1]), np.array([-1], dtype=np.int64), torch.tensor([True]))
    with pytest.raises(ValueError, match="users"):
        metrics.update(scores[:1], torch.tensor([1]), np.array([2 ** 64 - 1], dtype=np.uint64), torch.tensor([True]))
    assert metrics.result()["counts"]["users"] == 1
    metrics.update(scores[:1], torch.tensor([1]), np.array([2 ** 63 - 1], dtype=np.uint64), torch.tensor([True]))
    result = metrics.result()
    assert result["counts"]["users"] == 2
    assert result["per_user"]["all"]["users"] == 2


# ties as a list once raised "unhashable type: 'list'", without naming ties.
def test_ties_of_the_wrong_type_is_an_error_naming_it():
    with pytest.raises((TypeError, ValueError), match="ties"):
        RankingMetrics(ties=["average"])


# A NumPy object array once got torch.from_numpy's TypeError, which does not name the argument.
def test_a_numpy_object_array_is_an_error_naming_the_argument():
    with pytest.raises(TypeError, match="scores"):
        RankingMetrics().update(np.zeros((2, 4), dtype=object), np.array([1, 2]), np.array([0, 0]),
                                np.array([True, False]))


# float8 scores pass the "floating point" check; gather has no float8 kernel, so they are ranked in float32
# (exactly). They once raised NotImplementedError from inside gather.
def test_float8_scores_are_ranked_in_float32():
    scores = torch.tensor([[0.0, 1.0, 2.0, 2.0]]).to(torch.float8_e4m3fn)
    metrics = RankingMetrics()
    metrics.update(scores, torch.tensor([2]), torch.tensor([0]), torch.tensor([True]))
    assert metrics.result()["per_event"]["all"]["MRR"] == 1.0
    higher, tied = target_ranks(scores, torch.tensor([3]))
    assert (higher.tolist(), tied.tolist()) == ([0], [1])


# ------------------------------------------------------------------------------------------------------------ batches

def random_session_batch(rng):
    steps, lanes, time = rng.randint(1, 4), rng.randint(1, 5), rng.randint(1, 7)
    lengths = torch.tensor([[rng.randint(0, time - 1) for _ in range(lanes)] for _ in range(steps)], dtype=torch.int64)
    items = torch.tensor([[[rng.randint(0, 50) for _ in range(time)] for _ in range(lanes)] for _ in range(steps)],
                         dtype=torch.int64)
    user = torch.where(lengths > 0, torch.tensor([[rng.randint(0, 9) for _ in range(lanes)]
                                                  for _ in range(steps)]), torch.full((steps, lanes), -1))
    valid = lengths > 0
    return SessionBatch(items, lengths, torch.where(valid.any(1), lengths.max(1).values + 1, 0), valid,
                        torch.ones(steps, lanes, dtype=torch.bool), user, torch.arange(steps * lanes).view(steps, lanes),
                        torch.zeros(lanes, dtype=torch.bool), 0, 0)


@pytest.mark.parametrize("seed", range(10))
def test_batch_targets_match_peer(seed):
    """Position t of a session is an event iff t < its length; it predicts items[..., t + 1]; the first event of the
    session is position 0; fields in row-major order of the mask; scores[mask] picks the matching rows."""
    rng = random.Random(4000 + seed)
    for _ in range(5):
        batch = random_session_batch(rng)
        steps, lanes, time = batch.items.shape
        mask, targets, users, first = [], [], [], []
        for s in range(steps):
            for b in range(lanes):
                for t in range(time - 1):
                    event = t < int(batch.lengths[s, b])
                    mask.append(event)
                    if event:
                        targets.append(int(batch.items[s, b, t + 1]))
                        users.append(int(batch.user[s, b]))
                        first.append(t == 0)
        got = batch_targets(batch)
        assert got["mask"].dtype == torch.bool and got["mask"].shape == (steps, lanes, time - 1)
        assert got["mask"].flatten().tolist() == mask
        assert got["targets"].dtype == torch.int64 and got["targets"].tolist() == targets
        assert got["users"].dtype == torch.int64 and got["users"].tolist() == users
        assert got["first_in_session"].dtype == torch.bool and got["first_in_session"].tolist() == first
        # scores[mask] is the (events, items) matrix for update: rows tagged by their position.
        tag = torch.arange(steps * lanes * (time - 1), dtype=torch.float64).view(steps, lanes, time - 1, 1)
        picked = tag.expand(-1, -1, -1, 3)[got["mask"]]
        assert picked.shape == (len(targets), 3)
        assert picked[:, 0].long().tolist() == [i for i, m in enumerate(mask) if m]


# ------------------------------------------------------------------------------------------------------------ evaluate()

class RecordingMetrics(RankingMetrics):
    """A RankingMetrics that keeps a copy of every chunk it is fed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def update(self, scores, targets, users, first_in_session):
        self.calls.append((torch.as_tensor(scores).detach().cpu().clone(), torch.as_tensor(targets).cpu().clone(),
                           torch.as_tensor(users).cpu().clone(), torch.as_tensor(first_in_session).cpu().clone()))
        super().update(scores, targets, users, first_in_session)


def _random_log(seed, users=7, items=9, max_events=12):
    rng = random.Random(seed)
    user, item, timestamp = [], [], []
    for u in range(users):
        t = rng.uniform(0, 50)
        for _ in range(rng.randint(1, max_events)):
            user.append(500 + 3 * u)
            item.append(rng.randint(1, items) * 7)
            timestamp.append(t)
            t += rng.choice([1.0, 3.0, 90.0, 400.0])
    return np.array(user), np.array(item), np.array(timestamp)


@pytest.fixture(scope="module", params=["cold", "warm"])
def small_cache(request, tmp_path_factory):
    from hiertcn_fast.data import ArraySource, PreprocessParams, preprocess

    user, item, timestamp = _random_log(17 if request.param == "cold" else 18)
    params = PreprocessParams(min_item_count=1, min_user_count=1, max_user_count=None, session_gap=50.0,
                              max_session_length=None, split=request.param, split_fractions=(0.4, 0.2, 0.4),
                              num_partitions=2, seed=3)
    return preprocess(ArraySource(user, item, timestamp, name=f"fuzz_eval_{request.param}"),
                      tmp_path_factory.mktemp("fuzz_eval"), params)


def _split_events_by_user(cache, split):
    """user -> [(target, first_in_session)] of the split, in time order, from the cache's arrays by loops."""
    item = np.asarray(cache.item).tolist()
    offsets = np.asarray(cache.session_offsets).tolist()
    session_split = np.asarray(cache.session_split).tolist()
    user_offsets = np.asarray(cache.user_session_offsets).tolist()
    code = cache.split_code(split)
    out = {}
    for u in range(len(user_offsets) - 1):
        for s in range(user_offsets[u], user_offsets[u + 1]):
            if session_split[s] != code:
                continue
            for e in range(offsets[s], offsets[s + 1]):
                out.setdefault(u, []).append((item[e], e == offsets[s]))
    return out


@pytest.mark.parametrize("name", ["session_gru", "history_tcn"])
@pytest.mark.parametrize("policy", ["pessimistic", "average"])
def test_evaluate_feeds_every_split_event_once_and_reports_the_accumulators_metrics(small_cache, name, policy):
    """train.evaluate with a caller's accumulator (its cut-offs and tie policy, a chunk already in it): every event of
    the split reaches update() once, with its user and first-of-session flag, scores over the whole catalogue
    (padding column 0 included); the returned result is the peer's over everything the accumulator was fed."""
    from hiertcn_fast.train import TrainConfig, build_model, evaluate

    cache = small_cache
    sizes = {"session_gru": dict(embedding_dim=8, hidden=8),
             "history_tcn": dict(embedding_dim=8, channels=(8, 8), kernel_size=3)}[name]
    model = build_model(name, cache.num_items, seed=2, **sizes)
    recall, mrr, ndcg = (3, 1, 100), (None, 4), (2, 5)
    metrics = RecordingMetrics(recall, mrr, ndcg, ties=policy)
    columns = cache.num_items + 1
    prior = (torch.tensor([[0.0] + [1.0] * (columns - 1)]), torch.tensor([1]), torch.tensor([-5]),
             torch.tensor([True]))
    metrics.update(*prior)
    result = evaluate(model, cache, "test", TrainConfig(lanes=3, sessions_per_batch=2, num_producers=0),
                      metrics=metrics)
    calls = metrics.calls
    assert len(calls) >= 2
    seen = collections.defaultdict(list)
    events = []
    for scores, targets, users, first in calls[1:]:
        assert scores.shape == (targets.shape[0], columns) and scores.dtype == torch.float32
        for row, target, user, f in zip(rows64(scores), targets.tolist(), users.tolist(), first.tolist()):
            seen[user].append((target, f))
            events.append((row, target, user, f))
    assert dict(seen) == _split_events_by_user(cache, "test")
    events = [(rows64(prior[0])[0], 1, -5, True)] + events
    peer = peer_result(events, recall, mrr, ndcg, policy, 0, columns)
    assert_matches_peer({k: v for k, v in result.items() if k != "session_truncation"}, peer, policy)
    assert result["session_truncation"]["events_not_scored"] == 0
