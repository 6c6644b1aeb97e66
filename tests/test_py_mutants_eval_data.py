"""Tests that kill mutants of evaluate.py, models/rules.py and data/batcher.py which the rest of the suite let
survive (a mutation-testing audit). Every expected value is hand-computed or recomputed with plain numpy/Python,
never taken from the code under test."""

import numpy as np
import pytest
import torch

from hiertcn_fast.data import ArraySource, LaneStateCache, PreprocessParams, SessionBatcher, preprocess
from hiertcn_fast.evaluate import RankingMetrics
from hiertcn_fast.models import RepeatPrevious
from test_models_rules import LOG, PARAMS, _one_chunk

# Raw items 10, 20, 30, 40 become dense ids 1, 2, 3, 4 (as in test_models_rules.py). Sessions split at gaps
# >= 50 s; warm split: sessions starting after 90% of the time span (0..9710) are the test split.
# Training counts: item 2 three times, items 1 and 3 twice, item 4 never, so popularity is 2, 1, 3, 4 and item 4,
# the least popular item, is repeated in user 3's last test session.
REPEAT_LOG = LOG + [(3, 40, 9610)]  # test_models_rules' log, and user 3's second test session repeats 40


@pytest.fixture(scope="module")
def repeat_cache(tmp_path_factory):
    user, item, timestamp = (np.array(column) for column in zip(*REPEAT_LOG))
    return preprocess(ArraySource(user, item, timestamp, name="repeat"), tmp_path_factory.mktemp("repeat"), PARAMS)


def test_repeat_previous_puts_an_unpopular_previous_item_first(repeat_cache):
    """Kills R6 (rules.py: RepeatPrevious adds 0.5 instead of 1.0) and any signal that does not dominate the
    popularity key: the previous item must rank first even when it is the least popular item of the catalogue.

    Hand computation. Popularity keys (4 items): item 2 -> 4/5, item 1 -> 3/5, item 3 -> 2/5, item 4 -> 1/5.
    Test events (user scope), (previous, target): user 2: (3, 3), (3, 1); user 3: (0, 1), (1, 2), (2, 4), (4, 4).
    Orders: prev 3 -> 3,2,1,4; prev 0 -> 2,1,3,4; prev 1 -> 1,2,3,4; prev 2 -> 2,1,3,4; prev 4 -> 4,2,1,3.
    Target ranks: 1, 3, 2, 2, 4, 1. (With +0.5, item 4 scores 0.7 < 0.8 of item 2: the last rank becomes 2.)
    """
    events = _one_chunk(repeat_cache)
    assert events.target.tolist() == [3, 1, 1, 2, 4, 4]  # the hand computation's events
    rule = RepeatPrevious().fit(repeat_cache)
    scores = rule.score(events)
    target_scores = scores.gather(1, torch.from_numpy(events.target)[:, None])
    ranks = (1 + (scores[:, 1:] > target_scores).sum(1)).tolist()
    assert ranks == [1, 3, 2, 2, 4, 1]
    # Top item of every row with a previous item is that previous item (hand-listed previous items).
    top = (scores[:, 1:].argmax(1) + 1).tolist()
    for row, previous in enumerate([3, 3, 0, 1, 2, 4]):
        if previous:
            assert top[row] == previous, row


def _small_cache(tmp_path):
    rng = np.random.default_rng(11)
    n = 600
    user = rng.integers(0, 30, size=n)
    item = rng.integers(0, 25, size=n)
    timestamp = np.sort(rng.integers(0, 300, size=n)) * 600.0
    params = PreprocessParams(min_item_count=1, min_user_count=1, max_user_count=None, num_partitions=2,
                              split="cold", seed=0)
    return preprocess(ArraySource(user, item, timestamp), tmp_path, params)


def test_state_dict_is_a_snapshot_not_a_view_of_the_live_state(tmp_path):
    """Kills B17 (batcher.py: state_dict without .clone(); on the CPU detach().cpu() is the live buffer, so a
    checkpoint held in memory silently followed later end_state calls and a resume restored the wrong state)."""
    batcher = SessionBatcher(_small_cache(tmp_path), "train", lanes=3, sessions_per_batch=2, state_shape=(2, 4))
    batches = iter(batcher)
    first = next(batches)
    batcher.begin_state(first)
    batcher.end_state(first, torch.full((2, 3, 4), 1.5))
    saved = batcher.state_dict()
    assert saved["next_index"] == 1
    second = next(batches)
    batcher.begin_state(second)
    batcher.end_state(second, torch.full((2, 3, 4), 7.0))
    # The snapshot still holds what the state was when it was taken: 1.5 everywhere.
    assert torch.equal(saved["state"], torch.full((2, 3, 4), 1.5))
    batcher.load_state_dict(saved)
    assert torch.equal(batcher.state_cache.state, torch.full((2, 3, 4), 1.5))
    assert batcher.next_index == 1


# ---- evaluate.py: catalogue width bookkeeping and cutoff validation ----------------------------------------------

def _chunk(scores, targets, users, first):
    return (torch.tensor(scores, dtype=torch.float32), torch.tensor(targets, dtype=torch.int64),
            torch.tensor(users, dtype=torch.int64), torch.tensor(first, dtype=torch.bool))


def test_catalogue_items_counts_every_column_without_a_padding_item():
    """Kills E23 (evaluate.py: catalogue_items = num_columns - 1 even when padding_item is None). 5 score
    columns: 4 catalogue items with the padding column 0, all 5 without one."""
    chunk = _chunk([[0.0, 0.1, 0.2, 0.3, 0.4]], [2], [0], [True])
    with_padding = RankingMetrics()
    with_padding.update(*chunk)
    assert with_padding.result()["counts"]["catalogue_items"] == 4
    every_column = RankingMetrics(padding_item=None)
    every_column.update(*chunk)
    assert every_column.result()["counts"]["catalogue_items"] == 5
    # Target 2 (score 0.2) is beaten by items 3 and 4 either way (column 0 scores lowest): rank 3.
    assert every_column.result()["per_event"]["all"]["MRR"] == pytest.approx(1 / 3)


def test_an_empty_chunk_fixes_the_catalogue_width():
    """Kills E24 (evaluate.py: an update with no event returns before recording the number of score columns):
    an empty (0, 5) chunk that passed the checks fixes the width, so a later 6-column chunk is refused and the
    result reports 4 catalogue items."""
    metrics = RankingMetrics()
    metrics.update(torch.empty(0, 5), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64),
                   torch.empty(0, dtype=torch.bool))
    assert metrics.result()["counts"]["catalogue_items"] == 4
    assert metrics.result()["counts"]["events"] == 0
    with pytest.raises(ValueError, match="expected 5 item columns"):
        metrics.update(*_chunk([[0.0] * 6], [1], [0], [True]))


def test_merging_into_a_fresh_accumulator_keeps_the_width():
    """Kills E25 (evaluate.py: merge does not take the other accumulator's number of columns when this one has
    none yet): the merged result must report the catalogue size and refuse chunks of another width."""
    filled = RankingMetrics()
    filled.update(*_chunk([[0.0, 3.0, 2.0, 1.0], [0.0, 3.0, 2.0, 1.0]], [1, 3], [4, 4], [True, False]))
    fresh = RankingMetrics()
    fresh.merge(filled)
    result = fresh.result()
    assert result["counts"]["catalogue_items"] == 3 and result["counts"]["events"] == 2
    # Ranks 1 and 3 (hand-computed), one user.
    assert result["per_event"]["all"]["MRR"] == pytest.approx((1 + 1 / 3) / 2)
    assert result["per_user"]["all"]["MRR"] == pytest.approx((1 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="expected 4 item columns"):
        fresh.update(*_chunk([[0.0, 1.0, 2.0]], [1], [0], [True]))


@pytest.mark.parametrize("name,values", [("recall_ks", (5, 10, 5)), ("mrr_cutoffs", (None, 20, None)),
                                         ("ndcg_ks", (10, 10))])
def test_repeated_cutoffs_are_refused(name, values):
    """Kills E27 (evaluate.py: the repeated-cutoff check removed): a repeated cut-off would give two metrics one
    name, and the result dict would silently keep one of them."""
    with pytest.raises(ValueError, match=f"{name} must not repeat a value"):
        RankingMetrics(**{name: values})


# ---- batcher.py: the state cache -----------------------------------------------------------------------------------

def test_reset_lanes_zeroes_the_cache_in_place():
    """Kills B27 (batcher.py: reset_lanes returns state * mask without writing it back): lanes that start a new
    user must be zeroed in the cache itself, as begin_state documents ("in the cache too"), so that a state_dict
    taken after begin_state does not carry the previous user's state."""
    cache = LaneStateCache(layers=2, lanes=4, hidden=3)
    values = torch.arange(1.0, 25.0).view(2, 4, 3)
    cache.state.copy_(values)
    returned = cache.reset_lanes(torch.tensor([True, False, True, False]))
    expected = values.clone()
    expected[:, 1] = 0.0
    expected[:, 3] = 0.0
    assert torch.equal(cache.state, expected)
    assert torch.equal(returned, expected)


def test_begin_state_zeroes_new_users_in_the_cache_too(tmp_path):
    """Kills B27 through the batcher: after begin_state, the cached state is zero exactly on the lanes whose
    continues flag is False (recomputed here from the plan's own user/keep of the previous batch's last step)."""
    batcher = SessionBatcher(_small_cache(tmp_path), "train", lanes=3, sessions_per_batch=1, state_shape=(1, 2))
    checked = 0
    for index in range(1, batcher.num_batches()):
        previous, batch = batcher.batch(index - 1), batcher.batch(index)
        # Continues iff the previous step's session in that lane was not its user's last (keep) and the lane
        # holds the same user now.
        continues = [bool(previous.keep[-1, lane]) and int(previous.user[-1, lane]) == int(batch.user[0, lane])
                     for lane in range(3)]
        batcher.state_cache.state.fill_(5.0)
        state = batcher.begin_state(batch)
        want = torch.tensor([5.0 if c else 0.0 for c in continues]).view(1, 3, 1).expand(1, 3, 2)
        assert torch.equal(state, want), index
        assert torch.equal(batcher.state_cache.state, want), index
        checked += not all(continues)
    assert checked > 0
