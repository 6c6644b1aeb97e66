"""Fuzzed differential tests of hiertcn_fast.serve.StreamingRecommender against an independent peer.

The peer keeps each user's raw events, cuts them into sessions by the preprocessing's rule (a gap >= session_gap
to the previous event, dropped events included, starts a session; a session keeps its first max_session_length
events), and runs a full forward pass of a copy of the model built on the ``reference`` backend (plain PyTorch)
over exactly that user's history. The documented contract (serve.py's docstring, README "Training, evaluation,
serving"): every recommendation equals that full forward pass.

What the existing serving tests (test_serve.py, test_serve_differential.py, test_py_mutants_serve_queue.py) do not
cover and this file does: many interleaved users on random small architectures against the reference forward
(equal timestamps, gaps at session_gap and one second either side, sessions past the receptive field and the
session cap, single-event sessions, users reappearing after a long gap, the first and last item ids), a session
cap given to the recommender that differs from the model's, look-ups with ``now`` of many users at once against
the peer, refused calls (bad ids, bad k, unknown users, out-of-order times) injected into a stream and checked by
continuing that stream against a twin that never saw them and against the peer, save/restore at random points
through torch.save into a fresh recommender, top-k under exact ties, parameters that require grad, a model handed
over in training mode, and the models that cannot be served.
"""

import io
import math
import random

import numpy as np
import pytest
import torch

from hiertcn_fast.data import SessionBatch
from hiertcn_fast.models import NEURAL_MODELS, RULES, HierTCN
from hiertcn_fast.serve import StreamingRecommender
from model_helpers import one_thread  # noqa: E402,F401  (an autouse fixture: one intra-op thread)


NUM_ITEMS = 13
DUMMY = 1  # the item appended after a user's history to read the prediction of its next event (causal: unread)

# Tiny architectures: (model sizes, session_gap, the recommender's max_session_length (None: the model's), dtype).
ARCHS = {
    # receptive field 1 + 2 + 4 = 7 < session cap 9
    "k3_d12": (dict(embedding_dim=6, state_layers=2, state_hidden=5, tcn_channels=(7, 6), kernel_size=3,
                    dilations=(1, 2), max_session_length=9), 1800.0, None, torch.float64),
    # three blocks, receptive field 4, one GRU layer, cap 12 (a session spans the circular buffers many times)
    "k2_three_blocks": (dict(embedding_dim=5, state_layers=1, state_hidden=4, tcn_channels=(6, 6, 3), kernel_size=2,
                             dilations=(1, 1, 1), max_session_length=12), 1800.0, None, torch.float64),
    # kernel 1: no history at all inside a session
    "k1": (dict(embedding_dim=4, state_layers=2, state_hidden=3, tcn_channels=(5,), kernel_size=1, dilations=(1,),
                max_session_length=5), 1800.0, None, torch.float64),
    # receptive field 13 > the session cap
    "wide_dilation": (dict(embedding_dim=5, state_layers=1, state_hidden=6, tcn_channels=(4,), kernel_size=4,
                           dilations=(4,), max_session_length=6), 1800.0, None, torch.float64),
    # the recommender's cap below the model's, and a fractional session gap
    "cap_override_lower": (dict(embedding_dim=6, state_layers=2, state_hidden=4, tcn_channels=(5, 5), kernel_size=3,
                                dilations=(1, 3), max_session_length=10), 7.5, 3, torch.float64),
    # the recommender's cap above the model's
    "cap_override_higher": (dict(embedding_dim=4, state_layers=1, state_hidden=5, tcn_channels=(6,), kernel_size=2,
                                 dilations=(2,), max_session_length=2), 1800.0, 11, torch.float64),
    # one counted event per session
    "cap1": (dict(embedding_dim=5, state_layers=2, state_hidden=3, tcn_channels=(4, 4), kernel_size=3,
                  dilations=(1, 2), max_session_length=1), 1800.0, None, torch.float64),
    # float32 serving against the float64 reference forward
    "float32": (dict(embedding_dim=8, state_layers=2, state_hidden=6, tcn_channels=(8, 7), kernel_size=3,
                     dilations=(1, 2), max_session_length=7), 1800.0, None, torch.float32),
}


def build(name, seed=0):
    sizes, gap, serve_cap, dtype = ARCHS[name]
    torch.manual_seed(1000 + seed)
    model = HierTCN(NUM_ITEMS, **sizes).to(dtype).eval()
    with torch.no_grad():  # biases away from zero, so that a wrong row or a missed step shows in the scores
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.item_embedding.weight[0].zero_()
    cap = sizes["max_session_length"] if serve_cap is None else serve_cap
    return model, gap, serve_cap, cap


def reference_copy(model):
    """The same weights in float64 on the reference backend: the peer's model."""
    sizes = dict(embedding_dim=model.item_embedding.embedding_dim, state_layers=model.state_gru.num_layers,
                 state_hidden=model.state_gru.hidden_size,
                 tcn_channels=[block.conv.out_channels for block in model.tcn.blocks],
                 kernel_size=model.tcn.blocks[0].conv.kernel_size,
                 dilations=[block.conv.dilation for block in model.tcn.blocks],
                 max_session_length=model.max_session_length)
    peer = HierTCN(model.num_items, backend="reference", **sizes).double().eval()
    peer.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return peer


def sessionize(events, gap, cap):
    sessions, last = [], None
    for item, t in events:
        if last is None or t - last >= gap:
            sessions.append([])
        if len(sessions[-1]) < cap:
            sessions[-1].append(item)
        last = t
    return sessions


class Peer:
    """Each user's raw events and whether an idle look-up closed its last session; logits by the full forward."""

    def __init__(self, model, gap, cap):
        self.model, self.gap, self.cap = reference_copy(model), gap, cap
        self.events, self.closed, self.clock = {}, {}, {}
        self._cache = {}

    def observe(self, user, item, t):
        assert t >= self.clock.get(user, -math.inf)  # the driver's own bookkeeping
        self.events.setdefault(user, []).append((int(item), float(t)))
        self.closed[user] = False
        self.clock[user] = float(t)

    def look_up(self, user, now=None):
        """What scores(user, now) answers: the forward's prediction of the user's next event."""
        if now is not None and not self.closed[user] and now - self.events[user][-1][1] >= self.gap:
            self.closed[user] = True
            self.clock[user] = max(self.clock[user], float(now))
        return self.logits(user)

    def logits(self, user):
        key = (user, len(self.events[user]), self.closed[user])
        if key not in self._cache:
            sessions = sessionize(self.events[user], self.gap, self.cap)
            if self.closed[user]:
                sessions.append([DUMMY])
            else:
                sessions[-1].append(DUMMY)
            with torch.no_grad():
                features, _ = self.model(SessionBatch.of_sessions(sessions), None)
                self._cache[key] = self.model.scores(features)[-1]
        return self._cache[key]


def tolerance(model):
    return dict(rtol=1e-5, atol=1e-5) if model.output.weight.dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)


def assert_scores_match_peer(got, want, model, msg=""):
    assert got.shape == (NUM_ITEMS + 1,), msg
    assert got[0].item() == -math.inf, msg
    torch.testing.assert_close(got[1:].double(), want[1:], **tolerance(model), msg=msg)


def assert_valid_top_k(ids, scores, k, tol, msg=""):
    """``ids`` (a list) is a top-k of ``scores`` (num_items + 1,), best first: k distinct catalogue ids, scores
    non-increasing, none left out scoring higher (within ``tol``: the peer's rounding differs)."""
    ids = [int(i) for i in ids]
    assert len(ids) == k and len(set(ids)) == k, (msg, ids)
    assert all(1 <= i <= NUM_ITEMS for i in ids), (msg, ids)
    chosen = scores[ids].double()
    assert bool((chosen[:-1] >= chosen[1:] - tol).all()), (msg, ids, chosen)
    left = sorted(set(range(1, NUM_ITEMS + 1)) - set(ids))
    if left:
        assert chosen.min().item() >= scores[left].double().max().item() - tol, (msg, ids)


def per_user(recommender, users):
    saved = recommender.export_users(users)
    out = {}
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            out[key] = [value]
        elif isinstance(value, list) and key != "users":
            out[key] = value
    return out


def assert_same_state(got, want, users, exact=False, msg=""):
    """Per-user tensors of ``users`` equal in both recommenders (bitwise, or to rounding)."""
    a, b = per_user(got, users), per_user(want, users)
    for key in b:
        for x, y in zip(a[key], b[key]):
            if exact or not x.is_floating_point():
                assert torch.equal(x, y), (msg, key)
            else:
                tol = 1e-9 if x.dtype == torch.float64 else 1e-5
                torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=f"{msg} {key}")


# ---- the stream -------------------------------------------------------------------------------------------------

USERS = ["ann", 7, ("t", 2), "bo", 0, "cy"]


class Stream:
    """Random events per user: equal timestamps, gaps of session_gap - 1 / session_gap / session_gap + 1, bursts
    past the session cap, users reappearing after a long gap, the first and last item ids."""

    def __init__(self, rng, gap, cap):
        self.rng, self.gap, self.cap = rng, gap, cap
        self.burst = {}
        self.previous_item = {}
        # every edge at least once, early on (then at random)
        self.forced = [0.0, gap - 1.0, gap, gap + 1.0, 1e7, gap, gap - 1.0, 0.0]

    def next_time(self, user, clock):
        rng, gap = self.rng, self.gap
        if user not in clock:
            return rng.choice([0.0, -500.0, 1.7e9, 123.25])
        last = clock[user]
        if self.burst.get(user, 0) > 0:
            self.burst[user] -= 1
            return last + rng.choice([0.0, 1.0, 0.5 * gap])
        if self.forced and rng.random() < 0.5:
            return last + self.forced.pop()
        r = rng.random()
        if r < 0.12:
            self.burst[user] = self.cap + rng.randint(2, 6)
        if r < 0.2:
            return last  # the same timestamp
        if r < 0.5:
            return last + rng.choice([1.0, 0.25 * gap, gap - 2.0])
        if r < 0.62:
            return last + gap - 1.0
        if r < 0.74:
            return last + gap
        if r < 0.84:
            return last + gap + 1.0
        if r < 0.9:
            return last + 1e7  # back after a long time away
        return last + rng.uniform(0, 3 * gap)

    def next_item(self, user):
        r = self.rng.random()
        if r < 0.12:
            item = 1
        elif r < 0.24:
            item = NUM_ITEMS
        elif r < 0.34 and user in self.previous_item:
            item = self.previous_item[user]
        else:
            item = self.rng.randint(1, NUM_ITEMS)
        self.previous_item[user] = item
        return item

    def events(self, clock, count):
        """``count`` events (users may repeat; times non-decreasing per user), advancing ``clock`` (a copy)."""
        local, out = dict(clock), []
        for _ in range(count):
            user = self.rng.choices(USERS, weights=[5, 3, 2, 1, 1, 1])[0]
            t = self.next_time(user, local)
            local[user] = t
            out.append((user, self.next_item(user), t))
        return out

    def now_for(self, user, last):
        if self.burst.get(user, 0) > 0:  # (an idle look-up would end the burst's session)
            return last + self.rng.choice([0.0, 1.0, self.gap - 1.0])
        return last + self.rng.choice([self.gap - 1.0, self.gap, self.gap + 1.0, 0.0, 1e6, -5.0])


def as_given(rng, users, items, times):
    """The same batch as lists, tuples, NumPy arrays or tensors (users that are not all ints stay a list)."""
    kind = rng.randrange(3)
    if kind == 0:
        return list(users), list(items), list(times)
    if kind == 1:
        return tuple(users), np.array(items, dtype=np.int64), np.array(times, dtype=np.float64)
    return list(users), torch.tensor(items), torch.tensor(times, dtype=torch.float64)


def scalar_forms(rng, user, item, t):
    """One event's arguments as Python, NumPy or tensor scalars (all taken by value)."""
    kind = rng.randrange(4)
    if kind == 1:
        item, t = np.int64(item), np.float64(t)
    elif kind == 2:
        item = torch.tensor(item)
        user = torch.tensor(user) if isinstance(user, int) else user
    elif kind == 3 and isinstance(user, int):
        user = np.int64(user)
    return user, item, t


def feed(rng, recommender, events, batched_ok=True):
    """Events into ``recommender``: one by one through observe(), or in observe_many() batches."""
    if not batched_ok or (len(events) == 1 and rng.random() < 0.5):
        for user, item, t in events:
            recommender.observe(*scalar_forms(rng, user, item, t))
    else:
        recommender.observe_many(*as_given(rng, *zip(*events)))


# ---- streaming == the reference forward, many users, batched == one at a time -----------------------------------

@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_interleaved_users_equal_the_reference_forward_and_batched_equals_single(arch, seed):
    """Random interleaved streams of six users, fed through a random mix of observe / observe_many (``mixed``) and
    one event at a time (``single``); look-ups with and without ``now`` through every look-up call on ``mixed``
    and scores() one user at a time on ``single``: both equal the reference forward over each user's history,
    top-k lists are valid top-k lists of the peer's scores, and batched answers equal one-at-a-time answers."""
    model, gap, serve_cap, cap = build(arch, seed)
    fuzz_against_peer(model, gap, serve_cap, cap, random.Random(seed * 100 + len(arch)), arch, seed)


@pytest.mark.parametrize("backend", ["reference", "mixed_blocks"])
def test_models_on_other_backends_are_served_like_the_reference_forward(backend):
    """The served model on the reference backend (no prepared step), or with its TCN blocks on different backends
    (TCN.step runs block by block), streams like the peer too."""
    model, gap, serve_cap, cap = build("k3_d12", 2)
    sizes = ARCHS["k3_d12"][0]
    served = HierTCN(NUM_ITEMS, backend="reference" if backend == "reference" else None, **sizes).double().eval()
    served.load_state_dict(model.state_dict())
    if backend == "mixed_blocks":
        served.tcn.blocks[1].conv.backend = "reference"
    fuzz_against_peer(served, gap, serve_cap, cap, random.Random(9), backend, 0, steps=50)


def fuzz_against_peer(model, gap, serve_cap, cap, rng, arch, seed, steps=90):
    peer = Peer(model, gap, cap)
    stream = Stream(rng, gap, cap)
    mixed = StreamingRecommender(model, session_gap=gap, max_session_length=serve_cap,
                                 initial_capacity=rng.choice([0, 1, 2]))
    single = StreamingRecommender(model, session_gap=gap, max_session_length=serve_cap, initial_capacity=1)
    tol = tolerance(model)["atol"] * 4
    checks = 0
    for step in range(steps):
        known = list(peer.events)
        if not known or rng.random() < 0.6:
            events = stream.events(peer.clock, rng.randint(1, 5))
            feed(rng, mixed, events)
            feed(rng, single, events, batched_ok=False)
            for user, item, t in events:
                peer.observe(user, item, t)
            continue
        users = rng.sample(known, rng.randint(1, min(3, len(known))))
        nows = None if rng.random() < 0.3 else [stream.now_for(u, peer.clock[u]) for u in users]
        k = rng.choice([1, 3, NUM_ITEMS])
        call = rng.randrange(4)
        if call == 0:
            got_scores = mixed.scores_many(users, now=nows)
            got_ids = None
        elif call == 1:
            ids, values = mixed.recommend_many(users, k=k, now=nows)
            got_scores, got_ids = None, ids.tolist()
            assert ids.dtype == torch.int64 and ids.shape == values.shape == (len(users), k)
        elif call == 2:
            got_scores = torch.stack([mixed.scores(u, now=None if nows is None else nows[i])
                                      for i, u in enumerate(users)])
            got_ids = None
        else:
            got_scores, got_ids = None, [mixed.recommend(u, k=k, now=None if nows is None else nows[i])
                                         for i, u in enumerate(users)]
        for i, user in enumerate(users):
            now = None if nows is None else nows[i]
            msg = f"{arch} seed {seed} step {step} user {user!r} now {now}"
            one = single.scores(user, now=now)
            want = peer.look_up(user, now)
            assert_scores_match_peer(one, want, model, msg)
            if got_scores is not None:
                torch.testing.assert_close(got_scores[i], one, rtol=1e-6, atol=1e-6, msg=msg)
            else:
                assert_valid_top_k(got_ids[i], one, k, 1e-6, msg)
                assert_valid_top_k(got_ids[i], want, k, tol, msg)
                if call == 1:
                    torch.testing.assert_close(values[i], one[ids[i]], rtol=1e-6, atol=1e-6, msg=msg)
            checks += 1
    assert checks >= 10
    users = list(peer.events)
    assert set(mixed.user_slot) == set(single.user_slot) == set(users)
    assert_same_state(mixed, single, users, msg=arch)
    for user in users:  # and after the stream, without now
        assert_scores_match_peer(mixed.scores(user), peer.logits(user), model, f"{arch} end {user!r}")
    assert_stream_reached_the_edges(peer, gap, cap)


def assert_stream_reached_the_edges(peer, gap, cap):
    """The stream held what this file claims to test (a check of the test, not of the package)."""
    deltas, items, lengths = set(), set(), []
    for events in peer.events.values():
        deltas.update(b[1] - a[1] for a, b in zip(events, events[1:]))
        items.update(item for item, _ in events)
        raw, last = [], None
        for _, t in events:
            if last is None or t - last >= gap:
                raw.append(0)
            raw[-1] += 1
            last = t
        lengths += raw
    assert {0.0, gap - 1.0, gap, gap + 1.0, 1e7} <= deltas, sorted(deltas)
    assert {1, NUM_ITEMS} <= items
    assert 1 in lengths and max(lengths) > cap, lengths
    assert len(peer.events) >= 4


# ---- the edges, scripted ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["k3_d12", "k2_three_blocks", "wide_dilation", "cap_override_lower", "cap1"])
@pytest.mark.parametrize("batched", [False, True])
def test_scripted_edges_equal_the_reference_forward_after_every_event(arch, batched):
    """Two users in lock step with equal timestamps: gaps of session_gap - 1 (same session), session_gap and
    session_gap + 1 (new sessions), single-event sessions, a session of 3 * cap + 2 events (past the receptive
    field and the cap, the dropped events still keeping the session open), a return after 1e9 s, items 1 and
    num_items; the scores after every event and look-ups at now = last + gap - 1 / gap / gap + 1."""
    model, gap, serve_cap, cap = build(arch)
    peer = Peer(model, gap, cap)
    recommender = StreamingRecommender(model, session_gap=gap, max_session_length=serve_cap, initial_capacity=1)
    t = 1000.0
    script = [(1, 0.0), (NUM_ITEMS, gap - 1.0), (NUM_ITEMS, 0.0), (2, gap), (1, gap + 1.0), (3, gap),
              (NUM_ITEMS, gap + 1.0)]
    script += [(1 + (i * 5) % NUM_ITEMS, (gap - 1.0) if i % 3 == 0 else 0.0) for i in range(3 * cap + 2)]
    script += [(NUM_ITEMS, 1e9), (1, gap - 1.0), (4, 1.0), (NUM_ITEMS, gap)]
    for n, (item, delta) in enumerate(script):
        t += delta
        users, items = ["p", "q"], [item, NUM_ITEMS + 1 - item]
        if batched:
            recommender.observe_many(users, items, [t, t])
        else:
            for user, it in zip(users, items):
                recommender.observe(user, it, t)
        for user, it in zip(users, items):
            peer.observe(user, it, t)
            assert_scores_match_peer(recommender.scores(user), peer.logits(user), model, f"{arch} event {n} {user}")
    # look-ups at the gap's edges: the first one that is idle closes the session, the later ones change nothing
    for delta in (gap - 1.0, gap, gap + 1.0, gap - 1.0):
        got = (recommender.scores_many(["p", "q"], now=t + delta) if batched
               else torch.stack([recommender.scores(u, now=t + delta) for u in ("p", "q")]))
        for i, user in enumerate(["p", "q"]):
            assert_scores_match_peer(got[i], peer.look_up(user, t + delta), model, f"{arch} now +{delta} {user}")
    assert peer.closed["p"] and peer.closed["q"]
    # the next session's first events, at the time that closed the last one
    for user in ("p", "q"):
        recommender.observe(user, 5, t + gap)
        peer.observe(user, 5, t + gap)
        assert_scores_match_peer(recommender.scores(user), peer.logits(user), model, f"{arch} reopened {user}")


def test_a_duplicated_idle_user_in_one_look_up_is_closed_once():
    """scores_many / recommend_many listing an idle user twice (same now) close its session once: both rows are
    the first-of-session prediction of the peer, and a later look-up without now answers the same."""
    model, gap, serve_cap, cap = build("k3_d12")
    peer = Peer(model, gap, cap)
    recommender = StreamingRecommender(model, session_gap=gap)
    for user, item, t in [("a", 3, 0.0), ("b", 4, 0.0), ("a", 5, 10.0), ("b", 6, 10.0)]:
        recommender.observe(user, item, t)
        peer.observe(user, item, t)
    got = recommender.scores_many(["a", "b", "a"], now=[10.0 + gap, 10.0 + gap - 1.0, 10.0 + gap])
    want = [peer.look_up("a", 10.0 + gap), peer.look_up("b", 10.0 + gap - 1.0)]
    for row, expected in zip(got, [want[0], want[1], want[0]]):
        assert_scores_match_peer(row, expected, model)
    ids, _ = recommender.recommend_many(["b", "b"], k=4, now=10.0 + gap)
    want_b = peer.look_up("b", 10.0 + gap)
    assert ids[0].tolist() == ids[1].tolist()
    assert_valid_top_k(ids[0].tolist(), want_b, 4, 1e-5)
    for user in ("a", "b"):
        assert_scores_match_peer(recommender.scores(user), peer.logits(user), model, user)


# ---- refused calls in the middle of a stream ----------------------------------------------------------------------

def refused_calls(rng, recommender, peer, gap):
    """(name, error, message, call) of calls that must be refused, each built for the current state: a known
    user's event before its time, bad item ids (also on an event that would close a session), bad k (also with a
    now that would close a session), unknown users (also next to known idle users), NaN times."""
    known = list(peer.events)
    u = rng.choice(known)
    last = peer.clock[u]
    idle = last + gap + 1.0
    other = rng.choice(known)
    ok_item = rng.randint(1, NUM_ITEMS)
    calls = [
        ("observe before its time", ValueError, "must not decrease",
         lambda: recommender.observe(u, ok_item, last - 1.0)),
        ("observe_many before its time after a new user", ValueError, "must not decrease",
         lambda: recommender.observe_many(["ghost", u], [ok_item, ok_item], [last, last - 0.5])),
        ("observe_many before its time in the second round", ValueError, "must not decrease",
         lambda: recommender.observe_many([u, u], [ok_item, ok_item], [idle, idle - 1.0])),
        ("item 0", ValueError, "item ids", lambda: recommender.observe(u, 0, idle)),
        ("item -1", ValueError, "item ids", lambda: recommender.observe(u, -1, last)),
        ("item past the catalogue", ValueError, "item ids", lambda: recommender.observe(u, NUM_ITEMS + 1, idle)),
        ("item past the catalogue, batched", ValueError, "item ids",
         lambda: recommender.observe_many([other, u], [ok_item, NUM_ITEMS + 1], [peer.clock[other] + gap, idle])),
        ("item 0 of a new user", ValueError, "item ids", lambda: recommender.observe("ghost", 0, 0.0)),
        ("item 2.0", TypeError, "integer item ids", lambda: recommender.observe(u, 2.0, idle)),
        ("NaN time", ValueError, "finite", lambda: recommender.observe(u, ok_item, float("nan"))),
        ("k 0 with an idle now", ValueError, "k must be", lambda: recommender.recommend(u, k=0, now=idle)),
        ("k -1", ValueError, "k must be", lambda: recommender.recommend(u, k=-1)),
        ("k past the catalogue with an idle now", ValueError, "k must be",
         lambda: recommender.recommend(u, k=NUM_ITEMS + 1, now=idle)),
        ("k past the catalogue, batched", ValueError, "k must be",
         lambda: recommender.recommend_many([u, other], k=NUM_ITEMS + 1, now=idle)),
        ("k 0, batched", ValueError, "k must be", lambda: recommender.recommend_many([u], k=0, now=[idle])),
        ("k 2.0", ValueError, "k must be", lambda: recommender.recommend(u, k=2.0, now=idle)),
        ("k True", ValueError, "k must be", lambda: recommender.recommend(u, k=True, now=idle)),
        ("k None", ValueError, "k must be", lambda: recommender.recommend_many([u], k=None, now=idle)),
        ("unknown user", KeyError, "unknown user", lambda: recommender.recommend("ghost", k=2)),
        ("unknown user with now", KeyError, "unknown user", lambda: recommender.scores("ghost", now=idle)),
        ("unknown user after an idle one", KeyError, "unknown user",
         lambda: recommender.scores_many([u, "ghost"], now=[idle, idle])),
        ("unknown user after an idle one, top-k", KeyError, "unknown user",
         lambda: recommender.recommend_many([u, other, "ghost"], k=2, now=idle)),
        ("NaN now", ValueError, "finite", lambda: recommender.scores(u, now=float("nan"))),
        ("NaN now after an idle user", ValueError, "finite",
         lambda: recommender.scores_many([u, other], now=[idle, float("nan")])),
        ("export of an unknown user", KeyError, "unknown user", lambda: recommender.export_users([u, "ghost"])),
    ]
    return calls


@pytest.mark.parametrize("arch", ["k3_d12", "cap_override_lower", "float32"])
def test_refused_calls_change_nothing_and_the_stream_goes_on_like_the_peer(arch):
    """Between random events, refused calls (each one several times over the stream, single and batched paths)
    raise the documented error and change nothing: no user added, no session closed by a refused look-up's now;
    the stream then continues bitwise like a twin recommender that never saw them, and like the peer."""
    rng = random.Random(7)
    model, gap, serve_cap, cap = build(arch, 3)
    peer = Peer(model, gap, cap)
    stream = Stream(rng, gap, cap)
    tested = StreamingRecommender(model, session_gap=gap, max_session_length=serve_cap, initial_capacity=1)
    twin = StreamingRecommender(model, session_gap=gap, max_session_length=serve_cap, initial_capacity=1)
    tried = set()
    for step in range(110):
        if not peer.events or rng.random() < 0.45:
            events = stream.events(peer.clock, rng.randint(1, 3))
            feed(random.Random(step), tested, events)  # the same calls for both
            feed(random.Random(step), twin, events)
            for user, item, t in events:
                peer.observe(user, item, t)
            continue
        name, error, message, call = rng.choice(refused_calls(rng, tested, peer, gap))
        users_before = list(tested.user_slot)
        with pytest.raises(error, match=message):
            call()
        tried.add(name)
        assert list(tested.user_slot) == users_before, name
        assert_same_state(tested, twin, users_before, exact=True, msg=f"after refused {name!r} at step {step}")
        user = rng.choice(users_before)
        assert_scores_match_peer(tested.scores(user), peer.logits(user), model, f"{arch} after {name!r}")
    assert len(tried) >= 15
    users = list(peer.events)
    assert_same_state(tested, twin, users, exact=True, msg="end")
    for user in users:
        now = peer.clock[user] + gap
        assert_scores_match_peer(tested.scores(user, now=now), peer.look_up(user, now), model, f"end {user!r}")


# ---- saving and restoring ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["k3_d12", "k2_three_blocks", "cap_override_higher", "float32"])
def test_save_and_restore_at_random_points_continue_identically(arch):
    """At random points of a stream (mid-session, past the session cap, right after a look-up closed a session),
    state_dict() through torch.save / torch.load(weights_only=True) into a fresh recommender (other capacity,
    another user already in it), or export_users() of some users into a fresh one; the original and the restored
    recommenders then take the same events and look-ups: the same state bitwise, both like the peer, and an
    event before the time that closed a saved session refused by the restored one too."""
    rng = random.Random(11)
    model, gap, serve_cap, cap = build(arch, 5)
    peer = Peer(model, gap, cap)
    stream = Stream(rng, gap, cap)
    original = StreamingRecommender(model, session_gap=gap, max_session_length=serve_cap, initial_capacity=2)
    restores = 0
    for step in range(60):
        r = rng.random()
        if not peer.events or r < 0.55:
            events = stream.events(peer.clock, rng.randint(1, 4))
            feed(random.Random(step), original, events)
            for user, item, t in events:
                peer.observe(user, item, t)
        elif r < 0.75:
            user = rng.choice(list(peer.events))
            now = stream.now_for(user, peer.clock[user])
            assert_scores_match_peer(original.scores(user, now=now), peer.look_up(user, now), model, f"step {step}")
        else:
            restores += 1
            subset = rng.random() < 0.4
            users = (rng.sample(list(peer.events), rng.randint(1, len(peer.events))) if subset
                     else list(peer.events))
            saved = original.export_users(users) if subset else original.state_dict()
            buffer = io.BytesIO()
            torch.save(saved, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=True)
            restored = StreamingRecommender(model, session_gap=gap, max_session_length=serve_cap,
                                            initial_capacity=rng.choice([0, 1, 5]))
            restored.observe("zz-other", 2, 0.0)
            restored.load_state_dict(loaded)
            assert set(restored.user_slot) == set(users) | {"zz-other"}
            assert_same_state(restored, original, users, exact=True, msg=f"restored at step {step}")
            closed = [u for u in users if peer.closed[u]]
            for user in closed:
                with pytest.raises(ValueError, match="must not decrease"):
                    restored.observe(user, 3, peer.clock[user] - 0.5)
            # both go on with the same events and look-ups of the saved users
            for sub in range(12):
                if rng.random() < 0.7:
                    events = [e for e in stream.events(peer.clock, rng.randint(1, 3)) if e[0] in users]
                    if not events:
                        continue
                    feed(random.Random(sub), original, events)
                    feed(random.Random(sub), restored, events)
                    for user, item, t in events:
                        peer.observe(user, item, t)
                else:
                    user = rng.choice(users)
                    now = stream.now_for(user, peer.clock[user])
                    want = peer.look_up(user, now)
                    a, b = original.scores(user, now=now), restored.scores(user, now=now)
                    assert torch.equal(a, b), f"step {step}.{sub}"
                    assert_scores_match_peer(b, want, model, f"restored, step {step}.{sub}")
            assert_same_state(restored, original, users, exact=True, msg=f"continued after step {step}")
            for user in users:
                assert_scores_match_peer(restored.scores(user), peer.logits(user), model, f"restored {user!r}")
            if not subset:
                original = restored  # go on with the restored one
                original.forget_users(["zz-other"])
    assert restores >= 5


def test_a_state_saved_after_an_idle_close_and_mid_session_restores_both():
    """One user saved right after a look-up closed its session (count 0, its time the closing now), another
    mid-session past the cap: restored into a fresh recommender both go on as the peer says."""
    model, gap, serve_cap, cap = build("k2_three_blocks")
    peer = Peer(model, gap, cap)
    original = StreamingRecommender(model, session_gap=gap)
    t = 50.0
    for n in range(cap + 3):
        for user in ("idle", "busy"):
            original.observe(user, 1 + n % NUM_ITEMS, t)
            peer.observe(user, 1 + n % NUM_ITEMS, t)
        t += 10.0
    original.scores("idle", now=t + gap)
    peer.look_up("idle", t + gap)
    restored = StreamingRecommender(model, session_gap=gap)
    restored.load_state_dict(original.state_dict())
    assert_scores_match_peer(restored.scores("idle"), peer.logits("idle"), model, "idle")
    assert_scores_match_peer(restored.scores("busy"), peer.logits("busy"), model, "busy")
    with pytest.raises(ValueError, match="must not decrease"):
        restored.observe("idle", 2, t + gap - 1.0)
    for user, when in (("idle", t + gap), ("busy", t), ("busy", t + gap - 1.0), ("idle", t + gap)):
        restored.observe(user, NUM_ITEMS, when)
        peer.observe(user, NUM_ITEMS, when)
        assert_scores_match_peer(restored.scores(user), peer.logits(user), model, f"{user} at {when}")


# ---- top-k ties --------------------------------------------------------------------------------------------------

def tied_model():
    """Scores that tie exactly: the output layer's weights zero, its biases in three groups of equal values."""
    model, gap, _, _ = build("k3_d12")
    with torch.no_grad():
        model.output.weight.zero_()
        bias = torch.tensor([5.0] + [1.0 if i % 3 == 0 else (2.0 if i % 3 == 1 else 0.5)
                                     for i in range(1, NUM_ITEMS + 1)], dtype=model.output.bias.dtype)
        model.output.bias.copy_(bias)
    return model, gap, bias


def test_top_k_under_exact_ties_is_ordered_by_item_id_and_batched_equals_single():
    """With every item tied within its group, each recommend(k) for k = 1..num_items is a valid top-k (the higher
    groups whole, scores non-increasing, never the padding id 0 though its bias is the largest) whose ties come in
    the order of the item ids (documented; torch.topk alone made the top k no prefix of the top k + 1), and
    recommend_many gives each user the list recommend gives."""
    model, gap, bias = tied_model()
    recommender = StreamingRecommender(model, session_gap=gap)
    recommender.observe_many(["a", "b", "c"], [1, NUM_ITEMS, 4], [0.0, 0.0, 0.0])
    expected = bias.clone().float()
    expected[0] = -math.inf
    for user in ("a", "b", "c"):
        assert torch.equal(recommender.scores(user), expected)
    by_score_then_id = sorted(range(1, NUM_ITEMS + 1), key=lambda item: (-float(expected[item]), item))
    for k in range(1, NUM_ITEMS + 1):
        assert recommender.recommend("b", k=k) == by_score_then_id[:k], k
        ids_many, values = recommender.recommend_many(["a", "b", "c"], k=k)
        for row, user in enumerate(["a", "b", "c"]):
            ids = recommender.recommend(user, k=k)
            assert_valid_top_k(ids, expected, k, 0.0, f"k {k}")
            assert ids == ids_many[row].tolist(), (k, user)
            assert torch.equal(values[row], expected[ids_many[row]])
        with_now = recommender.recommend("a", k=k, now=gap * 10)  # closes a's session: still all ties
        assert_valid_top_k(with_now, expected, k, 0.0, f"k {k} now")


# ---- the model: gradients, training mode, models that cannot be served -------------------------------------------

def test_parameters_that_require_grad_are_left_alone_and_nothing_stored_requires_grad():
    """The model's parameters (requires_grad, as a trained model's are) stay bitwise as they were with no .grad,
    even with grad mode on around every call; the stored per-user tensors, the scores and the top-k values do
    not require grad, and the answers equal the peer's."""
    model, gap, serve_cap, cap = build("k3_d12")
    assert all(p.requires_grad for p in model.parameters())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    peer = Peer(model, gap, cap)
    recommender = StreamingRecommender(model, session_gap=gap)
    rng = random.Random(3)
    stream = Stream(rng, gap, cap)
    with torch.enable_grad():
        for step in range(25):
            events = stream.events(peer.clock, rng.randint(1, 3))
            feed(random.Random(step), recommender, events)
            for user, item, t in events:
                peer.observe(user, item, t)
            user = rng.choice(list(peer.events))
            now = stream.now_for(user, peer.clock[user])
            got = recommender.scores(user, now=now)
            assert not got.requires_grad
            assert_scores_match_peer(got, peer.look_up(user, now), model, f"step {step}")
        ids, values = recommender.recommend_many(list(peer.events), k=3, now=1e12)
        assert not values.requires_grad and not ids.requires_grad
    for key, tensors in per_user(recommender, list(peer.events)).items():
        assert not any(t.requires_grad for t in tensors), key
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert torch.equal(p.detach(), before[name]), name


def test_a_model_handed_over_in_training_mode_is_served_in_eval_mode():
    """The constructor puts the model in eval mode (documented: "put in eval mode"), so its dropout is off: the
    answers equal the peer's (which runs without dropout) at every step."""
    sizes, gap, _, _ = ARCHS["k3_d12"]
    torch.manual_seed(4)
    model = HierTCN(NUM_ITEMS, **dict(sizes, dropout=0.5)).double().train()
    recommender = StreamingRecommender(model, session_gap=gap)
    assert not model.training
    peer = Peer(model, gap, sizes["max_session_length"])
    for n, (user, item, t) in enumerate([("a", 2, 0.0), ("a", 3, 5.0), ("b", 4, 5.0), ("a", 5, 5.0 + gap)]):
        recommender.observe(user, item, t)
        peer.observe(user, item, t)
        assert_scores_match_peer(recommender.scores(user), peer.logits(user), model, str(n))


@pytest.mark.parametrize("name", [name for name in NEURAL_MODELS if NEURAL_MODELS[name] is not HierTCN])
def test_models_without_streaming_state_are_refused(name):
    """Only HierTCN has the conv step state and GRU state the recommender keeps: every other neural model is
    refused with a TypeError that names HierTCN."""
    model = NEURAL_MODELS[name](NUM_ITEMS, embedding_dim=4)
    with pytest.raises(TypeError, match="needs a HierTCN"):
        StreamingRecommender(model)


@pytest.mark.parametrize("name", list(RULES))
def test_rule_baselines_are_refused(name):
    with pytest.raises(TypeError, match="needs a HierTCN"):
        StreamingRecommender(RULES[name]())


def test_top_k_of_rows_with_nan_or_ties_never_reads_another_rows_items():
    """A row with a NaN score (it sorts above everything and equals nothing) is ordered by its whole catalogue: the
    NaNs first, then score and id, never the candidates of the row below; tied rows beside it stay in the order of
    the ids (torch.topk alone returns both rows' ties out of id order here)."""
    from hiertcn_fast.serve import _top_k
    scores = torch.tensor([[1.0, math.nan, 1.0, 0.5, 1.0], [2.0, 2.0, 1.0, 1.0, 0.0]])
    values, ids = _top_k(scores, 3)
    assert ids.tolist() == [[1, 0, 2], [0, 1, 2]]
    assert math.isnan(values[0, 0]) and values[0, 1:].tolist() == [1.0, 1.0] and values[1].tolist() == [2.0, 2.0, 1.0]
    values, ids = _top_k(scores[1:], 3)
    assert ids.tolist() == [[0, 1, 2]] and values.tolist() == [[2.0, 2.0, 1.0]]
    wide = torch.zeros(3, 5000)
    wide[0, [4000, 7]] = math.nan
    wide[0, [3, 3000, 1200]] = 1.0
    wide[1, [2500, 5, 1700, 3300]] = 2.0
    wide[2, 9] = math.nan
    for k in (1, 3, 4):
        values, ids = _top_k(wide, k)
        assert ids.tolist() == [[7, 4000, 3, 1200][:k], [5, 1700, 2500, 3300][:k], [9, 0, 1, 2][:k]], k
        assert torch.isnan(values[0, :2]).all() and values[1].tolist() == [2.0] * k and torch.isnan(values[2, 0])
        assert values[0, 2:].tolist() == [1.0] * max(k - 2, 0) and values[2, 1:].tolist() == [0.0] * (k - 1)
    # A prefix: top-k of a NaN row is the first k of its top-(k + 1).
    assert _top_k(wide, 5)[1][:, :4].tolist() == _top_k(wide, 4)[1].tolist()