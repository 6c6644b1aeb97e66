"""The single-level history TCN and its whole-user batches."""

import pytest
import torch

from hiertcn_fast.models import HistoryTCN, UserHistoryBatcher, iter_split_events
from model_helpers import synthetic_cache, one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("history"))


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("by_length", [True, False])
def test_history_batches_hold_the_stream_events(cache, split, by_length):
    """Whole-user batches deliver exactly the split's prediction events (the rules' and lane batches')."""
    batcher = UserHistoryBatcher(cache, split, users_per_batch=7, shuffle=True, seed=3, by_length=by_length)
    from_batches = []
    for batch in batcher:
        fields = batch.targets()
        from_batches += zip(fields["users"].tolist(), fields["targets"].tolist(), fields["first_in_session"].tolist())
        assert batch.items[:, 0].eq(0).all()
    from_stream = []
    for events in iter_split_events(cache, split, chunk_size=500):
        from_stream += zip(events.user.tolist(), events.target.tolist(), events.first_in_session.tolist())
    assert len(from_stream) > 100 and sorted(from_batches) == sorted(from_stream)
    assert batcher.epoch == 1 and batcher.num_events == len(from_stream)


def test_history_batcher_resume(cache):
    batcher = UserHistoryBatcher(cache, "train", users_per_batch=5, shuffle=True, seed=1)
    iterator = iter(batcher)
    for _ in range(3):
        next(iterator)
    saved = batcher.state_dict()
    rest = [b.items for b in iterator]
    again = UserHistoryBatcher(cache, "train", users_per_batch=5, shuffle=True, seed=1)
    again.load_state_dict(saved)
    assert all(torch.equal(a, b.items) for a, b in zip(rest, again, strict=True))
    with pytest.raises(ValueError, match="different batcher"):
        UserHistoryBatcher(cache, "train", users_per_batch=6).load_state_dict(saved)


def test_history_tcn_is_causal(cache):
    torch.manual_seed(0)
    model = HistoryTCN(cache.num_items, embedding_dim=8, channels=(8, 8), kernel_size=3).double().eval()
    batcher = UserHistoryBatcher(cache, "test", users_per_batch=4)
    batch = max((batcher.batch(i) for i in range(batcher.num_batches())), key=lambda b: int(b.lengths.max()))  # longest
    assert int(batch.lengths[1]) > 8
    with torch.no_grad():
        before, state = model(batch)
        changed = batch.items.clone()
        changed[1, 6] = 1 if changed[1, 6] != 1 else 2  # user 1's 6th event
        after, _ = model(type(batch)(changed, batch.lengths, batch.first_in_session, batch.user, 0, 0))
    assert state is None
    mask = batch.targets()["mask"]
    row, position = torch.nonzero(mask, as_tuple=True)
    may_change = (row == 1) & (position >= 6)
    torch.testing.assert_close(after[~may_change], before[~may_change])
    assert not torch.allclose(after[may_change], before[may_change])
    assert before.shape == (int(mask.sum()), 8)
