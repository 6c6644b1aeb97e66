"""StreamingRecommender: O(1) per-event updates that reproduce the full forward pass."""

import pytest
import torch

from hiertcn_fast.models import HierTCN, SessionGRU
from hiertcn_fast.serve import StreamingRecommender
from model_helpers import lane_batch, one_thread  # noqa: F401 (autouse fixture)

NUM_ITEMS = 23
GAP = 1800.0


def small_hiertcn(**kwargs):
    torch.manual_seed(5)
    sizes = dict(embedding_dim=12, state_layers=2, state_hidden=7, tcn_channels=(9, 11), kernel_size=3,
                 dilations=(1, 2), max_session_length=6)
    sizes.update(kwargs)
    return HierTCN(NUM_ITEMS, **sizes).double().eval()


def stream_of(sessions, start=1000.0):
    """(item, timestamp) events of one user: 60 s apart within a session, 2 h between sessions."""
    events, t = [], start
    for session in sessions:
        for item in session:
            events.append((item, t))
            t += 60.0
        t += 7200.0
    return events


def forward_logits(model, sessions):
    """Full-forward logits of every event of one user whose sessions form one lane."""
    batch = lane_batch([sessions])
    with torch.no_grad():
        features, _ = model(batch, None)
        return model.scores(features)


def test_streaming_equals_forward():
    model = small_hiertcn()
    users = {
        "ann": [[3, 4, 5], [7], [1, 2, 3, 4, 5, 6], [9, 9]],
        "bob": [[11, 12], [13, 14, 15, 16, 17]],
        7: [[20]],
    }
    recommender = StreamingRecommender(model, session_gap=GAP, initial_capacity=1)  # forces growth
    streams = {u: stream_of(s, start=1000.0 + 10 * i) for i, (u, s) in enumerate(users.items())}
    streamed = {u: [] for u in users}
    # Interleave users, one event at a time, and record the scores before each event.
    position = {u: 0 for u in users}
    while any(position[u] < len(streams[u]) for u in users):
        for user in users:
            if position[user] == len(streams[user]):
                continue
            item, t = streams[user][position[user]]
            if position[user] == 0:
                recommender.observe(user, item, t)
                streamed[user].append(None)  # a user's first event: no state before it exists here
            else:
                streamed[user].append(recommender.scores(user, now=t).clone())
                recommender.observe(user, item, t)
            position[user] += 1
    for user, sessions in users.items():
        expected = forward_logits(model, sessions)
        assert expected.shape[0] == len(streams[user])
        for event, got in enumerate(streamed[user]):
            if got is None:
                continue
            torch.testing.assert_close(got[1:], expected[event, 1:].float(), rtol=1e-5, atol=1e-5)
            assert got[0] == -torch.inf
    # One-user steps went through the kept scratch state, and (from its third step on) TCN.step's shortcut.
    from hiertcn_fast._extension import has_tcn_step_plan
    if has_tcn_step_plan():
        assert recommender._scratches[1].conv._fast is not None


def test_batched_observe_and_recommend_match_single():
    model = small_hiertcn()
    single = StreamingRecommender(model, session_gap=GAP)
    batched = StreamingRecommender(model, session_gap=GAP)
    streams = {u: stream_of(s) for u, s in {"a": [[1, 2], [3, 4, 5]], "b": [[6, 7, 8]], "c": [[9], [10]]}.items()}
    users, items, times = [], [], []
    for u, events in streams.items():
        for item, t in events:
            single.observe(u, item, t)
            users.append(u), items.append(item), times.append(t)
    batched.observe_many(users, items, times)  # the same user several times: processed in rounds
    ids, scores = batched.recommend_many(["a", "b", "c"], k=5)
    for row, user in enumerate(["a", "b", "c"]):
        assert single.recommend(user, k=5) == ids[row].tolist()
        assert torch.all(scores[row, :-1] >= scores[row, 1:])
        assert 0 not in ids[row].tolist()


def test_rounds_of_many_sizes_match_single_events():
    """observe_many's rounds of 1 to 10 users (more row counts than scratch states are kept) give the state
    that single observe() calls give."""
    model = small_hiertcn()
    single = StreamingRecommender(model, session_gap=GAP)
    batched = StreamingRecommender(model, session_gap=GAP)
    generator = torch.Generator().manual_seed(2)
    t = 1000.0
    for size in [*range(1, 11), 3, 1, 10]:
        users = [f"u{i}" for i in range(size)]
        items = torch.randint(1, NUM_ITEMS + 1, (size,), generator=generator).tolist()
        for user, item in zip(users, items):
            single.observe(user, item, t)
        batched.observe_many(users, items, [t] * size)
        t += 60.0
    assert len(batched._scratches) <= StreamingRecommender._SCRATCH_SIZES
    users = [f"u{i}" for i in range(10)]
    torch.testing.assert_close(batched.scores_many(users), single.scores_many(users))


def test_gap_closes_session_and_truncation_matches_training():
    model = small_hiertcn(max_session_length=3)
    recommender = StreamingRecommender(model, session_gap=GAP)
    # A 5-event session: events 4 and 5 are dropped, as the preprocessing truncates to 3.
    for i, item in enumerate([1, 2, 3, 4, 5]):
        recommender.observe("u", item, 100.0 + i)
    for i, item in enumerate([6, 7]):
        recommender.observe("u", item, 100.0 + GAP * 3 + i)
    got = recommender.scores("u")
    expected = forward_logits(model, [[1, 2, 3], [6, 7, 8]])[-1]
    torch.testing.assert_close(got[1:], expected[1:].float(), rtol=1e-5, atol=1e-5)


def test_save_and_restore():
    model = small_hiertcn()
    recommender = StreamingRecommender(model, session_gap=GAP)
    for user, sessions in {"a": [[1, 2, 3], [4]], "b": [[5, 6]]}.items():
        for item, t in stream_of(sessions):
            recommender.observe(user, item, t)
    saved = recommender.state_dict()
    before = recommender.scores_many(["a", "b"])
    restored = StreamingRecommender(model, session_gap=GAP)
    restored.observe("zed", 3, 0.0)  # users already present are kept
    restored.load_state_dict(saved)
    torch.testing.assert_close(restored.scores_many(["a", "b"]), before)
    # The restored state keeps streaming identically.
    for r in (recommender, restored):
        r.observe("a", 9, 1e6)
        r.observe("a", 10, 1e6 + 5)
    torch.testing.assert_close(restored.scores("a"), recommender.scores("a"))


def test_errors():
    with pytest.raises(TypeError, match="needs a HierTCN"):
        StreamingRecommender(SessionGRU(NUM_ITEMS, embedding_dim=4, hidden=4))
    recommender = StreamingRecommender(small_hiertcn())
    with pytest.raises(KeyError, match="unknown user"):
        recommender.recommend("nobody")
    with pytest.raises(ValueError, match="item ids"):
        recommender.observe("u", NUM_ITEMS + 1, 0.0)
    recommender.observe("u", 1, 10.0)
    with pytest.raises(ValueError, match="must not decrease"):
        recommender.observe("u", 2, 5.0)
    with pytest.raises(ValueError, match="k must be"):
        recommender.recommend("u", k=0)
