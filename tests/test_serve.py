"""StreamingRecommender: O(1) per-event updates that reproduce the full forward pass."""

import inspect

import numpy as np
import pytest
import torch

from hiertcn_fast.models import HierTCN, SessionGRU
from hiertcn_fast.serve import StreamingRecommender
from helpers import EMULATING_CUDA, interrupt_at, interrupted_at_line
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
            torch.testing.assert_close(got[1:], expected[event, 1:], rtol=1e-5, atol=1e-5)
            assert got[0] == -torch.inf
    # A known user's single events stepped its row views in place, and (from the second step on) through
    # TCN.step's shortcut.
    assert set(recommender._row_views) == {recommender.user_slot[u] for u in users if len(streams[u]) > 1}
    if not EMULATING_CUDA:  # the emulated CUDA kernels run every step through the op (tests/cuda_emu/proxy.py)
        assert all(view.conv._fast is not None for view in recommender._row_views.values())


def per_user_tensors(recommender, users):
    saved = recommender.export_users(users)
    return {key: value for key, value in saved.items() if isinstance(value, (torch.Tensor, list)) and key != "users"}


def random_events(generator, users, count, gap_every=4):
    """(user, item, timestamp) events in time order per user: random users (one more joins every tenth event),
    a session gap now and then, and bursts past the session length cap."""
    clock = {u: 1000.0 for u in users}
    events = []
    for n in range(count):
        user = users[int(torch.randint(min(len(users), 1 + n // 10), (1,), generator=generator))]
        if int(torch.randint(gap_every, (1,), generator=generator)) == 0:
            clock[user] += GAP * 2
        else:
            clock[user] += float(torch.randint(0, 120, (1,), generator=generator))
        events.append((user, int(torch.randint(1, NUM_ITEMS + 1, (1,), generator=generator)), clock[user]))
    return events


@pytest.mark.parametrize("row_views", [4096, 2])
def test_single_event_path_equals_batched_path(monkeypatch, row_views):
    """observe() / scores() of a known user (row views, Python counters) leave bitwise the state that
    observe_many() / scores_many() leave, through session gaps, idle closes, truncation, growth, users
    evicted from the row views, and the two paths mixed."""
    monkeypatch.setattr(StreamingRecommender, "_ROW_VIEWS", row_views)
    model = small_hiertcn(max_session_length=3)
    users = ["a", "b", 3, "d", "e"]
    events = random_events(torch.Generator().manual_seed(7), users, 160)
    single = StreamingRecommender(model, session_gap=GAP, initial_capacity=1)
    batched = StreamingRecommender(model, session_gap=GAP, initial_capacity=1)
    mixed = StreamingRecommender(model, session_gap=GAP, initial_capacity=1)
    # A user's next event time: scores at a later time never pass it (an event before a closing time is refused).
    next_time, upcoming = [float("inf")] * len(events), {}
    for n in reversed(range(len(events))):
        next_time[n] = upcoming.get(events[n][0], float("inf"))
        upcoming[events[n][0]] = events[n][2]
    for n, (user, item, t) in enumerate(events):
        single.observe(user, item, t)
        batched.observe_many([user], [item], [t])
        if n % 3:
            mixed.observe(user, item, t)
        else:
            mixed.observe_many([user], [item], [t])
        expected = batched.scores_many([user])[0]
        torch.testing.assert_close(single.scores(user), expected, rtol=0, atol=0)
        torch.testing.assert_close(mixed.scores(user), expected, rtol=0, atol=0)
        if n % 7 == 0:  # scores at a later time: an idle user's session closes first
            now = min(t + (GAP if n % 2 else 1.0), next_time[n])
            got = single.scores(user, now=now)
            torch.testing.assert_close(got, batched.scores_many([user], now=[now])[0], rtol=0, atol=0)
            torch.testing.assert_close(mixed.scores_many([user], now=[now])[0], got, rtol=0, atol=0)
    assert len(single._row_views) == min(row_views, len(users))
    expected = per_user_tensors(batched, users)
    for recommender in (single, mixed):
        for key, value in per_user_tensors(recommender, users).items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_single_event_path_after_restore_and_custom_embedding():
    """Row views see a restored user's state (their cached context is dropped), and a model that embeds its
    own way is asked to embed."""
    model = small_hiertcn()
    events = random_events(torch.Generator().manual_seed(3), ["a", "b"], 40)
    source, target = StreamingRecommender(model, session_gap=GAP), StreamingRecommender(model, session_gap=GAP)
    for user, item, t in events[:20]:
        source.observe(user, item, t)
    for user, item, t in events[20:30]:
        target.observe(user, item, t)  # row views with other users' states
    target.load_state_dict(source.state_dict())
    for user, item, t in events[20:]:
        source.observe(user, item, t)
        target.observe_many([user], [item], [t]) if item % 2 else target.observe(user, item, t)
        torch.testing.assert_close(target.scores(user), source.scores(user), rtol=0, atol=0)
    for key, value in per_user_tensors(target, ["a", "b"]).items():
        torch.testing.assert_close(value, per_user_tensors(source, ["a", "b"])[key], rtol=0, atol=0, msg=key)

    class Shifted(HierTCN):
        def embed(self, items):
            return super().embed(items) + 1.0

    torch.manual_seed(5)
    shifted = Shifted(NUM_ITEMS, embedding_dim=12, state_layers=2, state_hidden=7, tcn_channels=(9, 11),
                      kernel_size=3, dilations=(1, 2), max_session_length=6).double().eval()
    single, batched = StreamingRecommender(shifted), StreamingRecommender(shifted)
    for user, item, t in events:
        single.observe(user, item, t)
        batched.observe_many([user], [item], [t])
    assert not single._embedding_rows and single._row_views
    torch.testing.assert_close(single.scores("a"), batched.scores_many(["a"])[0], rtol=0, atol=0)


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
    torch.testing.assert_close(got[1:], expected[1:], rtol=1e-5, atol=1e-5)


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
    before = per_user_tensors(recommender, ["u"])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            recommender.observe("u", 2, bad)  # a known user: the single-event path
        with pytest.raises(ValueError, match="finite"):
            recommender.observe_many(["u", "v"], [2, 3], [20.0, bad])
    with pytest.raises(ValueError, match="item ids"):
        recommender.observe("u", 0, 20.0)
    with pytest.raises(ValueError, match="must not decrease"):
        recommender.observe("u", 2, 5.0)
    assert "v" not in recommender.user_slot
    for key, value in per_user_tensors(recommender, ["u"]).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)  # nothing was changed
    with pytest.raises(ValueError, match="k must be"):
        recommender.recommend("u", k=0)


def snapshot(recommender):
    users = list(recommender.user_slot)
    return users, per_user_tensors(recommender, users)


def assert_unchanged(recommender, before):
    users, tensors = snapshot(recommender)
    assert users == before[0]
    for key, value in tensors.items():
        torch.testing.assert_close(value, before[1][key], rtol=0, atol=0, msg=key)


def test_refused_input_changes_nothing():
    """Every refused call is refused before it changes anything: no user added, no state touched."""
    model = small_hiertcn()
    recommender = StreamingRecommender(model, session_gap=GAP)
    for user, item, t in [("a", 3, 1000.0), ("b", 4, 1000.0), ("a", 5, 1060.0)]:
        recommender.observe(user, item, t)
    before = snapshot(recommender)
    refused = [
        # out of order in the second round of the call (the first round would have been applied)
        (ValueError, "must not decrease", lambda r: r.observe_many(["a", "a"], [4, 5], [2000.0, 1500.0])),
        # a new user first, then an old one before its latest event
        (ValueError, "must not decrease", lambda r: r.observe_many(["new", "a"], [4, 5], [10.0, 0.0])),
        (TypeError, "integer item ids", lambda r: r.observe_many(["a"], [2.9], [5000.0])),
        (TypeError, "integer item ids", lambda r: r.observe("a", True, 5000.0)),
        (ValueError, "finite", lambda r: r.observe_many(["new", "a"], [1, 2], [5000.0, float("nan")])),
        (ValueError, "one entry per event", lambda r: r.observe_many(["new", "a"], [1], [5000.0, 5001.0])),
        (ValueError, "now must be one time", lambda r: r.scores_many(["a", "b"], now=[1.0, 2.0, 3.0])),
        # a string where a sequence of users belongs: not its characters as users ("ab" is not "a" and "b")
        (TypeError, "sequence of user ids", lambda r: r.observe_many("ab", [1, 2], [5000.0, 5000.0])),
        (TypeError, "sequence of user ids", lambda r: r.forget_users("ab")),
        (TypeError, "items must be numbers", lambda r: r.observe_many(["a"], ["3"], [5000.0])),
        (TypeError, "timestamps must be numbers", lambda r: r.observe_many(["a"], [3], ["5000"])),
        (ValueError, "one-dimensional", lambda r: r.observe_many(["a", "b"], [[1], [2]], [5000.0, 5000.0])),
        # truth values where numbers belong: torch.as_tensor would take True for 1 without a word
        (TypeError, "timestamps must be numbers.*got a bool", lambda r: r.observe("a", 3, True)),
        (TypeError, "timestamps must be numbers.*got a bool", lambda r: r.observe("new", 3, True)),
        (TypeError, "timestamps must be numbers.*got a bool",
         lambda r: r.observe_many(["a", "b"], [3, 4], [5000.0, True])),
        (TypeError, "timestamps must be numbers.*got a bool", lambda r: r.observe_many(["a"], [3], np.array([True]))),
        (TypeError, "items must be integer item ids, got a bool",
         lambda r: r.observe_many(["a", "b"], [True, 2], [5000.0, 5000.0])),
        (TypeError, "now must be seconds.*got a bool", lambda r: r.scores("a", now=True)),
        (TypeError, "now must be seconds.*got a bool", lambda r: r.scores_many(["a", "b"], now=[5000.0, True])),
        (TypeError, "now must be seconds.*got a bool", lambda r: r.scores_many(["a"], now=torch.tensor([True]))),
        (TypeError, "now must be seconds.*got text", lambda r: r.scores("a", now="5000")),
    ]
    for error, message, call in refused:
        with pytest.raises(error, match=message):
            call(recommender)
        assert_unchanged(recommender, before)

    saved = recommender.export_users(["a"])
    bad_states = {
        "users listed twice": (dict(saved, users=["a", "a"]), "more than once"),
        "rows for another number of users": (dict(saved, users=["p", "q", "r"]), r"shape \(2, 3, 7\) for 3 users"),
        "a missing key": ({k: v for k, v in saved.items() if k != "session_sum"}, "lacks session_sum"),
        "another state width": (dict(saved, state=torch.zeros(2, 1, 9)), r"state must have shape \(2, 1, 7\)"),
        "other session rules": (dict(saved, max_session_length=3), "saved with max_session_length = 3"),
        "a negative conv position": (dict(saved, conv_position=[p - 100 for p in saved["conv_position"]]), ">= 0"),
        "a count past the session cap": (dict(saved, session_count=saved["session_count"] + 100),
                                         "<= max_session_length"),
        "float positions": (dict(saved, conv_position=[p.double() for p in saved["conv_position"]]), "integers"),
        "one layer's history missing": (dict(saved, conv_history=saved["conv_history"][:1]), "one entry per TCN"),
        "not a streaming state": (dict(saved, format="other"), "not a streaming state"),
        "a NaN state": (dict(saved, state=saved["state"] * float("nan")), "saved state holds NaN"),
        "infinite features": (dict(saved, features=saved["features"] + float("inf")), "saved features holds NaN"),
        "a NaN conv history": (dict(saved, conv_history=[saved["conv_history"][0] * float("nan"),
                                                         *saved["conv_history"][1:]]), r"conv_history\[0\] holds"),
    }
    for name, (state, message) in bad_states.items():
        with pytest.raises((ValueError, TypeError), match=message):
            recommender.load_state_dict(state)
        assert_unchanged(recommender, before)
    recommender.load_state_dict(saved)  # the state itself is fine
    assert_unchanged(recommender, before)


def test_user_ids_given_as_tensors_or_numpy_values_are_the_same_users():
    """A 0-d tensor hashes by identity: ids given as a tensor, a NumPy array or NumPy scalars are stored by value,
    so two calls with the same ids reach the same users (and a user's times are checked across them)."""
    recommender = StreamingRecommender(small_hiertcn(), session_gap=GAP)
    ids = torch.tensor([1, 2])
    recommender.observe_many(ids, [3, 4], [0.0, 0.0])
    recommender.observe_many(np.array([1, 2]), [5, 6], [10.0, 10.0])
    recommender.observe(np.int64(1), 7, 20.0)
    recommender.observe(torch.tensor(2), 8, 20.0)
    assert sorted(recommender.user_slot) == [1, 2]
    assert recommender.recommend(1, k=3) == recommender.recommend_many(ids, k=3)[0][0].tolist()
    with pytest.raises(ValueError, match="must not decrease"):
        recommender.observe_many(torch.tensor([7, 7]), [3, 4], [100.0, 50.0])
    with pytest.raises(ValueError, match="one-dimensional"):
        recommender.scores_many(torch.tensor([[1, 2]]))


def test_an_event_before_the_time_that_closed_its_session_is_refused():
    """scores(now=...) closes an idle user's session as an event at ``now`` would; a later event before ``now``
    would contradict that (the log it belongs to keeps one session), so it is refused, on both paths, and the
    refused call changes nothing."""
    for batched in (False, True):
        recommender = StreamingRecommender(small_hiertcn(), session_gap=GAP)
        for t in (0.0, 60.0):
            recommender.observe("u", 3, t)
        before = per_user_tensors(recommender, ["u"])
        if batched:
            recommender.scores_many(["u"], now=[60.0 + GAP])
        else:
            recommender.scores("u", now=60.0 + GAP)
        after_close = per_user_tensors(recommender, ["u"])
        assert not torch.equal(after_close["state"], before["state"])  # the session was closed
        with pytest.raises(ValueError, match="must not decrease"):
            if batched:
                recommender.observe_many(["u"], [4], [120.0])
            else:
                recommender.observe("u", 4, 120.0)
        for key, value in per_user_tensors(recommender, ["u"]).items():
            want = after_close[key]
            assert all(map(torch.equal, value, want)) if isinstance(value, list) else torch.equal(value, want), key
        recommender.observe("u", 4, 60.0 + GAP)  # at the closing time itself: the next session's first event


def test_now_and_constructor_arguments_are_checked():
    recommender = StreamingRecommender(small_hiertcn(), session_gap=GAP)
    recommender.observe_many([], [], [])  # no events: nothing to do
    assert not recommender.user_slot
    recommender.observe_many(["a", "b"], [1, 2], [0.0, 0.0])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            recommender.scores("a", now=bad)
        with pytest.raises(ValueError, match="finite"):
            recommender.scores_many(["a", "b"], now=[0.0, bad])
    with pytest.raises(ValueError, match="more than once with different times"):
        recommender.scores_many(["a", "a"], now=[10.0, 10.0 + GAP])
    assert recommender.scores_many(["a", "a"], now=[10.0, 10.0]).shape[0] == 2
    for bad in (-1, 0, 2.7, True):
        with pytest.raises(ValueError, match="max_session_length"):
            StreamingRecommender(small_hiertcn(), max_session_length=bad)
    for bad in ("30", 0, -5.0, float("inf"), True):
        with pytest.raises(ValueError, match="session_gap must be a positive, finite number"):
            StreamingRecommender(small_hiertcn(), session_gap=bad)
    for bad in (2.5, -1, "8"):
        with pytest.raises(ValueError, match="initial_capacity must be an integer"):
            StreamingRecommender(small_hiertcn(), initial_capacity=bad)
    # k as a NumPy integer is an integer
    assert recommender.recommend("a", k=np.int64(3)) == recommender.recommend("a", k=3)
    assert torch.equal(recommender.recommend_many(["a"], k=np.int64(2))[0], recommender.recommend_many(["a"], k=2)[0])


def test_a_model_changed_after_the_recommender_was_made_is_refused_before_anything_changes():
    """In training mode the model's dropout would make the stored states and the scores random; moved to another
    dtype, its step would refuse the stored states half way through an event. Both are refused up front."""
    model = small_hiertcn(dropout=0.5)
    recommender = StreamingRecommender(model, session_gap=GAP)
    recommender.observe_many(["a", "b"], [1, 2], [0.0, 0.0])
    before = snapshot(recommender)
    model.train()
    calls = [lambda: recommender.observe("a", 3, 60.0), lambda: recommender.observe_many(["a"], [3], [60.0]),
             lambda: recommender.scores("a"), lambda: recommender.scores_many(["a"]),
             lambda: recommender.recommend("a", 2), lambda: recommender.recommend_many(["a"], 2)]
    for call in calls:
        with pytest.raises(RuntimeError, match="training mode"):
            call()
        assert_unchanged(recommender, before)
    model.eval()
    model.float()
    for call in calls:
        with pytest.raises(RuntimeError, match="now torch.float32 on cpu, but this recommender's states are "
                                               "torch.float64"):
            call()
        assert_unchanged(recommender, before)
    model.double()
    recommender.observe("a", 3, 60.0)  # as made again: served


@pytest.mark.parametrize("single_events", [False, True])
def test_forgotten_users_free_their_rows_and_change_no_one_else(single_events):
    """forget_users drops users' rows (the last users' rows move into the gaps): the other users' scores stay
    bitwise those of a recommender that never saw the forgotten ones, before and after more events, and a new
    user starts from nothing in a freed row. An unknown user is refused and nothing changes."""
    events = random_events(torch.Generator().manual_seed(11), ["a", "b", "c", "d"], 80)
    full = StreamingRecommender(small_hiertcn(), session_gap=GAP, initial_capacity=1)
    without = StreamingRecommender(small_hiertcn(), session_gap=GAP, initial_capacity=1)
    without.model = full.model

    def feed(recommender, chunk, skip=()):
        for user, item, t in chunk:
            if user in skip:
                continue
            if single_events:
                recommender.observe(user, item, t)
            else:
                recommender.observe_many([user], [item], [t])

    feed(full, events[:50])
    feed(without, events[:50], skip=("a", "c"))
    with pytest.raises(KeyError, match="unknown user"):
        full.forget_users(["a", "zzz"])
    assert sorted(full.user_slot, key=str) == ["a", "b", "c", "d"]
    full.forget_users(["a", "c", "a"])
    assert sorted(full.user_slot) == ["b", "d"] and sorted(full.user_slot.values()) == [0, 1]
    for chunk in (events[50:], [("e", 5, 1e6), ("b", 6, 2e6)]):
        feed(full, chunk, skip=("a", "c"))
        feed(without, chunk, skip=("a", "c"))
        for user in without.user_slot:
            torch.testing.assert_close(full.scores(user), without.scores(user), rtol=0, atol=0)
            expected = per_user_tensors(without, [user])
            for key, value in per_user_tensors(full, [user]).items():
                want = expected[key]
                assert (all(map(torch.equal, value, want)) if isinstance(value, list)
                        else torch.equal(value, want)), (user, key)


def stored_tensors(recommender):
    """Every tensor the recommender keeps between calls: per-user storage, scratch states and row views."""
    tensors = [recommender.state, recommender.session_sum, recommender.session_count, recommender.features,
               recommender.last_time, *[t for layer in recommender.conv.layers for t in (layer.history, layer.position)]]
    for scratch in recommender._scratches.values():
        tensors += [scratch.context, *[t for layer in scratch.conv.layers for t in (layer.history, layer.position)]]
    for view in recommender._row_views.values():
        tensors += [view.session_sum, view.features, view.context,
                    *[t for layer in view.conv.layers for t in (layer.history, layer.position)]]
    return tensors


def test_serving_inside_inference_mode_and_then_outside_it_equals_serving_outside():
    """A recommender made, grown and used inside torch.inference_mode() (as request handlers often are) keeps
    normal tensors: it serves there and afterwards outside it, both paths, with exactly the results of one used
    only outside it."""
    model = small_hiertcn(max_session_length=3)
    events = random_events(torch.Generator().manual_seed(13), ["a", "b", 3, "d", "e"], 120)
    plain = StreamingRecommender(model, session_gap=GAP, initial_capacity=1)
    with torch.inference_mode():
        served = StreamingRecommender(model, session_gap=GAP, initial_capacity=1)  # grows inside
    # Scores at a later time never pass the user's next event (an event before a closing time is refused).
    next_time, upcoming = [float("inf")] * len(events), {}
    for n in reversed(range(len(events))):
        next_time[n] = upcoming.get(events[n][0], float("inf"))
        upcoming[events[n][0]] = events[n][2]
    for n, (user, item, t) in enumerate(events):
        now = min(t + GAP, next_time[n])
        inside = (n // 20) % 2 == 0  # alternate: 20 events inside inference mode, 20 outside
        with torch.inference_mode(inside):
            if n % 3:
                served.observe(user, item, t)
            else:
                served.observe_many([user], [item], [t])
            got = served.scores(user, now=now) if n % 5 == 0 else served.scores(user)
        plain.observe(user, item, t)
        expected = plain.scores(user, now=now) if n % 5 == 0 else plain.scores(user)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not any(t.is_inference() for t in stored_tensors(served))
    users = list(plain.user_slot)
    expected = per_user_tensors(plain, users)
    for key, value in per_user_tensors(served, users).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_a_new_user_whose_first_event_fails_is_not_registered(monkeypatch):
    """A new user is registered only with its first event applied: a call that fails part way through leaves no
    user without a session (that would be scored from nothing instead of refused as unknown)."""
    recommender = StreamingRecommender(small_hiertcn(), session_gap=GAP, initial_capacity=1)
    recommender.observe("a", 3, 100.0)
    before = snapshot(recommender)

    def failing(self, rows, inputs):
        raise RuntimeError("injected failure")

    with monkeypatch.context() as patch:
        patch.setattr(StreamingRecommender, "_conv_step", failing)
        for call in (lambda: recommender.observe("b", 5, 100.0), lambda: recommender.observe_many(["c"], [5], [1.0])):
            with pytest.raises(RuntimeError, match="injected failure"):
                call()
            assert_unchanged(recommender, before)
    with pytest.raises(KeyError, match="unknown user"):
        recommender.recommend("b")
    plain = StreamingRecommender(small_hiertcn(), session_gap=GAP)
    plain.observe("a", 3, 100.0)
    for r in (recommender, plain):
        r.observe("b", 5, 100.0)
        r.observe_many(["c", "a"], [5, 6], [1.0, 160.0])
    for user in ("a", "b", "c"):
        torch.testing.assert_close(recommender.scores(user), plain.scores(user), rtol=0, atol=0)


# Round 1: a (a gap: GRU step, start token, event), b, new user c (start token, event); round 2: a, c.
# Round 3: a again after a gap. Conv steps: 1 c's start token (c is registered first), 2 a's start token
# (after its GRU step), 3 round 1's events, 4 round 2's events, 5 a's start token, 6 round 3's event.
THREE_ROUNDS = (["a", "b", "c", "a", "c", "a"], [5, 6, 7, 8, 9, 10], [1e5, 200.0, 50.0, 1e5 + 5, 60.0, 3e5])
ONE_ROUND = THREE_ROUNDS[0][:3], THREE_ROUNDS[1][:3], THREE_ROUNDS[2][:3]


@pytest.mark.parametrize("call, fail_at",
                         [(THREE_ROUNDS, n) for n in range(1, 7)] + [(ONE_ROUND, n) for n in (1, 2, 3)])
def test_a_batched_call_that_fails_part_way_through_changes_nothing(monkeypatch, call, fail_at):
    """observe_many that fails in any of its conv steps (its first round, a later round, or between a session's
    GRU step and its new session's start token) leaves every user as it was, new and known alike: no round and no
    half of a round stays applied (in one round, b's row is not among those saved, so this checks that nothing is
    written to it before the step). The recommender then goes on exactly as one that never saw the call."""
    model = small_hiertcn()
    recommender, plain = StreamingRecommender(model, session_gap=GAP), StreamingRecommender(model, session_gap=GAP)
    for r in (recommender, plain):
        r.observe_many(["a", "b"], [3, 4], [100.0, 100.0])
    before = snapshot(recommender)
    real, calls = StreamingRecommender._conv_step, []

    def failing_at(self, rows, inputs):
        calls.append(rows.shape[0])
        if len(calls) == fail_at:
            raise RuntimeError("injected failure")
        return real(self, rows, inputs)

    with monkeypatch.context() as patch:
        patch.setattr(StreamingRecommender, "_conv_step", failing_at)
        with pytest.raises(RuntimeError, match="injected failure"):
            recommender.observe_many(*call)
    assert calls == [1, 1, 3, 2, 1, 1][:fail_at]  # the rows of each conv step, as listed above
    assert_unchanged(recommender, before)
    with pytest.raises(KeyError, match="unknown user"):
        recommender.recommend("c")
    for r in (recommender, plain):
        r.observe_many(*call)
        r.observe("b", 11, 2e5)
    for user in ("a", "b", "c"):
        torch.testing.assert_close(recommender.scores(user), plain.scores(user), rtol=0, atol=0)
    expected = per_user_tensors(plain, ["a", "b", "c"])
    for key, value in per_user_tensors(recommender, ["a", "b", "c"]).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_a_failed_session_close_changes_nothing(monkeypatch):
    """A single event that closes a session and fails part way through leaves the user's GRU state (and all else)
    as it was: after the row view was used inside inference mode, and with the TCN context failing to compute."""
    model = small_hiertcn()
    recommender, plain = StreamingRecommender(model, session_gap=GAP), StreamingRecommender(model, session_gap=GAP)
    recommender.observe("a", 3, 100.0)
    with torch.inference_mode():
        recommender.observe("a", 4, 160.0)  # the row view of "a" is made in inference mode
    before = snapshot(recommender)

    def failing(state):
        raise RuntimeError("injected failure")

    with monkeypatch.context() as patch:
        patch.setattr(model, "context_of", failing)
        with pytest.raises(RuntimeError, match="injected failure"):
            recommender.observe("a", 5, 1e5)  # a gap: the session closes
        assert_unchanged(recommender, before)
    for user, item, t in (("a", 3, 100.0), ("a", 4, 160.0)):
        plain.observe(user, item, t)
    for r in (recommender, plain):
        r.observe("a", 5, 1e5)  # outside inference mode now
        r.observe("a", 6, 1e5 + 1)
    torch.testing.assert_close(recommender.scores("a"), plain.scores("a"), rtol=0, atol=0)
    expected = per_user_tensors(plain, ["a"])
    for key, value in per_user_tensors(recommender, ["a"]).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("event, fail_at", [((5, 1e5), 1), ((5, 1e5), 2), ((5, 200.0), 1)])
def test_a_single_event_whose_conv_step_fails_changes_nothing(monkeypatch, event, fail_at):
    """observe() of a known user whose TCN step fails changes nothing: the start token's step after a session
    closed (its GRU step already written; fail_at 1 of a closing event), the event's own step after that (2), and
    the event's step inside a session (the session's sum, count and time are written after it)."""
    model = small_hiertcn()
    recommender, plain = StreamingRecommender(model, session_gap=GAP), StreamingRecommender(model, session_gap=GAP)
    for r in (recommender, plain):
        r.observe("a", 3, 100.0)
        r.observe("a", 4, 160.0)
    recommender.scores("a")  # its row view is made and used
    before = snapshot(recommender)
    real, calls = model.tcn.step, []

    def failing_at(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(model.tcn, "step", failing_at)
        with pytest.raises(RuntimeError, match="injected failure"):
            recommender.observe("a", *event)
    assert len(calls) == fail_at
    assert_unchanged(recommender, before)
    for r in (recommender, plain):
        r.observe("a", *event)
        r.observe("a", 6, event[1] + 1)
    torch.testing.assert_close(recommender.scores("a"), plain.scores("a"), rtol=0, atol=0)
    expected = per_user_tensors(plain, ["a"])
    for key, value in per_user_tensors(recommender, ["a"]).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("call", ["scores", "scores_many", "recommend", "recommend_many"])
def test_a_look_up_whose_session_close_fails_changes_nothing(monkeypatch, call):
    """A look-up with ``now`` past the gap closes the open session: GRU step, then the new session's start token.
    A failure at the start token left the user half closed (new state, count 0, no start token), and every later
    event of that session scored wrongly. Now the user is as before, and goes on as one that never failed."""
    model = small_hiertcn()
    recommender, plain = StreamingRecommender(model, session_gap=GAP), StreamingRecommender(model, session_gap=GAP)
    for r in (recommender, plain):
        r.observe_many(["a", "b"], [3, 4], [100.0, 100.0])
        r.observe("a", 5, 160.0)
    recommender.scores("a")  # its row view is made and used
    before = snapshot(recommender)
    real = model.tcn.step

    def failing(*args, **kwargs):
        raise RuntimeError("injected failure")

    look_up = {"scores": lambda r: r.scores("a", now=1e5), "scores_many": lambda r: r.scores_many(["a", "b"], 1e5),
               "recommend": lambda r: r.recommend("a", 3, now=1e5),
               "recommend_many": lambda r: r.recommend_many(["b", "a"], 3, now=[1e5, 2e5])}[call]
    with monkeypatch.context() as patch:
        patch.setattr(model.tcn, "step", failing)
        with pytest.raises(RuntimeError, match="injected failure"):
            look_up(recommender)
    assert model.tcn.step == real
    assert_unchanged(recommender, before)
    for r in (recommender, plain):
        look_up(r)
        r.observe("a", 6, 3e5)
        r.observe("a", 7, 3e5 + 1)
    for user in ("a", "b"):
        torch.testing.assert_close(recommender.scores(user), plain.scores(user), rtol=0, atol=0)
    expected = per_user_tensors(plain, ["a", "b"])
    for key, value in per_user_tensors(recommender, ["a", "b"]).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_copies_stream_like_the_original_and_independently_of_it():
    """copy.deepcopy and a pickle round trip give a recommender that goes on exactly as the original (single
    events, batched events and closing by now), and events of the copy do not reach the original."""
    import copy
    import pickle

    model = small_hiertcn()
    events = random_events(torch.Generator().manual_seed(17), ["a", "b", "c"], 60)
    original = StreamingRecommender(model, session_gap=GAP, initial_capacity=1)
    for user, item, t in events[:30]:
        original.observe(user, item, t)  # row views and counters in use
    original.observe_many(["z"], [2], [1e5])
    copies = [copy.deepcopy(original), pickle.loads(pickle.dumps(original))]
    untouched = copy.deepcopy(original)
    # The last two: a single event, then a batched one 1790 s later (the same session, by the counters).
    for n, (user, item, t) in enumerate([*events[30:], ("z", 5, 1e5 + 100), ("z", 6, 1e5 + 1890)]):
        for r in (original, *copies):
            if n % 2 == 0:
                r.observe(user, item, t)
            else:
                r.observe_many([user], [item], [t])
        expected = original.scores(user, now=t + 1.0)
        for r in copies:
            torch.testing.assert_close(r.scores(user, now=t + 1.0), expected, rtol=0, atol=0)
    users = ["a", "b", "c", "z"]
    expected = per_user_tensors(original, users)
    for r in copies:
        for key, value in per_user_tensors(r, users).items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    # The copies' events changed neither the copy taken before them nor its source's state before them.
    reference = StreamingRecommender(model, session_gap=GAP, initial_capacity=1)
    for user, item, t in events[:30]:
        reference.observe(user, item, t)
    reference.observe_many(["z"], [2], [1e5])
    for user in users:
        torch.testing.assert_close(untouched.scores(user), reference.scores(user), rtol=0, atol=0)


def test_export_lists_each_user_once():
    """export_users takes a user listed twice once (first occurrence order), as forget_users does, so the state
    it writes loads."""
    model = small_hiertcn()
    recommender = StreamingRecommender(model, session_gap=GAP)
    recommender.observe_many(["a", "b"], [3, 4], [100.0, 100.0])
    saved = recommender.export_users(["b", "a", "b"])
    assert saved["users"] == ["b", "a"] and saved["state"].shape[1] == 2
    restored = StreamingRecommender(model, session_gap=GAP)
    restored.load_state_dict(saved)
    torch.testing.assert_close(restored.scores_many(["a", "b"]), recommender.scores_many(["a", "b"]), rtol=0, atol=0)


def test_unordered_users_and_timestamps_of_more_than_one_dimension_are_refused():
    """Events are paired with users by position: a set or dict of users (whose order is arbitrary) and
    timestamps of more than one dimension (which would be flattened) are refused, changing nothing."""
    recommender = StreamingRecommender(small_hiertcn(), session_gap=GAP)
    recommender.observe_many(["a", "b"], [3, 4], [100.0, 100.0])
    before = snapshot(recommender)
    for times in ([[200.0, 300.0]], [[200.0], [300.0]], torch.tensor([[200.0, 300.0]])):
        with pytest.raises(ValueError, match="timestamps must be one time per event"):
            recommender.observe_many(["a", "b"], [1, 2], times)
        assert_unchanged(recommender, before)
    for users in ({"a", "b"}, frozenset(["a", "b"]), {"a": 0, "b": 1}, {"a": 0, "b": 1}.keys()):
        with pytest.raises(TypeError, match="users must be in order"):
            recommender.observe_many(users, [1, 2], [200.0, 300.0])
        assert_unchanged(recommender, before)
    recommender.forget_users({"a"})  # order does not matter to forgetting
    assert list(recommender.user_slot) == ["b"]


# ---- interrupted calls change nothing --------------------------------------------------------------------

def flat(recommender):
    users, tensors = snapshot(recommender)
    out = {}
    for key, value in tensors.items():
        for i, t in enumerate(value if isinstance(value, list) else [value]):
            out[f"{key}[{i}]"] = t.clone()
    return users, out


def assert_same(now, before):
    assert now[0] == before[0], f"users {now[0]} != {before[0]}"
    changed = [key for key in before[1] if not torch.equal(now[1][key], before[1][key])]
    assert not changed, f"interrupted call left these per-user tensors changed: {changed}"


def test_load_state_dict_interrupted_while_registering_new_users_registers_none():
    """load_state_dict promises that a load failing part way (an interrupt) changes nothing and leaves no user
    half loaded. It registered the saved users in a loop before the try whose handler drops them: an interrupt
    between two iterations left the first new user registered with an empty row, served (scores from zero features)
    instead of refused. After the failed load the user must be unknown (KeyError)."""
    model = small_hiertcn()
    source = StreamingRecommender(model, session_gap=GAP)
    for user, item, t in [("q1", 3, 100.0), ("q1", 4, 160.0), ("q2", 5, 100.0)]:
        source.observe(user, item, t)
    saved = source.state_dict()
    target = StreamingRecommender(model, session_gap=GAP)
    target.observe("a", 7, 100.0)
    before = flat(target)
    with interrupt_at(StreamingRecommender.load_state_dict, "for user in users:", hit=2) as fired:
        with pytest.raises(KeyboardInterrupt):
            target.load_state_dict(saved)
    assert fired
    assert list(target.user_slot) == ["a"], f"half-loaded users left registered: {list(target.user_slot)}"
    with pytest.raises(KeyError):
        target.scores("q1")
    assert_same(flat(target), before)


@pytest.mark.parametrize("where", ["view.session_sum += embedded[0]", "count[row] += 1", "last_time[row] = timestamp"])
def test_single_event_interrupted_after_its_conv_step_changes_nothing(where):
    """StreamingRecommender promises that a call failing part way through (an interrupt) changes nothing. A known
    user's event inside an open session steps the TCN in place on views of the user's rows (conv history and
    position advance), then writes features, session_sum and the count: an interrupt after the step left the conv
    state one event ahead of the session count, and the retried event was seen twice by the convolution (scores
    0.068 off an uninterrupted run's). The row's conv state, sum, features and counters must be put back."""
    model = small_hiertcn()
    recommender, plain = StreamingRecommender(model, session_gap=GAP), StreamingRecommender(model, session_gap=GAP)
    for r in (recommender, plain):
        r.observe("a", 3, 100.0)
        r.observe("a", 4, 160.0)
    before = flat(recommender)
    with interrupt_at(StreamingRecommender._step_one, where) as fired:
        with pytest.raises(KeyboardInterrupt):
            recommender.observe("a", 5, 220.0)
    assert fired
    assert_same(flat(recommender), before)
    for r in (recommender, plain):
        r.observe("a", 5, 220.0)
    torch.testing.assert_close(recommender.scores("a"), plain.scores("a"), rtol=0, atol=0)


def test_batched_round_interrupted_after_its_conv_step_changes_nothing():
    """observe_many promises the same all-or-nothing. For a call of one round it saved only the rows whose session
    closes, assuming nothing is written to the others before their conv step fails; but _conv_step writes their
    features, conv history and position, and _observe_round then session_sum and session_count: an interrupt after
    _conv_step returned left the known users' conv state advanced and their session count not. Those rows must be
    unchanged after the failed call."""
    model = small_hiertcn()
    recommender = StreamingRecommender(model, session_gap=GAP)
    recommender.observe_many(["a", "b"], [3, 4], [100.0, 100.0])
    before = flat(recommender)
    with interrupt_at(StreamingRecommender._observe_round, "self.session_sum[stepped] += embedded") as fired:
        with pytest.raises(KeyboardInterrupt):
            recommender.observe_many(["a", "b"], [7, 8], [300.0, 300.0])
    assert fired
    assert_same(flat(recommender), before)


@pytest.mark.parametrize("function, where", [("_copy_row", "for t in self._per_user_tensors():"),
                                             ("_clear_row", "for t in self._per_user_tensors():"),
                                             ("forget_users", "self.user_slot = slots")])
def test_forget_users_interrupted_part_way_does_not_give_a_user_another_users_state(function, where):
    """forget_users moves the last user's row into the freed one. It remapped ``user_slot[moved] = row`` before
    copying the row: an interrupt on entry to _copy_row left user "c" mapped to the row that still held user "a"'s
    state, so "c" was served "a"'s recommendations and its own history was lost. Interrupted anywhere, either
    nothing is forgotten or "a" is fully forgotten, and the remaining users keep their own state and scores."""
    model = small_hiertcn()
    recommender = StreamingRecommender(model, session_gap=GAP)
    for user, item, t in [("a", 3, 100.0), ("a", 4, 160.0), ("b", 5, 100.0), ("c", 9, 100.0), ("c", 10, 130.0)]:
        recommender.observe(user, item, t)
    scores = {user: recommender.scores(user).clone() for user in ("b", "c")}
    own = per_user_tensors(recommender, ["c"])
    with interrupt_at(getattr(StreamingRecommender, function), where) as fired:
        with pytest.raises(KeyboardInterrupt):
            recommender.forget_users(["a"])
    assert fired
    assert set(recommender.user_slot) in ({"a", "b", "c"}, {"b", "c"})
    for user in ("b", "c"):
        torch.testing.assert_close(recommender.scores(user), scores[user], rtol=0, atol=0, msg=user)
    for key, value in per_user_tensors(recommender, ["c"]).items():
        torch.testing.assert_close(value, own[key], rtol=0, atol=0, msg=key)


def _with_history():
    recommender = StreamingRecommender(small_hiertcn(), session_gap=GAP, initial_capacity=2)
    for user, item, t in [("a", 3, 100.0), ("a", 4, 160.0), ("b", 5, 100.0), ("c", 9, 100.0), ("c", 10, 130.0)]:
        recommender.observe(user, item, t)
    return recommender


def _same(now, then):
    return now[0] == then[0] and all(
        all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) if isinstance(a, list) else torch.equal(a, b)
        for a, b in ((now[1][key], then[1][key]) for key in then[1]))


def test_every_call_interrupted_at_any_line_leaves_the_state_before_or_after_it():
    """Each state-changing call, interrupted before each line it runs in turn (its own and the helpers it calls),
    leaves every user's state as before the call or as after it, never between; and where nothing was applied,
    calling it again gives the uninterrupted result. (This sweep found forget_users' users' rows replaced inside
    _all_or_nothing's with, whose exit could still put the rows back: users mapped to other users' rows.)"""
    source = _with_history()
    source.observe("z", 7, 50.0)
    saved = source.export_users(["a", "z"])
    calls = {
        "observe, open session": lambda r: r.observe("a", 6, 200.0),
        "observe, closing": lambda r: r.observe("a", 6, 5000.0),
        "observe, new user": lambda r: r.observe("n", 6, 5000.0),
        "observe_many, rounds": lambda r: r.observe_many(["a", "b", "n", "a", "c"], [1, 2, 3, 4, 5],
                                                         [200.0, 5000.0, 10.0, 300.0, 9000.0]),
        "forget_users": lambda r: r.forget_users(["a", "b"]),
        "load_state_dict": lambda r: r.load_state_dict(saved),
        "scores_many, now": lambda r: r.scores_many(["a", "c"], now=1e6),
    }
    codes = set()
    for value in vars(StreamingRecommender).values():
        function = inspect.unwrap(value) if callable(value) else None
        if hasattr(function, "__code__"):
            codes.add(function.__code__)
    for label, call in calls.items():
        before = snapshot(_with_history())
        done = _with_history()
        call(done)
        after = snapshot(done)
        n = 1
        while (where := interrupted_at_line(codes, n, call, recommender := _with_history())) is not None:
            now = snapshot(recommender)
            assert _same(now, before) or _same(now, after), f"{label}: interrupted at {where}, left between"
            if _same(now, before):
                call(recommender)
                assert _same(snapshot(recommender), after), f"{label}: interrupted at {where}, then retried"
            n += 1
        assert n > 40, f"{label}: only {n - 1} lines ran"


def _small_hiertcn(dtype):
    torch.manual_seed(5)
    return HierTCN(23, embedding_dim=12, state_layers=2, state_hidden=7, tcn_channels=(9, 11), kernel_size=3,
                   dilations=(1, 2), max_session_length=6).to(dtype).eval()


def test_a_float64_model_is_ranked_on_its_float64_scores():
    """The scores were rounded to float32 before ranking: two items whose float64 scores differ by less than float32
    resolves came out tied, in id order, and not in the model's order."""
    model = _small_hiertcn(torch.float64)
    with torch.no_grad():
        model.output.weight[7] = model.output.weight[3]
        model.output.bias[3] = 50.0
        model.output.bias[7] = 50.0 + 1e-9
    recommender = StreamingRecommender(model)
    recommender.observe("a", 5, 0.0)
    with torch.no_grad():
        full = model.scores(recommender.features[recommender.user_slot["a"]][None])[0]
    assert full[7] > full[3] and float(full[7].float()) == float(full[3].float())
    scores = recommender.scores("a")
    assert scores.dtype == torch.float64 and torch.equal(scores[1:], full[1:])
    assert recommender.recommend("a", 2) == [7, 3]
    assert recommender.recommend_many(["a"], 2)[0].tolist() == [[7, 3]]
    float32 = StreamingRecommender(_small_hiertcn(torch.float32))
    float32.observe("a", 5, 0.0)
    assert float32.scores("a").dtype == torch.float32


def test_item_and_time_arrays_are_taken_reversed_and_too_large_ids_are_named():
    """A reversed NumPy view (negative strides) was torch's "At least one stride ... is negative", and an id past
    int64 its "Overflow when unpacking long long": neither named the argument."""
    model = _small_hiertcn(torch.float32)
    reversed_views, copies = StreamingRecommender(model), StreamingRecommender(model)
    items, times = np.array([5, 4, 3]), np.array([300.0, 200.0, 100.0])
    reversed_views.observe_many(["a", "b", "c"], items[::-1], times[::-1])
    copies.observe_many(["a", "b", "c"], items[::-1].copy(), times[::-1].copy())
    now = np.array([9000.0, 8000.0, 7000.0])[::-1]
    assert torch.equal(reversed_views.scores_many(["a", "b", "c"], now=now),
                       copies.scores_many(["a", "b", "c"], now=now.copy()))
    for call in (lambda: reversed_views.observe("new", 2 ** 70, 10000.0),
                 lambda: reversed_views.observe_many(["a"], [2 ** 64], [10000.0])):
        with pytest.raises(ValueError, match="items holds a number too large for int64"):
            call()
    assert "new" not in reversed_views.user_slot
