"""Tests written by a mutation-testing audit of train.py, models/hiertcn.py and models/baselines.py: each kills a
planted bug the rest of the suite let through (named in its docstring), by checking against an independent
computation (plain-torch recomputations of the models from their parameters, a hand-computed schedule, the
definition of a norm), never against the code's own output."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiertcn_fast.evaluate import RankingMetrics, batch_targets
from hiertcn_fast.models import HRNN, HierGRU, HierTCN, SessionGRU, iter_split_events
from hiertcn_fast.train import TrainConfig, Trainer, build_model, evaluate
from conv_helpers import left_padded_conv1d
from gru_helpers import torch_gru_cell
from model_helpers import lane_batch, synthetic_cache, one_thread  # noqa: F401 (autouse fixture)

NUM_ITEMS = 23

# Lanes of sessions (item ids 1..NUM_ITEMS); lane 1 holds two users (its user ends after session 1), and
# lane 2 has fewer sessions than the others (steps without a session there).
SESSIONS = [[[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]],
            [[13, 14], [15, 16, 17, 18, 19, 20], [21, 22, 23]],
            [[3, 9, 17]]]


def _batch(keep_throughout=False):
    """keep_throughout: keep True everywhere, steps without a session included, as user_lane_batches makes them
    (one user per lane): those steps must leave the lane's state as it is."""
    batch = lane_batch(SESSIONS, keep_last=keep_throughout)
    if keep_throughout:
        batch.keep[:] = True
    else:
        batch.keep[1, 1] = False  # lane 1: a new user from step 2 on
    return batch


# ---- plain-torch recomputations ------------------------------------------------------------------

def _gru_layers_step(gru, x, hs):
    """One step of a stacked GRU module: x (in,), hs [layer states] -> new layer states."""
    new = []
    for layer, h in enumerate(hs):
        w = [getattr(gru, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        x = torch_gru_cell(x[None], h[None], *w)[0]  # torch's own GRU cell, one row
        new.append(x)
    return new


def _gru_sequence(gru, xs, hs):
    """A stacked GRU over xs (time, in) from layer states hs: (outputs of the top layer (time, hidden), final states)."""
    outputs = []
    for x in xs:
        hs = _gru_layers_step(gru, x, hs)
        outputs.append(hs[-1])
    return torch.stack(outputs), hs


def _tcn(tcn, x, context):
    """HierTCN's TCN by its definition: block 0 reads concat(x_t, context) at every step."""
    for i, block in enumerate(tcn.blocks):
        conv = block.conv
        if i == 0:
            wide = torch.cat([x, context[None].expand(x.shape[0], -1)], dim=1)
            weight = torch.cat([conv.weight, conv.context_weight], dim=1)
            residual = F.linear(wide, torch.cat([block.projection.weight, block.context_projection.weight], dim=1),
                                block.projection.bias)
        else:
            wide, weight = x, conv.weight
            residual = x if block.projection is None else block.projection(x)
        x = torch.relu(torch.relu(left_padded_conv1d(wide[None], weight, conv.bias, conv.dilation)[0]) + residual)
    return x


def _reference(model, sessions_per_lane, keep):
    """Features (events, d) in batch_targets' order and the final state, recomputed step by step for HierTCN,
    HierGRU and HRNN from their parameters (eval mode: no dropout)."""
    emb = model.item_embedding.weight
    lanes = len(sessions_per_lane)
    steps = max(len(lane) for lane in sessions_per_lane)
    layers, hidden = model.state_shape
    state = [[torch.zeros(hidden, dtype=emb.dtype) for _ in range(layers)] for _ in range(lanes)]
    features = []
    for step in range(steps):
        new_state = []
        for b, lane in enumerate(sessions_per_lane):
            hs = state[b]
            if step >= len(lane):
                new_state.append(hs)
                continue
            items = torch.tensor(lane[step])
            # The start token (zeros), then the session's items but its last.
            inputs = torch.cat([torch.zeros(1, emb.shape[1], dtype=emb.dtype), emb[items[:-1]]])
            context = torch.cat(hs)
            if isinstance(model, HierTCN):
                features.append(_tcn(model.tcn, inputs, context))
            elif isinstance(model, HierGRU):
                wide = torch.cat([inputs, context[None].expand(inputs.shape[0], -1)], dim=1)
                zero = [torch.zeros(model.session_gru.hidden_size, dtype=emb.dtype)] * model.session_gru.num_layers
                features.append(_gru_sequence(model.session_gru, wide, zero)[0])
            else:  # HRNN: the session GRU starts from tanh(W s + b) of the user GRU's top layer
                h0 = torch.tanh(model.session_init(hs[-1]))
                outputs, _ = _gru_sequence(model.session_gru, torch.cat([inputs, emb[items[-1:]]]), [h0])
                features.append(outputs[:-1])
            if isinstance(model, HRNN):
                summary = outputs[-1]  # the session GRU's state after the session's last item
                updated = _gru_layers_step(model.user_gru, summary, hs)
            else:
                updated = _gru_layers_step(model.state_gru, emb[items].mean(0), hs)
            k = float(keep[step][b])
            new_state.append([k * h for h in updated])
        state = new_state
    final = torch.stack([torch.stack([state[b][layer] for b in range(lanes)]) for layer in range(layers)])
    return torch.cat(features), final


def _make(name, **kwargs):
    torch.manual_seed(5)
    if name == "hiertcn":
        model = HierTCN(NUM_ITEMS, embedding_dim=6, state_layers=2, state_hidden=4, tcn_channels=(7, 7),
                        kernel_size=3, dilations=(1, 2), **kwargs)
    elif name == "hiergru":
        model = HierGRU(NUM_ITEMS, embedding_dim=6, state_layers=2, state_hidden=4, session_hidden=5, **kwargs)
    elif name == "hrnn":
        model = HRNN(NUM_ITEMS, embedding_dim=6, user_layers=2, user_hidden=4, session_hidden=5, **kwargs)
    else:
        model = SessionGRU(NUM_ITEMS, embedding_dim=6, hidden=5, **kwargs)
    with torch.no_grad():  # non-zero biases everywhere (Linear/GRU init has them; make sure the state is not tiny)
        for p in model.parameters():
            p.mul_(1.5)
        model.item_embedding.weight[0].zero_()
    return model.double().eval()


@pytest.mark.parametrize("keep_throughout", [False, True])
@pytest.mark.parametrize("name", ["hiertcn", "hiergru", "hrnn"])
def test_forward_equals_a_plain_recomputation_from_the_parameters(name, keep_throughout):
    """Kills: context layers swapped (HierTCN H03, HierGRU B07: the state's layers in the wrong order), the
    carried state replaced by the wrong GRU layer or a zero context, HRNN's session GRU started from the wrong
    user-GRU layer (B02, needs user_layers > 1) or without tanh (B11), HRNN's session summary read one item early
    (B04), HRNN rows without a session updated (B05, seen with keep_throughout), the session mean over padding
    (H09)."""
    model = _make(name)
    batch = _batch(keep_throughout)
    with torch.no_grad():
        features, state = model(batch, None)
        expected_features, expected_state = _reference(model, SESSIONS, batch.keep)
    if keep_throughout:  # lane 2's one session is followed by steps without one: its state is kept
        assert expected_state[:, 2].abs().sum() > 0
    assert features.shape[0] == int(batch_targets(batch)["mask"].sum())
    torch.testing.assert_close(features, expected_features, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(state, expected_state, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["hiertcn", "hiergru", "hrnn"])
def test_a_given_state_is_the_one_the_first_sessions_see(name):
    """Kills: the state passed in ignored (H07); a reference run over the first sessions gives the state."""
    model = _make(name)
    first = [lane[:1] for lane in SESSIONS]
    rest = [lane[1:] for lane in SESSIONS if len(lane) > 1]
    with torch.no_grad():
        _, state = _reference(model, first, torch.ones(1, 3, dtype=torch.bool))
        state = state[:, :2].contiguous()
        batch = lane_batch(rest, keep_last=True)
        features, _ = model(batch, state)
        # The reference from that state: prepend the first sessions, then drop their events.
        full, _ = _reference(model, [lane for lane in SESSIONS[:2]], torch.ones(3, 2, dtype=torch.bool))
    first_events = len(SESSIONS[0][0]) + len(SESSIONS[1][0])
    torch.testing.assert_close(features, full[first_events:], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["hiertcn", "hiergru", "hrnn", "session_gru"])
def test_dropout_acts_on_the_low_level_input_in_training_and_not_in_eval(name):
    """Kills: the low-level network's input dropout removed (H06, B08, B09, B10): in training, with dropout, the
    features (before the output layer, whose dropout is separate) must differ from eval's; in eval they equal the
    dropout-free model's."""
    model = _make(name, dropout=0.5)
    plain = _make(name)
    plain.load_state_dict(model.state_dict())
    batch = _batch()
    with torch.no_grad():
        eval_features, _ = model(batch, None)
        torch.testing.assert_close(eval_features, plain(batch, None)[0], rtol=0, atol=0)
        model.train()
        torch.manual_seed(0)
        train_features, _ = model(batch, None)
    assert not torch.allclose(train_features, eval_features)


def test_close_sessions_is_the_gru_step_on_the_session_mean():
    """Kills: close_sessions dividing the sum by the wrong count (H05) or zeroing the state (H10), and
    context_of with the layers in the wrong order (H04)."""
    model = _make("hiertcn")
    emb = model.item_embedding.weight.detach()
    sessions = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    state = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    total = torch.stack([emb[torch.tensor(s)].sum(0) for s in sessions])
    count = torch.tensor([len(s) for s in sessions])
    with torch.no_grad():
        new = model.close_sessions(total, count, state)
        expected = torch.stack([torch.stack(_gru_layers_step(model.state_gru, emb[torch.tensor(s)].mean(0),
                                                              [state[0, u], state[1, u]])) for u, s in
                                enumerate(sessions)], dim=1)
    torch.testing.assert_close(new, expected, rtol=1e-9, atol=1e-10)
    context = model.context_of(state)
    torch.testing.assert_close(context, torch.cat([state[0], state[1]], dim=1), rtol=0, atol=0)


# ---- the training loop ---------------------------------------------------------------------------

TINY = dict(embedding_dim=16, state_hidden=8, tcn_channels=(16, 16), kernel_size=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("mutants"), num_events=2500, num_items=120)


def _config(**kwargs):
    values = dict(epochs=2, lanes=8, sessions_per_batch=4, learning_rate=1e-2, seed=7, num_producers=0)
    values.update(kwargs)
    return TrainConfig(**values)


def test_gradients_are_clipped_to_the_global_l2_norm(cache):
    """Kills: clipping skipped (T05) or by another norm (T06, max-norm). At every optimizer step the gradient
    the optimizer reads has global L2 norm exactly grad_clip (the unclipped norm is far above it here)."""
    model = build_model("hiertcn", cache.num_items, seed=1, **TINY)
    trainer = Trainer(model, cache, _config(grad_clip=1e-3, max_steps=3), out=None)
    norms = []
    trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: norms.append(
        float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))))
    trainer.train()
    assert len(norms) == 3
    assert norms == pytest.approx([1e-3] * 3, rel=1e-4)


def test_the_optimizer_follows_the_step_schedule(cache, monkeypatch):
    """Kills: the schedule's rate never given to the optimizer (T26). The rate each step runs at, read from the
    optimizer, is 1e-2 * 0.2 ** (milestones passed), progress = (epoch * N + index) / (N * epochs) computed here."""
    model = build_model("session_gru", cache.num_items, seed=1, embedding_dim=8, hidden=8)
    trainer = Trainer(model, cache, _config(epochs=4), out=None)
    positions, rates = [], []
    run_step = trainer._run_step
    monkeypatch.setattr(trainer, "_run_step", lambda batch, total: positions.append((batch.epoch, batch.index))
                        or run_step(batch, total))
    trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: rates.append(
        optimizer.param_groups[0]["lr"]))
    trainer.train()
    assert len(rates) == len(positions) > 8
    per_epoch = {e: sum(1 for p in positions if p[0] == e) for e in range(4)}
    expected = []
    for epoch, index in positions:
        progress = (epoch * per_epoch[epoch] + index) / (per_epoch[epoch] * 4)
        expected.append(1e-2 * 0.2 ** ((progress >= 0.5) + (progress >= 0.75)))
    assert rates == pytest.approx(expected, rel=1e-12)
    assert min(rates) == pytest.approx(4e-4) and max(rates) == pytest.approx(1e-2)


def test_events_per_second_counts_the_events(cache):
    """Kills: events/s counting steps (or padding) instead of events (T16): it is the training split's events
    (as the evaluation stream lists them) times the epochs, over the training seconds."""
    model = build_model("session_gru", cache.num_items, seed=1, embedding_dim=8, hidden=8)
    trainer = Trainer(model, cache, _config(epochs=1), out=None).train()
    events = sum(len(e) for e in iter_split_events(cache, "train"))
    assert trainer.train_seconds > 0
    assert trainer.events_per_second == pytest.approx(events / trainer.train_seconds, rel=1e-12)


def test_the_sampler_is_seeded_from_the_config(cache):
    """Kills: the sampled softmax's generator seeded with a constant (T18): the same seed draws the same
    negatives, another seed other ones."""
    def draws(seed):
        model = build_model("session_gru", cache.num_items, seed=1, embedding_dim=8, hidden=8)
        trainer = Trainer(model, cache, _config(loss="sampled", num_sampled=64, seed=seed), out=None)
        return trainer._draw_sampled()

    assert torch.equal(draws(3), draws(3))
    assert not torch.equal(draws(3), draws(0))


def test_evaluate_runs_the_model_without_dropout(cache):
    """Kills: evaluate() leaving the model in training mode, dropout active (T21): a model with dropout scores
    as the same weights without dropout, and is left in the mode it was in."""
    model = build_model("hiertcn", cache.num_items, seed=1, dropout=0.5, **TINY)
    plain = build_model("hiertcn", cache.num_items, seed=1, **TINY)
    plain.load_state_dict(model.state_dict())
    model.train()
    config = _config()
    noisy, clean = evaluate(model, cache, "test", config), evaluate(plain, cache, "test", config)
    assert model.training
    assert noisy["per_event"] == clean["per_event"]


def test_a_lane_that_starts_a_new_user_starts_from_zero(cache):
    """Kills: the batch's ``continues`` ignored when the lanes' state is taken from the cache (T08). In the
    trainer's own flow the keep mask has already zeroed such a lane (so the mutant is equivalent there); this
    checks the documented reset itself: a non-zero cached state, continues False -> zeros, True -> kept."""
    model = build_model("hiertcn", cache.num_items, seed=1, **TINY)
    trainer = Trainer(model, cache, _config(), out=None)
    source = trainer.source
    source.state_cache.state.copy_(torch.arange(source.state_cache.state.numel(), dtype=torch.float32).view_as(
        source.state_cache.state) + 1)
    cached = source.state_cache.state.clone()
    batch = next(iter(source.batcher))
    continues = torch.zeros(8, dtype=torch.bool)
    continues[::2] = True
    batch.continues = continues
    state = source.begin(batch)
    torch.testing.assert_close(state[:, ::2], cached[:, ::2], rtol=0, atol=0)
    assert not state[:, 1::2].any()


def test_the_loss_curve_is_the_mean_cross_entropy_over_the_items(cache, monkeypatch):
    """Kills: the curve's loss divided by the wrong event count (T30). The first step's loss, recomputed from a copy
    of the untouched model: softmax cross-entropy over the item columns 1..num_items, averaged over the events."""
    model = build_model("hiertcn", cache.num_items, seed=1, **TINY)
    before = copy.deepcopy(model)
    trainer = Trainer(model, cache, _config(max_steps=1), out=None)
    seen = []
    run_step = trainer._run_step
    monkeypatch.setattr(trainer, "_run_step", lambda batch, total: seen.append(batch) or run_step(batch, total))
    trainer.train()
    batch, = seen
    with torch.no_grad():
        features, _ = before(batch, None)
        targets = batch_targets(batch)["targets"]
        expected = F.cross_entropy(before.scores(features)[:, 1:].double(), targets - 1).item()
    assert trainer.curve[0][1] == pytest.approx(expected, rel=1e-5)


def test_warm_test_evaluation_starts_from_the_train_and_valid_sessions(tmp_path):
    """Kills: the warm split's history built from too few earlier splits (T29: the test split's state from the
    valid sessions alone). Recomputed here: each test user's sessions of every split run in time order in one lane
    (one model call per user), only the test sessions' events scored."""
    warm = synthetic_cache(tmp_path / "warm", split="warm")
    model = build_model("hiertcn", warm.num_items, seed=1, **TINY).double()
    result = evaluate(model, warm, "test", _config())
    split = np.asarray(warm.session_split)
    offsets, item = np.asarray(warm.session_offsets), np.asarray(warm.item)
    user_offsets = np.asarray(warm.user_session_offsets)
    codes = [warm.split_code(s) for s in ("train", "valid", "test")]
    metrics = RankingMetrics()
    users = 0
    with torch.no_grad():
        for user in range(len(user_offsets) - 1):
            sessions = np.arange(user_offsets[user], user_offsets[user + 1])
            sessions = sessions[np.isin(split[sessions], codes)]
            if not (split[sessions] == codes[2]).any():
                continue
            users += 1
            earlier_splits = set(split[sessions][split[sessions] != codes[2]].tolist())
            assert earlier_splits == {codes[0], codes[1]}  # (the history holds both earlier splits)
            lane = [item[offsets[s]:offsets[s + 1]][:model.max_session_length].tolist() for s in sessions]
            batch = lane_batch([lane], keep_last=True)
            features, _ = model(batch, None)
            fields = batch_targets(batch)
            step = torch.nonzero(fields["mask"], as_tuple=True)[0]
            scored = torch.from_numpy(split[sessions] == codes[2])[step]
            metrics.update(model.scores(features)[scored].float(), fields["targets"][scored],
                           torch.full((int(scored.sum()),), user), fields["first_in_session"][scored])
    expected = metrics.result()
    assert users >= 1 and expected["counts"] == result["counts"]  # (the synthetic warm test split is small)
    for unit in ("per_user", "per_event"):
        for metric in ("Recall@10", "MRR"):
            assert result[unit]["all"][metric] == pytest.approx(expected[unit]["all"][metric], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["hiertcn", "session_gru"])
def test_the_start_token_stays_zero_through_training(cache, name):
    """Kills: the item embedding built without ``padding_idx=0`` (models/base.py). Row 0 is zeroed at
    construction either way, but without it the start token of every session learns like an item, where the paper
    has a zero start token. After a few Adam steps row 0 must still be exactly zero, while the item rows move."""
    sizes = TINY if name == "hiertcn" else dict(embedding_dim=8, hidden=8)
    model = build_model(name, cache.num_items, seed=1, **sizes)
    before = model.item_embedding.weight.detach().clone()
    Trainer(model, cache, _config(max_steps=3), out=None).train()
    after = model.item_embedding.weight.detach()
    assert not after[0].any() and not before[0].any()
    assert not torch.equal(after[1:], before[1:])
