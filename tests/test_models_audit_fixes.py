"""Defects of the models, their batchers and the sampled loss found by an audit (session 30); each test fails on the
code before its fix."""

import numpy as np
import pytest
import torch

from hiertcn_fast.data import ArraySource, PreprocessParams, preprocess
from hiertcn_fast.models import HRNN, HierGRU, HistoryBatch, HistoryTCN, UserHistoryBatcher
from hiertcn_fast.train import sampled_softmax_loss
from model_helpers import lane_batch, one_thread  # noqa: F401 (autouse fixture)

# Three users, sessions split by a 50 s gap; a warm split puts each user's last sessions in valid and test.
LOG = [(1, 10, 0), (1, 20, 10), (1, 30, 20), (1, 40, 500), (1, 10, 510), (1, 20, 1500), (2, 10, 100), (2, 20, 110),
       (2, 20, 200), (2, 30, 210), (2, 30, 9700), (2, 10, 9710), (3, 10, 9500), (3, 20, 9510), (3, 40, 9600)]


def _cache(tmp_path, split_fractions=(0.8, 0.1, 0.1)):
    user, item, time = (np.array(column) for column in zip(*LOG))
    params = PreprocessParams(min_item_count=1, min_user_count=1, max_user_count=None, session_gap=50.0,
                              max_session_length=None, split="warm", split_fractions=split_fractions, num_partitions=1)
    return preprocess(ArraySource(user, item, time, name="audit"), tmp_path, params)


def test_context_splits_given_as_a_generator_are_kept(tmp_path):
    """The check `split in tuple(context_splits)` used a generator up, and an empty tuple was kept: the test events
    were predicted without their history, without a word."""
    cache = _cache(tmp_path, (0.4, 0.3, 0.3))
    as_tuple = UserHistoryBatcher(cache, "test", context_splits=("train", "valid"))
    as_generator = UserHistoryBatcher(cache, "test", context_splits=(s for s in ("train", "valid")))
    assert as_generator.context_splits == ("train", "valid")
    assert sum(as_tuple._context) > 0
    assert as_generator._context == as_tuple._context
    assert torch.equal(as_generator.batch(0).context_lengths, as_tuple.batch(0).context_lengths)


def test_an_empty_split_moves_one_epoch_per_pass_as_the_lane_batcher(tmp_path):
    """An epoch without batches was left at the start of a pass and again at its end: two epochs per pass."""
    cache = _cache(tmp_path, (0.99, 0.005, 0.005))
    batcher = UserHistoryBatcher(cache, "valid", users_per_batch=2)
    assert batcher.num_batches() == 0  # (the fixture: no session in valid)
    epochs = []
    for _ in range(3):
        assert list(batcher) == []
        epochs.append((batcher.epoch, batcher.next_index))
    assert epochs == [(1, 0), (2, 0), (3, 0)]


def test_a_finished_epoch_is_left_at_the_start_of_the_next_pass(tmp_path):
    cache = _cache(tmp_path)
    batcher = UserHistoryBatcher(cache, "train", users_per_batch=1)
    batches = batcher.num_batches()
    assert batches >= 2
    state = batcher.state_dict()
    batcher.load_state_dict({**state, "epoch": 0, "next_index": batches})  # saved at the end of epoch 0
    assert [b.epoch for b in batcher] == [1] * batches
    assert (batcher.epoch, batcher.next_index) == (2, 0)


def _history_batch(lengths, context_lengths=None, time=5):
    users = len(lengths)
    items = torch.randint(1, 9, (users, time))
    items[:, 0] = 0
    return HistoryBatch(items, torch.tensor(lengths), torch.zeros(users, time - 1, dtype=torch.bool),
                        torch.arange(users), 0, 0, None if context_lengths is None else torch.tensor(context_lengths))


@pytest.mark.parametrize("lengths,context,message", [
    ([2, -1], None, r"batch.lengths must lie in \[0, 4\]"),         # the user's events vanished
    ([2, 6], None, r"batch.lengths must lie in \[0, 4\]"),          # an IndexError of a mask's shape
    ([[2, 3]], None, r"batch.lengths must be \(users,\) = \(1,\)"),
    ([2, 3], [3, 0], r"batch.context_lengths must lie in \[0, lengths\]"),
    ([2, 3], [0, -1], r"batch.context_lengths must lie in \[0, lengths\]"),
])
def test_history_tcn_checks_the_batch_lengths(lengths, context, message):
    model = HistoryTCN(8, embedding_dim=4, channels=(4,), kernel_size=2).eval()
    batch = _history_batch(lengths, context)
    if torch.tensor(lengths).dim() == 2:
        batch.items = batch.items[:1]
    with pytest.raises(ValueError, match=message):
        model(batch)
    features, _ = model(_history_batch([2, 4], [1, 0]))
    assert features.shape == (5, 4)


def test_sampled_softmax_names_features_of_another_dtype():
    """The product's "expected m1 and m2 to have the same dtype" named no argument."""
    output = torch.nn.Linear(4, 6)
    targets, sampled = torch.tensor([1, 2]), torch.tensor([3, 4, 5])
    log_q = torch.zeros(6)
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but features has torch.float64"):
        sampled_softmax_loss(torch.randn(2, 4, dtype=torch.float64), targets, output, sampled, log_q)
    assert torch.isfinite(sampled_softmax_loss(torch.randn(2, 4), targets, output, sampled, log_q))


@pytest.mark.parametrize("model_class", [HRNN, HierGRU])
def test_a_state_of_another_dtype_is_refused_by_name(model_class):
    """HRNN checked the state's shape only: a float64 or int64 state failed inside a product, naming no argument."""
    model = model_class(9, embedding_dim=4).eval()
    batch = lane_batch([[[1, 2, 3], [4, 5]], [[6], [7, 8, 9]]])
    layers, hidden = model.state_shape
    for state in (torch.zeros(layers, 2, hidden, dtype=torch.float64), torch.zeros(layers, 2, hidden, dtype=torch.int64)):
        with pytest.raises(TypeError, match=r"state has dtype torch\.(float64|int64) on cpu but the model's"):
            model(batch, state)
    with pytest.raises(TypeError, match="state must be a torch.Tensor or None, got list"):
        model(batch, [[0.0]])
    with torch.no_grad():
        features, new_state = model(batch, torch.zeros(layers, 2, hidden))
    assert new_state.shape == (layers, 2, hidden)
