"""Differential and failure checks of hiertcn_fast.serve.StreamingRecommender: batched and single-event serving
against one event at a time and against the model's full forward, forgetting users, save/restore, and calls that
fail part way through (followed by more serving, so that caches left stale would show)."""

import copy
import inspect
import io
import random

import numpy as np
import pytest
import torch

from hiertcn_fast import serve
from hiertcn_fast.models import HierTCN
from hiertcn_fast.serve import StreamingRecommender
from helpers import interrupt_at, interrupted_at_line
from model_helpers import lane_batch, one_thread  # noqa: F401 (autouse fixture)

NUM_ITEMS = 23
GAP = 1800.0


def small_hiertcn(dtype=torch.float64, **kwargs):
    torch.manual_seed(5)
    sizes = dict(embedding_dim=12, state_layers=2, state_hidden=7, tcn_channels=(9, 11), kernel_size=3,
                 dilations=(1, 2), max_session_length=4)
    sizes.update(kwargs)
    return HierTCN(NUM_ITEMS, **sizes).to(dtype).eval()


def per_user(recommender, users):
    saved = recommender.export_users(users)
    return {key: value for key, value in saved.items() if isinstance(value, (torch.Tensor, list)) and key != "users"}


def assert_same_users(got, want, users, exact=True):
    """Same scores and per-user tensors (bitwise, or to rounding: batches of other sizes round differently)."""
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-9, atol=1e-9)
    for user in users:
        torch.testing.assert_close(got.scores_many([user])[0], want.scores_many([user])[0],
                                   **(tol if exact else dict(rtol=1e-6, atol=1e-6)), msg=str(user))
    expected = per_user(want, users)
    for key, value in per_user(got, users).items():
        for a, b in zip(value if isinstance(value, list) else [value], expected[key] if isinstance(value, list)
                        else [expected[key]]):
            torch.testing.assert_close(a, b, **tol, msg=key)


# ---- streaming == full forward, over architectures ---------------------------------------------------------------

def sessionize(events, cap):
    """The preprocessing's rule: a gap >= GAP (between consecutive events, dropped ones included) starts a
    session; each session keeps its first ``cap`` events."""
    sessions, last = [], None
    for item, t in events:
        if last is None or t - last >= GAP:
            sessions.append([])
        if len(sessions[-1]) < cap:
            sessions[-1].append(item)
        last = t
    return sessions


@pytest.mark.parametrize("sizes", [
    dict(), dict(kernel_size=1, dilations=(1, 1)), dict(kernel_size=2), dict(kernel_size=5, dilations=(4, 8)),
    dict(tcn_channels=(12, 12)), dict(tcn_channels=(5,), dilations=(3,)),
    dict(tcn_channels=(6, 7, 8), dilations=(1, 2, 4)), dict(state_layers=1), dict(max_session_length=1),
    dict(max_session_length=9, kernel_size=4, dilations=(16, 1))])
@pytest.mark.parametrize("batched", [False, True])
def test_scores_before_each_event_equal_the_full_forward(sizes, batched):
    """scores(now=t) before each event equals the full forward's logits for that event, for kernel widths 1..5,
    dilations past the session length, 1 to 3 blocks, blocks without a residual projection, one GRU layer, a
    session cap of 1; single events, or batched with a second user in the same call."""
    model = small_hiertcn(**sizes)
    recommender = StreamingRecommender(model, session_gap=GAP, initial_capacity=1)
    rng = random.Random(0)
    t, events = 100.0, []
    for _ in range(24):
        t += GAP if rng.random() < 0.2 else rng.randint(0, 200)
        item = rng.randint(1, NUM_ITEMS)
        if events:
            got = (recommender.scores_many(["u", "v"], now=t)[0] if batched else recommender.scores("u", now=t))
        counted_before = sum(map(len, sessionize(events, model.max_session_length)))
        events.append((item, t))
        sessions = sessionize(events, model.max_session_length)
        counted = sum(map(len, sessions))
        if len(events) > 1 and counted > counted_before:  # the event is one the model sees
            with torch.no_grad():
                features, _ = model(lane_batch([sessions]), None)
                expected = model.scores(features)[counted - 1]
            torch.testing.assert_close(got[1:].double(), expected[1:], rtol=1e-5, atol=1e-6)
        if batched:
            recommender.observe_many(["u", "v"], [item, item], [t, t])
        else:
            recommender.observe("u", item, t)


# ---- random mixes of every call against one event at a time ------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_random_mixes_of_calls_equal_serving_one_event_at_a_time(seed):
    """Batches of several users (a user several times, new users mid-batch, session gaps inside the batch),
    single events, look-ups with now (per user or batched), forget_users, state_dict into a new recommender,
    export/load of a subset into itself, and deepcopy, in random order: every user's scores and state stay those
    of a recommender fed the same events one at a time through observe_many([user])."""
    rng = random.Random(seed)
    model = small_hiertcn()
    reference = StreamingRecommender(model, session_gap=GAP, initial_capacity=1)
    tested = StreamingRecommender(model, session_gap=GAP, initial_capacity=rng.choice([0, 1, 3]))
    pool, clock = ["a", "b", 3, "d", 5, "f"], {}
    for step in range(120):
        op = rng.random()
        if op < 0.55:
            events, local = [], dict(clock)
            for _ in range(rng.randint(1, 6)):
                user = rng.choice(pool)
                t = local.get(user, rng.choice([0.0, 1000.0, -50.0]))
                r = rng.random()
                t += 2 * GAP if r < 0.2 else GAP if r < 0.25 else float(rng.randint(0, 100))
                local[user] = t
                events.append((user, rng.randint(1, NUM_ITEMS), t))
            for user, item, t in events:
                reference.observe_many([user], [item], [t])
            mode = rng.random()
            if mode < 0.4:
                for user, item, t in events:
                    tested.observe(user, item, t)
            elif mode < 0.7:
                tested.observe_many(*map(list, zip(*events)))
            else:
                users, items, times = zip(*events)
                tested.observe_many(list(users), torch.tensor(items), np.array(times))
            clock.update(local)
        elif op < 0.7 and clock:
            users = [rng.choice(list(clock)) for _ in range(rng.randint(1, 4))]
            now = {u: clock[u] + rng.choice([0.0, 10.0, GAP, 3 * GAP]) for u in users}
            for user in users:
                reference.scores_many([user], now=[now[user]])
            if rng.random() < 0.5:
                for user in users:
                    tested.scores(user, now=now[user])
            else:
                tested.scores_many(users, now=[now[u] for u in users])
            for user in users:
                if now[user] - clock[user] >= GAP:
                    clock[user] = now[user]
        elif op < 0.75 and clock:
            users = list({rng.choice(list(clock)) for _ in range(2)})
            reference.forget_users(users)
            tested.forget_users(users)
            for user in users:
                del clock[user]
        elif op < 0.8 and clock:
            how = rng.random()
            if how < 0.3:
                tested = copy.deepcopy(tested)
            elif how < 0.6:
                restored = StreamingRecommender(model, session_gap=GAP, initial_capacity=rng.choice([0, 1]))
                restored.load_state_dict(tested.state_dict())
                tested = restored
            else:
                tested.load_state_dict(tested.export_users(list({rng.choice(list(clock)) for _ in range(2)})))
        if clock:
            assert set(tested.user_slot) == set(reference.user_slot), step
            assert_same_users(tested, reference, list(clock), exact=False)


def test_empty_batches_are_served_and_change_nothing():
    recommender = StreamingRecommender(small_hiertcn(), session_gap=GAP)
    recommender.observe_many(["a", "b"], [1, 2], [0.0, 0.0])
    before = per_user(recommender, ["a", "b"])
    assert recommender.scores_many([]).shape == (0, NUM_ITEMS + 1)
    assert recommender.scores_many([], now=5.0).shape == (0, NUM_ITEMS + 1)
    ids, scores = recommender.recommend_many([], k=3)
    assert ids.shape == scores.shape == (0, 3)
    recommender.observe_many(np.array([]), np.array([], dtype=np.int64), np.array([]))
    recommender.observe_many(torch.tensor([]), torch.tensor([], dtype=torch.int64), torch.tensor([]))
    recommender.forget_users([])
    recommender.load_state_dict(recommender.export_users([]))
    assert list(recommender.user_slot) == ["a", "b"]
    for key, value in per_user(recommender, ["a", "b"]).items():
        for a, b in zip(value if isinstance(value, list) else [value], before[key] if isinstance(value, list)
                        else [before[key]]):
            assert torch.equal(a, b), key


def test_a_forgotten_user_comes_back_as_a_new_user():
    """After forget_users the user is unknown (look-ups refused), its old times no longer order its events, and
    its next events give exactly what a recommender that never saw it gives, on both paths."""
    model = small_hiertcn()
    recommender = StreamingRecommender(model, session_gap=GAP, initial_capacity=1)
    for n, (item, t) in enumerate([(3, 5000.0), (4, 5060.0), (5, 9000.0)]):
        recommender.observe("a", item, t)
        recommender.observe_many(["b"], [item + 1], [t])
    recommender.scores("a")
    recommender.forget_users(["a"])
    with pytest.raises(KeyError, match="unknown user"):
        recommender.recommend("a")
    with pytest.raises(KeyError, match="unknown user"):
        recommender.scores_many(["b", "a"], now=1e6)
    fresh = StreamingRecommender(model, session_gap=GAP)
    for r in (recommender, fresh):
        r.observe("a", 7, 10.0)  # earlier than its forgotten events: a new user's first event
        r.observe("a", 8, 20.0)
        r.observe_many(["a", "a"], [9, 10], [30.0, 30.0 + GAP])
    assert_same_users(recommender, fresh, ["a"])


def test_state_dict_survives_torch_save_with_weights_only():
    model = small_hiertcn()
    recommender = StreamingRecommender(model, session_gap=GAP)
    users = ["a", ("t", 1), 7]
    recommender.observe_many(users, [1, 2, 3], [0.0, 0.0, 5.0])
    buffer = io.BytesIO()
    torch.save(recommender.state_dict(), buffer)
    buffer.seek(0)
    restored = StreamingRecommender(model, session_gap=GAP)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_users(restored, recommender, users)


# ---- calls interrupted part way, then more serving -----------------------------------------------------------------

def _with_history():
    recommender = StreamingRecommender(small_hiertcn(), session_gap=GAP, initial_capacity=2)
    for user, item, t in [("a", 3, 100.0), ("a", 4, 160.0), ("b", 5, 100.0), ("c", 9, 100.0), ("c", 10, 130.0)]:
        recommender.observe(user, item, t)
    recommender.observe("a", 5, 170.0)  # the row view of "a" made and its backup taken
    return recommender


def _flat(recommender):
    users = list(recommender.user_slot)
    out = []
    for key, value in per_user(recommender, users).items():
        out += [(key, t.clone()) for t in (value if isinstance(value, list) else [value])]
    return users, out


def _same(a, b):
    return a[0] == b[0] and all(torch.equal(x, y) for (_, x), (_, y) in zip(a[1], b[1], strict=True))


def _follow_up(recommender):
    """More serving after the call, on both paths: what a stale cached context or row view would get wrong."""
    out = []
    try:
        for user, item, t in [("a", 7, 2e6), ("a", 8, 2e6 + 10), ("b", 9, 2e6), ("c", 1, 3e6), ("n2", 2, 3e6)]:
            if user in recommender.user_slot or user == "n2":
                recommender.observe(user, item, t)
                out.append(recommender.scores(user, now=t + 5.0).clone())
        for user in ("a", "b", "c"):
            if user in recommender.user_slot:
                out.append(recommender.scores(user, now=4e6).clone())
                recommender.observe_many([user, user], [3, 4], [4e6 + 1, 4e6 + 2])
                out.append(recommender.scores(user).clone())
    except Exception as error:  # compared as text with the uninterrupted recommender's
        out.append(repr(error))
    return out


@pytest.mark.parametrize("label", ["observe, closing", "scores_many, now"])
def test_interrupted_calls_leave_caches_that_serve_like_an_uninterrupted_recommender(label):
    """Interrupted before any line of the recommender's (and its row views') code, a call leaves the state before
    or after it, and further single and batched events then give exactly what an uninterrupted recommender in that
    state gives (no row view context, scratch context or prepared step left stale)."""
    call = {"observe, closing": lambda r: r.observe("a", 6, 5000.0),
            "scores_many, now": lambda r: r.scores_many(["a", "c"], now=1e6)}[label]
    codes = set()
    for cls in (StreamingRecommender, serve._RowView):
        for value in vars(cls).values():
            function = inspect.unwrap(value) if callable(value) else None
            if hasattr(function, "__code__"):
                codes.add(function.__code__)
    before = _flat(_with_history())
    done = _with_history()
    call(done)
    after = _flat(done)
    expected = {"before": _follow_up(_with_history()), "after": _follow_up(done)}
    n = 1
    while (where := interrupted_at_line(codes, n, call, recommender := _with_history())) is not None:
        now = _flat(recommender)
        which = "before" if _same(now, before) else "after" if _same(now, after) else None
        assert which, f"interrupted at {where}: left between"
        got = _follow_up(recommender)
        assert len(got) == len(expected[which]), (where, got[-1:])
        for a, b in zip(got, expected[which]):
            assert type(a) is type(b) and (a == b if isinstance(a, str) else torch.equal(a, b)), where
        n += 1
    assert n > 40


# ---- defects found by this file, fixed -----------------------------------------------------------------------------

@pytest.mark.parametrize("failure", ["interrupt", "out of memory"])
def test_a_first_single_event_failing_while_taking_its_backup_leaves_the_user_servable(monkeypatch, failure):
    """_RowView.keep listed what it writes before it copied the backup: a first backup that failed (a Ctrl-C, out of
    memory) left the list without its backup, and every later single event of the user failed ("Tensor list must
    have at least one tensor"). The state itself was unchanged, as now."""
    model = small_hiertcn()
    recommender, plain = StreamingRecommender(model, session_gap=GAP), StreamingRecommender(model, session_gap=GAP)
    for r in (recommender, plain):
        r.observe("a", 3, 100.0)  # a new user: the batched path, no row view yet
    before = _flat(recommender)
    if failure == "interrupt":
        with interrupt_at(serve._RowView.keep, "self.backup = [t.clone()") as fired:
            with pytest.raises(KeyboardInterrupt):
                recommender.observe("a", 4, 160.0)
        assert fired
    else:
        real_keep, real_mode = serve._RowView.keep, serve._storage_mode

        def out_of_memory():
            raise RuntimeError("CPU out of memory (simulated)")

        def keep(self):  # the backup's allocation fails, once
            monkeypatch.setattr(serve, "_storage_mode", out_of_memory)
            try:
                return real_keep(self)
            finally:
                monkeypatch.setattr(serve, "_storage_mode", real_mode)

        with monkeypatch.context() as patch:
            patch.setattr(serve._RowView, "keep", keep)
            with pytest.raises(RuntimeError, match="out of memory"):
                recommender.observe("a", 4, 160.0)
    assert _same(_flat(recommender), before)  # (holds: the state itself is unchanged)
    for r in (recommender, plain):
        r.observe("a", 4, 160.0)
        r.observe("a", 5, 220.0)
    assert_same_users(recommender, plain, ["a"])


def test_load_state_dict_takes_user_ids_in_a_tensor_by_value():
    """load_state_dict took saved["users"] as list(...), not by value as every other call takes ids: users given
    in a tensor were registered under 0-d tensors (which hash by identity), unreachable (KeyError) and never
    forgotten, and a user listed twice was not refused."""
    model = small_hiertcn()
    source = StreamingRecommender(model, session_gap=GAP)
    source.observe_many([7, 8], [1, 2], [0.0, 0.0])
    saved = dict(source.state_dict(), users=torch.tensor([7, 8]))
    restored = StreamingRecommender(model, session_gap=GAP)
    restored.load_state_dict(saved)
    assert 7 in restored.user_slot and 8 in restored.user_slot
    assert restored.recommend(7, k=3) == source.recommend(7, k=3)


def test_load_state_dict_keeps_user_ids_in_a_numpy_array_as_plain_numbers():
    """The same cause: users in a NumPy array were registered as numpy.int64, so every later state_dict() failed
    torch.load(..., weights_only=True)."""
    model = small_hiertcn()
    source = StreamingRecommender(model, session_gap=GAP)
    source.observe_many([7, 8], [1, 2], [0.0, 0.0])
    restored = StreamingRecommender(model, session_gap=GAP)
    restored.load_state_dict(dict(source.state_dict(), users=np.array([7, 8])))
    buffer = io.BytesIO()
    torch.save(restored.state_dict(), buffer)
    buffer.seek(0)
    again = StreamingRecommender(model, session_gap=GAP)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    assert [type(user) for user in again.user_slot] == [int, int]


def test_load_state_dict_of_tensors_that_require_grad_keeps_plain_storage():
    """load_state_dict ran with autograd on: a saved tensor that required grad made the recommender's storage a
    non-leaf with a grad_fn, and copy.deepcopy of the recommender failed."""
    model = small_hiertcn()
    source = StreamingRecommender(model, session_gap=GAP)
    source.observe_many(["a"], [1], [0.0])
    saved = source.state_dict()
    saved["state"] = saved["state"].clone().requires_grad_()
    restored = StreamingRecommender(model, session_gap=GAP)
    restored.load_state_dict(saved)
    assert not restored.state.requires_grad
    copied = copy.deepcopy(restored)
    torch.testing.assert_close(copied.scores("a"), source.scores("a"), rtol=0, atol=0)


def test_a_missing_item_id_is_a_type_error_naming_items():
    """None (or a generator) where item ids belong reached torch.as_tensor: "RuntimeError: Could not infer dtype of
    NoneType", naming no argument."""
    recommender = StreamingRecommender(small_hiertcn(), session_gap=GAP)
    recommender.observe("a", 3, 1.0)
    with pytest.raises(TypeError, match="items must be .*, got None"):
        recommender.observe("a", None, 5.0)
    with pytest.raises(TypeError, match="items must be .*, got None"):
        recommender.observe_many(["a", "b"], [4, None], [5.0, 6.0])
    with pytest.raises(TypeError, match="items must be .* in a list, tuple, tensor or array, got a generator"):
        recommender.observe_many(["a"], (item for item in [4]), [5.0])
    with pytest.raises(TypeError, match="timestamps must be .*, got None"):
        recommender.observe("a", 4, None)
    before = _flat(recommender)
    saved = StreamingRecommender(recommender.model, session_gap=GAP)
    saved.observe_many([7, 8], [1, 2], [0.0, 0.0])
    with pytest.raises(ValueError, match="more than once"):  # (ids in a tensor are taken by value: 7 twice)
        recommender.load_state_dict(dict(saved.state_dict(), users=torch.tensor([7, 7])))
    assert _same(_flat(recommender), before) and list(recommender.user_slot) == ["a"]
