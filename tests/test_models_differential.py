"""Differential tests of the neural models against slow, obviously-correct re-implementations.

Each reference is written from the models' docstrings and HIERTCN.md, event by event and user by user, with
plain torch ops on the model's own parameters (so gradients flow into the same tensors):

- the start token is a zero vector, the inputs of a session of n events are [0, emb(x_1), ..., emb(x_{n-1})];
- TCN blocks: a dense causal conv (F.conv1d on the input left-padded by (k - 1) * d zeros), ReLU, then
  ReLU(conv + residual), the residual a linear projection when channel counts differ or the block has context;
  HierTCN's first block reads concat(emb(x_t), s) at every step (s the user state, layer-major), zero-padded
  as a whole;
- the high-level GRU reads the mean of the session's item embeddings after the session, nn.GRU's gate
  equations written out; state zeroed after a user's last session (keep) and at lanes that do not continue;
- HRNN: session GRU from tanh(W s_top + b), its state after the session's last item updates the user GRU;
- HierGRU: a session GRU from zero over concat(emb(x_t), s); SessionGRU: a GRU from zero, no user state;
- HistoryTCN: the TCN over [0, x_1, ..., x_{N-1}] of each user's concatenated (truncated) sessions.

The model's features and scores for every event of every batch of a random epoch (state carried between
batches as train._Source does) are compared with the per-user reference, which knows nothing of lanes.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiertcn_fast.data import LaneStateCache, SessionBatch, SessionBatcher
from hiertcn_fast.evaluate import batch_targets
from hiertcn_fast.models import HRNN, HierGRU, HierTCN, HistoryBatch, HistoryTCN, SessionGRU, UserHistoryBatcher
from hiertcn_fast.models import base as models_base
from model_helpers import synthetic_cache, one_thread  # noqa: F401 (autouse fixture)

TOL = dict(rtol=1e-9, atol=1e-10)
SESSION_MODELS = ["hiertcn", "hiergru", "hrnn", "session_gru"]
STATEFUL = ["hiertcn", "hiergru", "hrnn"]


@pytest.fixture(scope="module")
def cold_cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("fuzz_cold"), num_events=1500, num_items=40, seed=5)


@pytest.fixture(scope="module")
def warm_lane_cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("fuzz_warm_lanes"), num_events=6000, num_items=40, seed=6,
                           split="warm")


def make(name, num_items, max_session_length=6, seed=0):
    torch.manual_seed(seed)
    if name == "hiertcn":
        model = HierTCN(num_items, embedding_dim=5, state_layers=2, state_hidden=3, tcn_channels=(4, 4, 6),
                        kernel_size=3, max_session_length=max_session_length)
    elif name == "hiergru":
        model = HierGRU(num_items, embedding_dim=5, state_layers=2, state_hidden=3, session_hidden=4,
                        session_layers=2, max_session_length=max_session_length)
    elif name == "hrnn":
        model = HRNN(num_items, embedding_dim=5, user_layers=2, user_hidden=3, session_hidden=4,
                     max_session_length=max_session_length)
    elif name == "session_gru":
        model = SessionGRU(num_items, embedding_dim=5, hidden=4, layers=2, max_session_length=max_session_length)
    else:
        model = HistoryTCN(num_items, embedding_dim=5, channels=(4, 4, 6), kernel_size=3,
                           max_session_length=max_session_length)
    model = model.double().eval()
    with torch.no_grad():  # away from initialisation's symmetries: every parameter random, biases included
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
        model.item_embedding.weight[0].zero_()
    return model


# ---- the references ------------------------------------------------------------------------------------------

def gru_cell_ref(x, h, w_ih, w_hh, b_ih, b_hh):
    """nn.GRUCell's equations (gate order r, z, n; reset applied to W_hn h + b_hn)."""
    i_r, i_z, i_n = (x @ w_ih.T + b_ih).chunk(3, -1)
    h_r, h_z, h_n = (h @ w_hh.T + b_hh).chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def gru_stack_step(gru, x, h):
    """One step of a multi-layer GRU: x (in,), h (layers, hidden) -> (layers, hidden)."""
    states, inp = [], x
    for layer in range(gru.num_layers):
        inp = gru_cell_ref(inp, h[layer], getattr(gru, f"weight_ih_l{layer}"), getattr(gru, f"weight_hh_l{layer}"),
                           getattr(gru, f"bias_ih_l{layer}"), getattr(gru, f"bias_hh_l{layer}"))
        states.append(inp)
    return torch.stack(states)


def gru_sequence(gru, xs, h0):
    """xs (T, in), h0 (layers, hidden) -> top layer outputs (T, hidden)."""
    outputs, h = [], h0
    for t in range(xs.shape[0]):
        h = gru_stack_step(gru, xs[t], h)
        outputs.append(h[-1])
    return torch.stack(outputs)


def causal_conv_ref(x, weight, bias, dilation):
    """x (T, in) -> (T, out): F.conv1d over x left-padded with (k - 1) * dilation zeros."""
    pad = (weight.shape[2] - 1) * dilation
    return F.conv1d(F.pad(x.T[None], (pad, 0)), weight, bias, dilation=dilation)[0].T


def tcn_ref(tcn, x, context=None):
    """x (T, in), context (ctx,) or None -> (T, channels[-1])."""
    for i, block in enumerate(tcn.blocks):
        conv = block.conv
        if i == 0 and context is not None:
            inp = torch.cat([x, context.expand(x.shape[0], -1)], dim=1)
            weight = torch.cat([conv.weight, conv.context_weight], dim=1)
        else:
            inp, weight = x, conv.weight
        inner = torch.relu(causal_conv_ref(inp, weight, conv.bias, conv.dilation))
        if block.projection is None:
            residual = x
        elif i == 0 and context is not None:
            residual = F.linear(inp, torch.cat([block.projection.weight, block.context_projection.weight], dim=1),
                                block.projection.bias)
        else:
            residual = F.linear(x, block.projection.weight, block.projection.bias)
        x = torch.relu(inner + residual)
    return x


def session_ref(name, model, items, h):
    """One session of ``items`` (list of ids, n >= 1) from user state h ((layers, hidden) or None) ->
    (features (n, feature_dim), state after the session (before the keep mask))."""
    emb = model.item_embedding.weight
    index = torch.tensor(items, dtype=torch.int64)
    embedded = emb[index]                                                      # (n, E)
    inputs = torch.cat([torch.zeros_like(embedded[:1]), embedded[:-1]])        # start token, x_1..x_{n-1}
    if name == "hiertcn":
        s = h.reshape(-1)                                                      # layer 0, then layer 1
        features = tcn_ref(model.tcn, inputs, s)
        return features, gru_stack_step(model.state_gru, embedded.mean(0), h)
    if name == "hiergru":
        s = h.reshape(-1)
        gru = model.session_gru
        h0 = torch.zeros(gru.num_layers, gru.hidden_size, dtype=emb.dtype)
        features = gru_sequence(gru, torch.cat([inputs, s.expand(inputs.shape[0], -1)], dim=1), h0)
        return features, gru_stack_step(model.state_gru, embedded.mean(0), h)
    if name == "hrnn":
        h0 = torch.tanh(F.linear(h[-1], model.session_init.weight, model.session_init.bias))[None]
        outputs = gru_sequence(model.session_gru, torch.cat([inputs, embedded[-1:]]), h0)  # n + 1 steps
        return outputs[:-1], gru_stack_step(model.user_gru, outputs[-1], h)
    gru = model.session_gru
    h0 = torch.zeros(gru.num_layers, gru.hidden_size, dtype=emb.dtype)
    return gru_sequence(gru, inputs, h0), None


def user_sessions(cache, split, max_session_length):
    """{user: [(session id, truncated item list), ...]} for the split, from the cache's arrays directly."""
    code = cache.split_code(split)
    session_split = np.asarray(cache.session_split)
    offsets = np.asarray(cache.session_offsets)
    user_offsets = np.asarray(cache.user_session_offsets)
    item = np.asarray(cache.item)
    result = {}
    for user in range(user_offsets.shape[0] - 1):
        sessions = [s for s in range(user_offsets[user], user_offsets[user + 1]) if session_split[s] == code]
        if sessions:
            result[user] = [(s, item[offsets[s]:offsets[s + 1]][:max_session_length].tolist()) for s in sessions]
    return result


def per_user_reference(name, model, cache, split):
    """{(session id, position): features} with every user's state starting from zero."""
    reference = {}
    layers_hidden = model.state_shape
    for user, sessions in user_sessions(cache, split, model.max_session_length).items():
        h = None if layers_hidden is None else torch.zeros(*layers_hidden, dtype=torch.float64)
        for session, items in sessions:
            features, h = session_ref(name, model, items, h)
            for t in range(len(items)):
                reference[(session, t)] = features[t]
    return reference


def lane_reference(name, model, batch, state):
    """A lane batch from ``state`` (layers, lanes, hidden) or None, lane by lane, step by step ->
    (features in batch_targets' order, final state)."""
    steps, lanes = batch.lengths.shape
    per_lane, finals = {}, []
    for b in range(lanes):
        h = None if state is None else state[:, b]
        for j in range(steps):
            n = int(batch.lengths[j, b])
            if n > 0:
                features, new_h = session_ref(name, model, batch.items[j, b, 1:n + 1].tolist(), h)
                per_lane[(j, b)] = features
                h = new_h
            if h is not None:
                h = h * batch.keep[j, b].to(h.dtype)
        finals.append(h)
    rows = [per_lane[(j, b)] for j in range(steps) for b in range(lanes) if (j, b) in per_lane]
    features = torch.cat(rows) if rows else None
    return features, (None if state is None else torch.stack(finals, dim=1))


def history_reference(model, cache, split, context_splits=()):
    """{(user, position in the split's events): features}: the TCN over each user's whole concatenated history
    (context splits' sessions first)."""
    reference = {}
    max_length = model.max_session_length
    split_sessions = user_sessions(cache, split, max_length)
    context = [user_sessions(cache, s, max_length) for s in context_splits]
    emb = model.item_embedding.weight
    for user, sessions in split_sessions.items():
        before = sorted([x for c in context for x in c.get(user, [])])
        history = [i for _, items in before for i in items]
        events = [i for _, items in sessions for i in items]
        full = history + events
        inputs = torch.cat([torch.zeros_like(emb[:1]), emb[torch.tensor(full[:-1], dtype=torch.int64)]])
        features = tcn_ref(model.tcn, inputs)
        for t in range(len(events)):
            reference[(user, t)] = features[len(history) + t]
    return reference


# ---- helpers -------------------------------------------------------------------------------------------------

def run_epoch(model, batcher):
    """The model over every batch of one epoch, state carried as train._Source carries it: [(batch, features)]."""
    cache = None
    if model.state_shape is not None:
        cache = LaneStateCache(*model.state_shape[:1], batcher.lanes, model.state_shape[1], dtype=torch.float64)
    results = []
    with torch.no_grad():
        for batch in batcher:
            state = None if cache is None else cache.reset_lanes(batch.continues).clone()
            features, new_state = model(batch, state)
            if cache is not None:
                cache.store(new_state)
            results.append((batch, features))
    return results


def event_keys(batch):
    """(session id, position) of every event of a lane batch, in batch_targets' order."""
    mask = batch_targets(batch)["mask"]
    step, lane, position = torch.nonzero(mask, as_tuple=True)
    return list(zip(batch.session[step, lane].tolist(), position.tolist()))


def replace_fields(batch, **fields):
    tensors = batch.tensors()
    tensors.update(fields)
    return SessionBatch.from_tensors(tensors, batch.epoch, batch.index)


def permute_lanes(batch, order):
    tensors = {name: (t[order] if name == "continues" else t if name == "step_widths" else t[:, order])
               for name, t in batch.tensors().items()}
    return SessionBatch.from_tensors(tensors, batch.epoch, batch.index)


def batches_of(cache, split, model, lanes, steps, seed):
    batcher = SessionBatcher(cache, split, lanes=lanes, sessions_per_batch=steps,
                             max_session_length=model.max_session_length, shuffle=True, seed=seed)
    return batcher


@pytest.fixture(params=[64, 0], ids=["default_groups", "forced_groups"])
def group_overhead(request, monkeypatch):
    """Run with the default length grouping and with grouping forced (no per-group overhead)."""
    monkeypatch.setattr(models_base, "GROUP_OVERHEAD_POSITIONS", request.param)
    return request.param


# ---- the tests -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SESSION_MODELS)
@pytest.mark.parametrize("split,lanes,steps,max_length", [("test", 4, 3, 6), ("train", 7, 4, 20)])
def test_epoch_equals_per_user_reference(cold_cache, name, split, lanes, steps, max_length, group_overhead):
    """Every event of a shuffled epoch of lane batches (state carried between batches, lanes reset at user
    boundaries) equals the per-user, event-by-event reference, features and scores over all items."""
    model = make(name, cold_cache.num_items, max_session_length=max_length)
    batcher = batches_of(cold_cache, split, model, lanes, steps, seed=3)
    with torch.no_grad():
        reference = per_user_reference(name, model, cold_cache, split)
        seen = set()
        for batch, features in run_epoch(model, batcher):
            keys = event_keys(batch)
            assert features.shape == (len(keys), model.output.in_features)
            expected = torch.stack([reference[k] for k in keys])
            torch.testing.assert_close(features, expected, **TOL)
            torch.testing.assert_close(model.scores(features),
                                       F.linear(expected, model.output.weight, model.output.bias), **TOL)
            seen.update(keys)
    assert seen == set(reference)


@pytest.mark.parametrize("name", SESSION_MODELS)
def test_batch_with_random_state_equals_lane_reference_and_gradients(cold_cache, name, group_overhead):
    """One batch (mid-epoch: some lanes continue, some users end inside it; and the epoch's last one, with
    empty lanes) from a random initial state: features, final state and the gradients of a loss through them
    (every parameter and the initial state) equal the lane-by-lane reference's."""
    model = make(name, cold_cache.num_items, max_session_length=8)
    batcher = batches_of(cold_cache, "train", model, 5, 3, seed=4)
    generator = torch.Generator().manual_seed(1)
    for index in (1, batcher.num_batches() - 1):
        batch = batcher.batch(index)
        state = None
        if model.state_shape is not None:
            layers, hidden = model.state_shape
            state = torch.randn(layers, 5, hidden, dtype=torch.float64, generator=generator).requires_grad_()
        targets = batch_targets(batch)["targets"]
        params = [p for p in model.parameters()]
        results = []
        for run in (lambda: model(batch, state), lambda: lane_reference(name, model, batch, state)):
            features, final = run()
            loss = F.cross_entropy(model.scores(features), targets, reduction="sum")
            weight = None
            if final is not None:
                weight = torch.linspace(-1, 1, final.numel(), dtype=torch.float64).view_as(final)
                loss = loss + (final * weight).sum()
            wrt = params + ([state] if state is not None else [])
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
            results.append((features.detach(), None if final is None else final.detach(), grads))
        (f_model, s_model, g_model), (f_ref, s_ref, g_ref) = results
        torch.testing.assert_close(f_model, f_ref, **TOL)
        if s_ref is not None:
            torch.testing.assert_close(s_model, s_ref, **TOL)
        names = [n for n, _ in model.named_parameters()] + ["initial state"]
        for label, a, b in zip(names, g_model, g_ref):
            a = torch.zeros_like(b) if a is None and b is not None else a
            b = torch.zeros_like(a) if b is None and a is not None else b
            if a is None:
                continue
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"batch {index}: gradient of {label}")


def _garbage_batch(batch, num_items, generator, extra_columns=3):
    """``batch`` with every padded item (beyond each session's length, including invalid lanes and extra
    columns past the batch's width) replaced by random item ids; start tokens stay 0."""
    steps, lanes, time = batch.items.shape
    items = torch.cat([batch.items, torch.zeros(steps, lanes, extra_columns, dtype=torch.int64)], dim=2)
    position = torch.arange(time + extra_columns)
    padded = (position > batch.lengths[..., None]) & (position > 0)
    noise = torch.randint(1, num_items + 1, items.shape, generator=generator)
    return replace_fields(batch, items=torch.where(padded, noise, items))


@pytest.mark.parametrize("name", SESSION_MODELS)
def test_padding_and_empty_lanes_never_reach_valid_outputs(cold_cache, name, group_overhead):
    """Random ids at padded positions and in empty lanes, and a random initial state in lanes that hold no
    session in the batch: bitwise-equal features at every event, and equal final states in the other lanes."""
    model = make(name, cold_cache.num_items, max_session_length=7)
    batcher = batches_of(cold_cache, "test", model, 6, 3, seed=5)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for index in range(batcher.num_batches()):
            batch = batcher.batch(index)
            state = None
            empty = ~batch.valid.any(0)
            if model.state_shape is not None:
                state = torch.randn(model.state_shape[0], 6, model.state_shape[1], dtype=torch.float64,
                                    generator=generator)
            base, base_state = model(batch, state)
            for trial in range(2):
                other_state = None
                if state is not None:
                    other_state = torch.where(empty[None, :, None], torch.randn(state.shape, generator=generator,
                                                                                dtype=torch.float64), state)
                features, final = model(_garbage_batch(batch, cold_cache.num_items, generator), other_state)
                assert torch.equal(features, base), f"batch {index}, trial {trial}"
                if state is not None:
                    assert torch.equal(final[:, ~empty], base_state[:, ~empty])
                    assert (final[:, empty] == 0).all()  # keep is False where a lane holds no session


@pytest.mark.parametrize("name", SESSION_MODELS)
def test_lanes_are_independent_under_permutation(cold_cache, name, group_overhead):
    """Permuting the lanes of a batch (and of its initial state) permutes the events and the final state."""
    model = make(name, cold_cache.num_items, max_session_length=20)
    batcher = batches_of(cold_cache, "train", model, 6, 4, seed=6)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for index in (0, 2, batcher.num_batches() - 1):
            batch = batcher.batch(index)
            state = None
            if model.state_shape is not None:
                state = torch.randn(model.state_shape[0], 6, model.state_shape[1], dtype=torch.float64,
                                    generator=generator)
            order = torch.randperm(6, generator=generator)
            features, final = model(batch, state)
            permuted = permute_lanes(batch, order)
            p_features, p_final = model(permuted, None if state is None else state[:, order])
            # Map each event of the permuted batch to its event in the original one.
            keys = event_keys(batch)
            where = {k: i for i, k in enumerate(keys)}
            p_keys = event_keys(permuted)
            torch.testing.assert_close(p_features, features[[where[k] for k in p_keys]], **TOL)
            if final is not None:
                torch.testing.assert_close(p_final, final[:, order], **TOL)


@pytest.mark.parametrize("name", STATEFUL)
def test_extra_empty_lane_changes_nothing(cold_cache, name, group_overhead):
    """Adding a lane with no session (garbage items, random state) leaves every other lane's events and state."""
    model = make(name, cold_cache.num_items, max_session_length=20)
    batcher = batches_of(cold_cache, "train", model, 4, 3, seed=7)
    generator = torch.Generator().manual_seed(4)
    batch = batcher.batch(1)
    layers, hidden = model.state_shape
    state = torch.randn(layers, 4, hidden, dtype=torch.float64, generator=generator)
    steps, _, time = batch.items.shape
    wide = {}
    for field, t in batch.tensors().items():
        if field == "step_widths":
            wide[field] = t
        elif field == "continues":
            wide[field] = torch.cat([t, torch.ones(1, dtype=torch.bool)])
        elif field == "items":
            junk = torch.randint(1, cold_cache.num_items + 1, (steps, 1, time), generator=generator)
            junk[..., 0] = 0
            wide[field] = torch.cat([t, junk], dim=1)
        elif field in ("user", "session"):
            wide[field] = torch.cat([t, torch.full((steps, 1), -1, dtype=torch.int64)], dim=1)
        else:
            wide[field] = torch.cat([t, torch.zeros(steps, 1, dtype=t.dtype)], dim=1)
    wide_batch = SessionBatch.from_tensors(wide, batch.epoch, batch.index)
    wide_state = torch.cat([state, torch.randn(layers, 1, hidden, dtype=torch.float64, generator=generator)], dim=1)
    with torch.no_grad():
        features, final = model(batch, state)
        w_features, w_final = model(wide_batch, wide_state)
    torch.testing.assert_close(w_features, features, **TOL)
    torch.testing.assert_close(w_final[:, :4], final, **TOL)


@pytest.mark.parametrize("split,context_splits,users", [("train", (), 5), ("test", (), 3),
                                                         ("test", ("train", "valid"), 4)])
def test_history_tcn_equals_causal_stack_over_each_history(cold_cache, warm_lane_cache, split, context_splits,
                                                           users):
    """HistoryTCN's features (and scores) at every predicted event equal the causal conv stack over the user's
    concatenated history; context events are read, not predicted."""
    cache = warm_lane_cache if context_splits else cold_cache
    model = make("history_tcn", cache.num_items, max_session_length=6)
    batcher = UserHistoryBatcher(cache, split, users_per_batch=users, max_session_length=model.max_session_length,
                                 shuffle=True, seed=2, context_splits=context_splits)
    with torch.no_grad():
        reference = history_reference(model, cache, split, context_splits)
        seen = set()
        for batch in batcher:
            features, state = model(batch)
            assert state is None
            mask = batch.targets()["mask"]
            row, position = torch.nonzero(mask, as_tuple=True)
            context = batch.context_lengths if batch.context_lengths is not None else torch.zeros_like(batch.lengths)
            keys = list(zip(batch.user[row].tolist(), (position - context[row]).tolist()))
            expected = torch.stack([reference[k] for k in keys])
            torch.testing.assert_close(features, expected, **TOL)
            torch.testing.assert_close(model.scores(features),
                                       F.linear(expected, model.output.weight, model.output.bias), **TOL)
            seen.update(keys)
            if context_splits:
                assert (context > 0).all()  # every warm user reads earlier events it does not predict
    assert seen == set(reference)


def test_history_tcn_padding_rows_and_gradients(cold_cache):
    """Padding beyond each user's length never reaches the features (bitwise); permuting the users permutes the
    features; gradients through the model equal the reference's."""
    model = make("history_tcn", cold_cache.num_items, max_session_length=20)
    batcher = UserHistoryBatcher(cold_cache, "train", users_per_batch=4, shuffle=True, seed=1, by_length=False)
    generator = torch.Generator().manual_seed(5)
    batch = batcher.batch(0)
    with torch.no_grad():
        base, _ = model(batch)
        users, time = batch.items.shape
        items = torch.cat([batch.items, torch.zeros(users, 4, dtype=torch.int64)], dim=1)
        first = torch.cat([batch.first_in_session, torch.zeros(users, 4, dtype=torch.bool)], dim=1)
        padded = torch.arange(time + 4) > batch.lengths[:, None]
        noise = torch.randint(1, cold_cache.num_items + 1, items.shape, generator=generator)
        garbage = HistoryBatch(torch.where(padded, noise, items), batch.lengths, first, batch.user, 0, 0)
        features, _ = model(garbage)
        assert torch.equal(features, base)
        order = torch.randperm(users, generator=generator)
        permuted, _ = model(batch.rows(order))
        mask = batch.targets()["mask"]
        index = torch.full(mask.shape, -1, dtype=torch.int64)
        index[mask] = torch.arange(int(mask.sum()))
        torch.testing.assert_close(permuted, base[index[order][mask[order]]], **TOL)
    targets = batch.targets()["targets"]
    params = list(model.parameters())
    features, _ = model(batch)
    g_model = torch.autograd.grad(F.cross_entropy(model.scores(features), targets, reduction="sum"), params)
    emb = model.item_embedding.weight
    rows = []
    for u in range(users):
        n = int(batch.lengths[u])
        inputs = torch.cat([torch.zeros_like(emb[:1]), emb[batch.items[u, 1:n]]])
        rows.append(tcn_ref(model.tcn, inputs))
    expected = torch.cat(rows)
    torch.testing.assert_close(features.detach(), expected.detach(), **TOL)
    g_ref = torch.autograd.grad(F.cross_entropy(model.scores(expected), targets, reduction="sum"), params)
    for (label, _), a, b in zip(model.named_parameters(), g_model, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=label)


@pytest.mark.parametrize("name", SESSION_MODELS)
@pytest.mark.parametrize("split", ["valid", "test"])
def test_warm_split_from_earlier_splits_equals_per_user_reference(warm_lane_cache, name, split):
    """The warm evaluation path (evaluate: one user per lane, the state built over the user's earlier splits, then
    the split from it) equals the per-user reference over all of the user's sessions in time order."""
    from hiertcn_fast.train import EARLIER_SPLITS, _split_users, user_lane_batches

    cache = warm_lane_cache
    model = make(name, cache.num_items, max_session_length=7)
    sessions = {}
    for s in EARLIER_SPLITS[split] + (split,):
        for user, user_list in user_sessions(cache, s, model.max_session_length).items():
            sessions.setdefault(user, []).extend(user_list)
    reference, count = {}, 0
    with torch.no_grad():
        for user, user_list in sessions.items():
            h = None if model.state_shape is None else torch.zeros(*model.state_shape, dtype=torch.float64)
            for session, items in sorted(user_list):
                features, h = session_ref(name, model, items, h)
                for t in range(len(items)):
                    reference[(session, t)] = features[t]
        for chosen, batch in user_lane_batches(cache, (split,), _split_users(cache, split), 3,
                                               model.max_session_length):
            state = None
            if model.state_shape is not None:
                (_, history), = user_lane_batches(cache, EARLIER_SPLITS[split], chosen, chosen.shape[0],
                                                  model.max_session_length)
                _, state = model(history, None)
            features, _ = model(batch, state)
            expected = torch.stack([reference[k] for k in event_keys(batch)])
            torch.testing.assert_close(features, expected, **TOL)
            count += features.shape[0]
    assert count > 10


@pytest.mark.parametrize("name", SESSION_MODELS + ["history_tcn"])
@pytest.mark.parametrize("update", ["adam", "fused_adam", "sgd", "in_place", "load_state_dict"])
def test_parameter_updates_between_forwards_are_seen(cold_cache, name, update):
    """Forwards (with and without gradients) fill the ops' weight caches; after an optimizer step, an in-place
    change or a load_state_dict the next forward equals the reference on the new parameters."""
    model = make(name, cold_cache.num_items, max_session_length=20)
    if name == "history_tcn":
        batch = UserHistoryBatcher(cold_cache, "train", users_per_batch=4).batch(0)
        targets = batch.targets()["targets"]
    else:
        batch = batches_of(cold_cache, "train", model, 4, 3, seed=1).batch(0)
        targets = batch_targets(batch)["targets"]
    with torch.no_grad():
        model(batch)
    features, _ = model(batch)
    if update in ("adam", "fused_adam", "sgd"):
        optimizer = (torch.optim.SGD(model.parameters(), lr=0.5) if update == "sgd"
                     else torch.optim.Adam(model.parameters(), lr=0.1, fused=update == "fused_adam"))
        F.cross_entropy(model.scores(features), targets).backward()
        optimizer.step()
    elif update == "in_place":
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(1.5).add_(0.1)
            model.item_embedding.weight[0].zero_()
    else:
        model.load_state_dict(make(name, cold_cache.num_items, max_session_length=20, seed=9).state_dict())
    with torch.no_grad():
        after, _ = model(batch)
        if name == "history_tcn":
            emb = model.item_embedding.weight
            expected = torch.cat([tcn_ref(model.tcn, torch.cat([torch.zeros_like(emb[:1]),
                                                                emb[batch.items[u, 1:int(batch.lengths[u])]]]))
                                  for u in range(batch.items.shape[0])])
        else:
            state = None if model.state_shape is None else torch.zeros(model.state_shape[0], 4, model.state_shape[1],
                                                                       dtype=torch.float64)
            expected, _ = lane_reference(name, model, batch, state)
    assert not torch.allclose(after, features.detach())
    torch.testing.assert_close(after, expected, **TOL)


@pytest.mark.parametrize("name", SESSION_MODELS + ["history_tcn"])
def test_float32_two_threads_medium_sizes(tmp_path_factory, name):
    """float32 models of widths the kernels vectorise (multiples of 8 and not), on two threads and 16 lanes,
    against the float64 reference on the same parameters."""
    import copy

    cache = synthetic_cache(tmp_path_factory.mktemp("fuzz_medium"), num_events=3000, num_items=120, seed=7)
    torch.manual_seed(1)
    sizes = {"hiertcn": lambda: HierTCN(cache.num_items, embedding_dim=24, state_layers=2, state_hidden=16,
                                        tcn_channels=(32, 19), kernel_size=5),
             "hiergru": lambda: HierGRU(cache.num_items, embedding_dim=24, state_layers=2, state_hidden=16,
                                        session_hidden=33),
             "hrnn": lambda: HRNN(cache.num_items, embedding_dim=24, user_hidden=16, session_hidden=33),
             "session_gru": lambda: SessionGRU(cache.num_items, embedding_dim=24, hidden=33),
             "history_tcn": lambda: HistoryTCN(cache.num_items, embedding_dim=24, channels=(32, 32, 19))}
    model = sizes[name]().eval()
    double = copy.deepcopy(model).double()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            if name == "history_tcn":
                batcher = UserHistoryBatcher(cache, "train", users_per_batch=16, shuffle=True, seed=1)
                reference = history_reference(double, cache, "train")
                for index in (0, batcher.num_batches() - 1):
                    batch = batcher.batch(index)
                    features, _ = model(batch)
                    row, position = torch.nonzero(batch.targets()["mask"], as_tuple=True)
                    keys = zip(batch.user[row].tolist(), position.tolist())
                    expected = torch.stack([reference[k] for k in keys])
                    torch.testing.assert_close(features.double(), expected, rtol=1e-4, atol=1e-5)
                return
            batcher = batches_of(cache, "train", model, 16, 5, seed=2)
            reference = per_user_reference(name, double, cache, "train")
            state_cache = None
            if model.state_shape is not None:
                state_cache = LaneStateCache(model.state_shape[0], 16, model.state_shape[1])
            for batch in batcher:
                state = None if state_cache is None else state_cache.reset_lanes(batch.continues).clone()
                features, new_state = model(batch, state)
                if state_cache is not None:
                    state_cache.store(new_state)
                expected = torch.stack([reference[k] for k in event_keys(batch)])
                torch.testing.assert_close(features.double(), expected, rtol=1e-4, atol=1e-5)
    finally:
        torch.set_num_threads(threads)


def test_hiertcn_close_sessions_is_the_gru_step_on_the_session_mean(cold_cache):
    """HierTCN.close_sessions (the streaming high-level step) from a running sum and count equals the GRU step on
    the session mean; context_of is the layer-major concatenation the TCN reads."""
    model = make("hiertcn", cold_cache.num_items)
    generator = torch.Generator().manual_seed(8)
    layers, hidden = model.state_shape
    state = torch.randn(layers, 5, hidden, dtype=torch.float64, generator=generator)
    sessions = [torch.randint(1, cold_cache.num_items + 1, (n,), generator=generator).tolist() for n in (1, 2, 3, 5, 8)]
    emb = model.item_embedding.weight
    with torch.no_grad():
        sums = torch.stack([emb[torch.tensor(s)].sum(0) for s in sessions])
        counts = torch.tensor([len(s) for s in sessions])
        new_state = model.close_sessions(sums, counts, state)
        for u, items in enumerate(sessions):
            _, expected = session_ref("hiertcn", model, items, state[:, u])
            torch.testing.assert_close(new_state[:, u], expected, **TOL)
            torch.testing.assert_close(model.context_of(state)[u], state[:, u].reshape(-1))
