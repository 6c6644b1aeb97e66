"""Differential tests of the training loop (hiertcn_fast/train.py) against a literal PyTorch training loop.

The peer, written here from the documented contract only:

- the same batches in the same order: the lane generator (``SessionBatcher``, shuffled with the config's seed)
  read by random access, epoch after epoch (the history TCN: ``UserHistoryBatcher``);
- the high-level state carried between batches, detached, and zeroed in a lane whose first session starts a
  new user (derived here from the lanes' user ids, not from the batch's ``continues``);
- the model's forward on the ``reference`` backend in float64 (a float64 copy of the trainer's model);
- the loss: ``F.cross_entropy`` over the item columns 1..num_items (full softmax), or a sampled softmax with
  log-q correction written from its textbook definition (target logit as it is, each draw's logit minus
  log(num_sampled * q), accidental hits masked), over the draws the trainer made, with q recomputed here from
  the training split's event counts;
- the mean over the batch's events, ``torch.nn.utils.clip_grad_norm_``, the step schedule computed by hand
  (divided by lr_gamma at each milestone fraction of the run, with exact rationals), and a plain (not fused)
  ``torch.optim.Adam`` with the config's weight decay.

The trainer runs its own path (fused kernels in float32, fused Adam); losses are compared step by step and
parameters after every step, with float32 tolerances.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hiertcn_fast
from hiertcn_fast.data import SessionBatcher
from hiertcn_fast.models import UserHistoryBatcher
from hiertcn_fast.train import TrainConfig, Trainer, build_model
from model_helpers import one_thread, synthetic_cache  # noqa: F401  (one_thread: an autouse fixture)



SIZES = {
    "hiertcn": dict(embedding_dim=6, state_layers=2, state_hidden=4, tcn_channels=(5, 6), kernel_size=3,
                    dilations=(1, 2), max_session_length=8),
    "hrnn": dict(embedding_dim=6, user_layers=2, user_hidden=4, session_hidden=5, max_session_length=8),
    "hiergru": dict(embedding_dim=5, state_layers=1, state_hidden=4, session_hidden=6, max_session_length=8),
    "session_gru": dict(embedding_dim=6, hidden=5, layers=2, max_session_length=8),
    "history_tcn": dict(embedding_dim=6, channels=(5, 5), kernel_size=2, max_session_length=8),
}

LOSS_RTOL = 5e-6
PARAM_ATOL = 3e-5


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # ~25 training users, ~50 items: a few dozen lane batches per epoch at 4 lanes x 3 sessions.
    return synthetic_cache(tmp_path_factory.mktemp("fuzz_train"), num_events=1500, num_items=60, seed=3)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    # Few users: an epoch is a handful of batches, so several epochs run in a few steps.
    return synthetic_cache(tmp_path_factory.mktemp("fuzz_train_small"), num_events=400, num_items=40, seed=11)


# ---- the peer ---------------------------------------------------------------------------------------

def item_counts(cache) -> np.ndarray:
    """Events per item id in the training split, counted here from the cache's arrays (entry 0: padding)."""
    split = np.asarray(cache.session_split)
    offsets = np.asarray(cache.session_offsets)
    item = np.asarray(cache.item)
    counts = np.zeros(cache.num_items + 1, dtype=np.int64)
    for s in np.flatnonzero(split == cache.split_code("train")):
        np.add.at(counts, item[offsets[s]:offsets[s + 1]].astype(np.int64), 1)
    return counts


def proposal(cache, sampler: str) -> torch.Tensor:
    """q over ids 0..num_items (q[0] = 0): (train count + 1) ** 0.75 or uniform over the items, normalised."""
    if sampler == "unigram":
        weights = (item_counts(cache).astype(np.float64) + 1.0) ** 0.75
    else:
        weights = np.ones(cache.num_items + 1)
    weights[0] = 0.0
    return torch.from_numpy(weights / weights.sum())


def textbook_sampled_softmax(logits_of, targets, sampled, q, num_sampled):
    """Sum over events of -log( exp(s_t) / (exp(s_t) + sum_j [s_j != t] exp(s_j - log(K q_j))) ), one event at a
    time: ``logits_of(ids)`` -> (events, len(ids)) logits."""
    total = 0.0
    all_logits = logits_of(torch.cat([targets, sampled]))      # (events, events + K)
    n = targets.shape[0]
    for i in range(n):
        s_target = all_logits[i, i]
        s_draws = all_logits[i, n:] - torch.log(num_sampled * q[sampled])
        s_draws = s_draws[sampled != targets[i]]
        terms = torch.cat([s_target[None], s_draws])
        total = total + (torch.logsumexp(terms, 0) - s_target)
    return total


def expected_lr(config: TrainConfig, epoch: int, index: int, batches: int) -> float:
    """The documented step schedule: learning_rate divided by lr_gamma at every milestone fraction of the run
    reached, the run's progress at batch ``index`` of ``epoch`` being epoch + index / batches over the epochs (exact
    rationals; a milestone read as the simple fraction it stands for: 0.4 is 2/5, float(7 / 15) is 7/15)."""
    progress = Fraction(epoch, config.epochs) + Fraction(index, batches * config.epochs)
    passed = sum(progress >= Fraction(m).limit_denominator(10_000) for m in config.lr_milestones)
    return config.learning_rate * config.lr_gamma ** passed


def lane_continues(previous, batch) -> torch.Tensor:
    """bool (lanes,): lane b's first session is the same user as the previous batch's last one in that lane."""
    lanes = batch.user.shape[1]
    if previous is None:
        return torch.zeros(lanes, dtype=torch.bool)
    first, last = batch.user[0], previous.user[-1]
    return (first >= 0) & (first == last)


class Peer:
    """A literal training loop over a float64 copy of ``model``."""

    def __init__(self, model, cache, config: TrainConfig):
        self.model = copy.deepcopy(model).double().train()
        self.cache, self.config = cache, config
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate,
                                          weight_decay=config.weight_decay, foreach=False, fused=False)
        max_length = getattr(model, "max_session_length", None)
        if model.input_kind == "sessions":
            self.batcher = SessionBatcher(cache, "train", lanes=config.lanes,
                                          sessions_per_batch=config.sessions_per_batch,
                                          max_session_length=max_length, shuffle=True, seed=config.seed)
        else:
            self.batcher = UserHistoryBatcher(cache, "train", users_per_batch=config.lanes,
                                              max_session_length=max_length, shuffle=True, seed=config.seed)
        self.state = None
        if model.state_shape is not None:
            layers, hidden = model.state_shape
            self.state = torch.zeros(layers, config.lanes, hidden, dtype=torch.float64)
        self.q = proposal(cache, config.sampler) if config.loss == "sampled" else None
        self.losses, self.events, self.positions, self.lrs, self.batches = [], [], [], [], []
        self.params_after, self.grad_norms, self.hits = [], [], 0
        self.continued = []      # per step: lanes whose carried state was kept (and was non-zero)
        self.previous = None

    def positions_of_run(self, max_steps):
        for epoch in range(self.config.epochs):
            batches = self.batcher.num_batches(epoch)
            for index in range(batches):
                if max_steps is not None and len(self.positions) >= max_steps:
                    return
                yield epoch, index, batches

    def run(self, max_steps=None, draws=None):
        draws = list(draws) if draws is not None else None
        for epoch, index, batches in self.positions_of_run(max_steps):
            batch = self.batcher.batch(index, epoch)
            self.positions.append((epoch, index))
            self.batches.append(batch)
            self.step(batch, epoch, index, batches, None if draws is None else draws[len(self.positions) - 1])
        return self

    def step(self, batch, epoch, index, batches, sampled):
        model, config = self.model, self.config
        if model.input_kind == "sessions":
            steps, lanes, time = batch.items.shape
            mask = torch.arange(time - 1) < batch.lengths[..., None]
            targets = batch.items[..., 1:][mask]
        else:
            time = batch.items.shape[1]
            mask = torch.arange(time - 1) < batch.lengths[:, None]
            targets = batch.items[:, 1:][mask]
        events = int(mask.sum())
        assert events == int(batch.lengths.sum())
        state = None
        if self.state is not None:
            if index == 0:
                self.previous = None  # a new epoch: every lane starts a user
            keep = lane_continues(self.previous, batch)
            self.continued.append(bool((keep[None, :, None] & (self.state != 0)).any()))
            state = self.state * keep.to(torch.float64)[None, :, None]
        self.previous = batch
        with hiertcn_fast.use_backend("reference"):
            features, new_state = model(batch, state)
        assert features.dtype == torch.float64 and features.shape[0] == events
        if sampled is None:
            logits = model.output(features)[:, 1:]
            loss_sum = F.cross_entropy(logits, targets - 1, reduction="sum")
        else:
            self.hits += int((sampled[None, :] == targets[:, None]).sum())
            w, b = model.output.weight, model.output.bias
            loss_sum = textbook_sampled_softmax(lambda ids: features @ w[ids].T + b[ids], targets, sampled, self.q,
                                                config.num_sampled)
        lr = expected_lr(config, epoch, index, batches)
        self.optimizer.zero_grad(set_to_none=True)
        (loss_sum / max(events, 1)).backward()
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters() if p.grad is not None))
        self.grad_norms.append(float(norm))
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.state is not None:
            self.state = new_state.detach()
        self.losses.append(loss_sum.item() / max(events, 1))
        self.events.append(events)
        self.lrs.append(lr)
        self.params_after.append({k: v.detach().clone() for k, v in model.named_parameters()})


# ---- the trainer, recorded ----------------------------------------------------------------------

class Recorded:
    """A Trainer run with its batch positions, learning rates, draws and parameters after every step."""

    def __init__(self, model, cache, config: TrainConfig):
        self.trainer = Trainer(model, cache, config, out=None)
        self.positions, self.lrs, self.draws, self.params_after, self.batches = [], [], [], [], []
        trainer = self.trainer
        run_step, draw = trainer._run_step, trainer._draw_sampled

        def recording_step(batch, total_events):
            self.positions.append((batch.epoch, batch.index))
            self.batches.append(batch)
            return run_step(batch, total_events)

        def recording_draw():
            sampled = draw()
            self.draws.append(sampled.clone())
            return sampled

        trainer._run_step = recording_step
        trainer._draw_sampled = recording_draw
        trainer.optimizer.register_step_pre_hook(
            lambda optimizer, args, kwargs: self.lrs.append(optimizer.param_groups[0]["lr"]))
        trainer.optimizer.register_step_post_hook(lambda optimizer, args, kwargs: self.params_after.append(
            {k: v.detach().clone() for k, v in trainer.model.named_parameters()}))

    def run(self):
        self.trainer.train()
        return self


def make_model(name, cache, seed, **extra):
    return build_model(name, cache.num_items, seed=seed, **{**SIZES[name], **extra})


def config_of(**kwargs):
    values = dict(epochs=2, lanes=4, sessions_per_batch=3, learning_rate=1e-2, lr_milestones=(0.5, 0.75),
                  lr_gamma=0.2, grad_clip=5.0, weight_decay=0.0, seed=5, num_producers=0, device="cpu",
                  amp=False, progress_bar=False)
    values.update(kwargs)
    return TrainConfig(**values)


def run_both(name, cache, config, model_seed=1, max_steps=None):
    model = make_model(name, cache, model_seed)
    peer = Peer(model, cache, config)
    if max_steps is not None:
        config = copy.copy(config)
        config.max_steps = max_steps
        peer.config = config
    recorded = Recorded(model, cache, config).run()
    peer.run(max_steps=max_steps, draws=recorded.draws if config.loss == "sampled" else None)
    return recorded, peer


def assert_runs_agree(recorded: Recorded, peer: Peer, loss_rtol=LOSS_RTOL, param_atol=PARAM_ATOL):
    trainer = recorded.trainer
    # The same batches in the same order, and their contents.
    assert recorded.positions == peer.positions
    for ours, theirs in zip(recorded.batches, peer.batches):
        for field in ("items", "lengths"):
            a, b = getattr(ours, field), getattr(theirs, field)
            width = min(a.shape[-1], b.shape[-1])
            assert torch.equal(a[..., :width], b[..., :width]) and not a[..., width:].any() and not b[..., width:].any()
    # Step count, loss curve, events.
    assert [s for s, _ in trainer.curve] == list(range(1, len(peer.losses) + 1))
    got = np.array([loss for _, loss in trainer.curve])
    np.testing.assert_allclose(got, np.array(peer.losses), rtol=loss_rtol, atol=0,
                               err_msg="per-step mean loss differs from the literal loop's")
    assert trainer.train_events == sum(peer.events)
    assert trainer.step == len(peer.losses)
    # The schedule the optimizer ran at.
    np.testing.assert_allclose(recorded.lrs, peer.lrs, rtol=1e-12, atol=0)
    # Parameters after every step.
    assert len(recorded.params_after) == len(peer.params_after)
    for step, (ours, theirs) in enumerate(zip(recorded.params_after, peer.params_after), 1):
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key].double(), theirs[key], rtol=1e-3, atol=param_atol,
                                       msg=lambda m, key=key, step=step: f"{key} after step {step}: {m}")
    # The lane state cache holds the peer's carried state.
    if peer.state is not None:
        torch.testing.assert_close(trainer.source.state_cache.state.double(), peer.state, rtol=1e-3, atol=param_atol)


# ---- the tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hiertcn", "hrnn", "hiergru", "session_gru", "history_tcn"])
def test_full_softmax_steps_match_the_literal_loop(cache, name):
    """A short run: the losses, the rates, the parameters after every step and the final lane state."""
    config = config_of(epochs=2, grad_clip=5.0, weight_decay=0.0, seed=5)
    recorded, peer = run_both(name, cache, config, max_steps=8)
    assert_runs_agree(recorded, peer)
    if peer.state is not None:
        assert any(peer.continued), "no carried (non-zero) state was kept across a batch boundary"


@pytest.mark.parametrize("sampler", ["unigram", "uniform"])
@pytest.mark.parametrize("name", ["hiertcn", "hrnn", "session_gru"])
def test_sampled_softmax_with_log_q_matches_the_textbook_loss(cache, name, sampler):
    """The sampled softmax over the trainer's own draws, recomputed from its definition (target logit as it is,
    draws corrected by log(num_sampled * q) with q from the training counts, accidental hits left out)."""
    config = config_of(loss="sampled", num_sampled=9, sampler=sampler, weight_decay=0.01, seed=2)
    recorded, peer = run_both(name, cache, config, model_seed=4, max_steps=6)
    assert len(recorded.draws) == 6 and all(d.shape == (9,) for d in recorded.draws)
    assert all(int(d.min()) >= 1 and int(d.max()) <= cache.num_items for d in recorded.draws)
    assert peer.hits > 0, "no accidental hit: the masking was not exercised"
    assert_runs_agree(recorded, peer)


@pytest.mark.parametrize("name", ["hiertcn", "hiergru"])
def test_gradient_clipping_active_and_inactive(cache, name):
    """Clipped at every step (the peer's unclipped norm above the bound), disabled (0), and never reached (a huge
    bound): each run equals the literal loop; the last two are the same run."""
    active = config_of(grad_clip=0.02, seed=9)
    clipped, peer = run_both(name, cache, active, max_steps=5)
    assert min(peer.grad_norms) > 0.02
    assert_runs_agree(clipped, peer)

    runs = []
    for clip in (0.0, 1e6):
        recorded, peer = run_both(name, cache, config_of(grad_clip=clip, seed=9), max_steps=5)
        assert max(peer.grad_norms) < 1e6
        assert_runs_agree(recorded, peer)
        runs.append(recorded)
    for a, b in zip(runs[0].params_after, runs[1].params_after):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # Clipping changes the run: after the first step already (Adam's first update is lr * sign(g) wherever the
    # gradient is far above eps, so it shows from the second step on), the clipped run is another one.
    last_clipped, last_free = clipped.params_after[-1], runs[0].params_after[-1]
    assert max(float((last_clipped[k] - last_free[k]).abs().max()) for k in last_free) > 1e-3


@pytest.mark.parametrize("name", ["hiertcn", "session_gru"])
def test_schedule_boundaries_fall_on_their_steps(small_cache, name):
    """Milestones exactly at a step's fraction of the run (an epoch's start, a step inside an epoch) and between two
    steps: the rate drops at exactly those steps, and the whole run (every epoch) equals the literal loop."""
    probe = SessionBatcher(small_cache, "train", lanes=3, sessions_per_batch=2,
                           max_session_length=SIZES[name]["max_session_length"], shuffle=True, seed=4)
    epochs = 3
    n1 = probe.num_batches(1)
    assert n1 >= 3
    # progress of batch i of epoch 1: (1 + i / n1) / 3. Exactly at epoch 1's start, exactly at its batch 2, and
    # half-way between its batches 1 and 2 of epoch 2 (the drop then at batch 2).
    n2 = probe.num_batches(2)
    milestones = (1 / 3, (1 + 2 / n1) / 3, (2 + 1.5 / n2) / 3)
    config = config_of(epochs=epochs, lanes=3, sessions_per_batch=2, lr_milestones=milestones, lr_gamma=0.5,
                       learning_rate=8e-3, seed=4)
    recorded, peer = run_both(name, small_cache, config, model_seed=2)
    assert_runs_agree(recorded, peer)
    rates = dict(zip(recorded.positions, recorded.lrs))
    n0 = probe.num_batches(0)
    assert rates[(0, n0 - 1)] == pytest.approx(8e-3, rel=1e-12)
    assert rates[(1, 0)] == pytest.approx(4e-3, rel=1e-12)
    assert rates[(1, 1)] == pytest.approx(4e-3, rel=1e-12)
    assert rates[(1, 2)] == pytest.approx(2e-3, rel=1e-12)
    assert rates[(2, 1)] == pytest.approx(2e-3, rel=1e-12)
    assert rates[(2, 2)] == pytest.approx(1e-3, rel=1e-12)
    assert recorded.positions[-1] == (2, n2 - 1)


@pytest.mark.parametrize("name", ["hiertcn", "hrnn"])
def test_one_lane_carries_and_resets_the_state_across_batches_and_epochs(small_cache, name):
    """Batches of one lane: users follow one another in the lane, a user's sessions spanning batches (state
    carried, detached) and a new user starting from zero, also at each epoch's start; two full epochs."""
    config = config_of(epochs=2, lanes=1, sessions_per_batch=2, seed=6, grad_clip=1.0)
    recorded, peer = run_both(name, small_cache, config, model_seed=3)
    assert_runs_agree(recorded, peer)
    assert any(peer.continued)
    boundaries = [(lane_continues(a if b.index else None, b)[0].item(), b.index)
                  for a, b in zip([None] + peer.batches[:-1], peer.batches)]
    assert any(c for c, _ in boundaries) and any(not c and i > 0 for c, i in boundaries)
    # The batch's own flag says the same as the users do.
    for previous, batch in zip([None] + peer.batches[:-1], peer.batches):
        assert torch.equal(batch.continues, lane_continues(previous if batch.index else None, batch))


@pytest.mark.parametrize("producers", [0, 2])
def test_epochs_with_drained_lanes_match_the_literal_loop(small_cache, producers):
    """Whole epochs, their last batches with lanes that hold no session at some steps (and whole steps of a lane
    empty), through the batcher in the consuming thread and through the ring queue."""
    config = config_of(epochs=3, lanes=5, sessions_per_batch=3, seed=8, num_producers=producers, weight_decay=0.02)
    recorded, peer = run_both("hiertcn", small_cache, config, model_seed=5)
    assert_runs_agree(recorded, peer)
    assert any(not bool(b.valid.all()) for b in peer.batches)
    assert any(not bool(b.valid[:, lane].any()) for b in peer.batches for lane in range(b.valid.shape[1]))
    assert {e for e, _ in peer.positions} == {0, 1, 2}


def test_events_and_loss_accounting(small_cache):
    """train_events counts the events of every batch; events/s is train_events over train_seconds; the per-epoch
    log line shows the events-weighted mean loss of the epoch's steps and the rate of its last step."""
    import io
    import re

    out = io.StringIO()
    config = config_of(epochs=2, lanes=3, sessions_per_batch=2, seed=1)
    model = make_model("hiergru", small_cache, 7)
    peer = Peer(model, small_cache, config).run()
    trainer = Trainer(model, small_cache, config, name="probe", out=out).train()
    assert trainer.train_events == sum(peer.events) == 2 * peer.batcher.num_events
    assert trainer.train_seconds > 0
    assert trainer.events_per_second == pytest.approx(trainer.train_events / trainer.train_seconds, rel=1e-12)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("[probe] epoch")]
    assert len(lines) == 2
    for epoch, line in enumerate(lines):
        steps = [i for i, (e, _) in enumerate(peer.positions) if e == epoch]
        mean = sum(peer.losses[i] * peer.events[i] for i in steps) / sum(peer.events[i] for i in steps)
        match = re.search(rf"epoch {epoch + 1}/2 step (\d+) loss ([0-9.]+) lr ([0-9.e+-]+)", line)
        assert match, line
        assert int(match.group(1)) == steps[-1] + 1
        assert float(match.group(2)) == pytest.approx(mean, abs=1.5e-4)
        assert float(match.group(3)) == pytest.approx(peer.lrs[steps[-1]], rel=1e-2)


def test_log_every_prints_the_steps_own_loss(small_cache):
    import io
    import re

    out = io.StringIO()
    config = config_of(epochs=1, lanes=2, sessions_per_batch=2, seed=3, log_every=2, max_steps=6)
    model = make_model("session_gru", small_cache, 2)
    peer = Peer(model, small_cache, config).run(max_steps=6)
    Trainer(model, small_cache, config, name="p", out=out).train()
    found = [(int(m.group(1)), float(m.group(2))) for m in re.finditer(r"step (\d+) loss ([0-9.]+)", out.getvalue())]
    assert [s for s, _ in found] == [2, 4, 6]
    for step, loss in found:
        assert loss == pytest.approx(peer.losses[step - 1], abs=1.5e-4)


def test_two_train_calls_equal_one_run(cache):
    """A run stopped by max_steps and continued with a larger max_steps equals the literal loop's uninterrupted
    run: position, lane state, schedule, optimizer moments and the sampler's draws carry over."""
    config = config_of(epochs=2, loss="sampled", num_sampled=6, seed=12, max_steps=3, weight_decay=0.01)
    model = make_model("hiertcn", cache, 8)
    peer = Peer(model, cache, config)
    recorded = Recorded(model, cache, config)
    recorded.run()
    assert recorded.trainer.step == 3
    recorded.trainer.config.max_steps = 7
    recorded.run()
    peer.run(max_steps=7, draws=recorded.draws)
    assert_runs_agree(recorded, peer)


def test_the_config_seed_fixes_the_run_and_another_seed_changes_it(small_cache):
    """Same seed: the same batches, draws and parameters, bit for bit; another seed: another user order."""
    def run(seed):
        config = config_of(epochs=1, lanes=3, sessions_per_batch=2, seed=seed, loss="sampled", num_sampled=5,
                           max_steps=4)
        return Recorded(make_model("hrnn", small_cache, 1), small_cache, config).run()

    a, b, c = run(21), run(21), run(22)
    assert [x for _, x in a.trainer.curve] == [x for _, x in b.trainer.curve]
    assert all(torch.equal(x, y) for x, y in zip(a.draws, b.draws, strict=True))
    for key, value in a.params_after[-1].items():
        assert torch.equal(value, b.params_after[-1][key])
    assert not all(torch.equal(x.items, y.items) for x, y in zip(a.batches, c.batches))
    assert not all(torch.equal(x, y) for x, y in zip(a.draws, c.draws))


FUZZ_NAMES = ["hiertcn", "hrnn", "hiergru", "session_gru", "history_tcn"]


@pytest.mark.parametrize("case", range(10))
def test_fuzz_random_tiny_configs(small_cache, case):
    """Random tiny configurations (fixed seeds): model, lanes (1 included), steps per batch, epochs, milestones,
    gamma, clip (off, active, inactive), weight decay, full or sampled softmax with either proposal, a stop part way."""
    rng = np.random.default_rng([2024, case])
    name = FUZZ_NAMES[case % len(FUZZ_NAMES)]
    loss = "sampled" if rng.random() < 0.4 else "full"
    milestones = tuple(sorted(float(m) for m in rng.uniform(0.05, 0.95, size=int(rng.integers(0, 3)))))
    config = config_of(epochs=int(rng.integers(1, 4)), lanes=int(rng.choice([1, 2, 3, 5])),
                       sessions_per_batch=int(rng.choice([1, 2, 4])),
                       learning_rate=float(rng.choice([3e-3, 1e-2, 2e-2])), lr_milestones=milestones,
                       lr_gamma=float(rng.choice([0.2, 0.5, 1.0])), grad_clip=float(rng.choice([0.0, 0.03, 1e4])),
                       weight_decay=float(rng.choice([0.0, 0.05])), loss=loss,
                       num_sampled=int(rng.integers(3, 12)), sampler=str(rng.choice(["unigram", "uniform"])),
                       seed=int(rng.integers(0, 2 ** 31)))
    max_steps = int(rng.integers(4, 11))
    recorded, peer = run_both(name, small_cache, config, model_seed=int(rng.integers(0, 100)), max_steps=max_steps)
    assert_runs_agree(recorded, peer)
    assert len(peer.losses) == min(max_steps, sum(peer.batcher.num_batches(e) for e in range(config.epochs)))


# ---- bad configurations --------------------------------------------------------------------------

BAD_CONFIGS = [
    ("epochs", 0), ("epochs", 1.5), ("epochs", True), ("lanes", 0), ("lanes", -3), ("lanes", "4"),
    ("sessions_per_batch", 0), ("num_sampled", 0), ("queue_slots", 0), ("num_producers", -1),
    ("log_every", -1), ("checkpoint_every", -2), ("loss", "softmax"), ("loss", None), ("sampler", "zipf"),
    ("learning_rate", 0.0), ("learning_rate", -1e-3), ("learning_rate", "0.01"), ("learning_rate", True),
    ("lr_gamma", 0.0), ("lr_gamma", 1.5), ("lr_gamma", float("inf")), ("grad_clip", -1.0),
    ("grad_clip", float("inf")), ("weight_decay", -0.1), ("lr_milestones", (0.0,)), ("lr_milestones", (1.0,)),
    ("lr_milestones", (0.5, float("nan"))), ("lr_milestones", (0.5, True)), ("lr_milestones", ("0.5",)),
    ("lr_milestones", 3), ("max_steps", -1), ("max_steps", 2.0), ("seed", -5), ("seed", "1"),
    ("amp", 1), ("progress_bar", "yes"), ("device", "gpu0"), ("checkpoint_path", 3.5),
]


@pytest.mark.parametrize("field,value", BAD_CONFIGS, ids=[f"{f}={v!r}" for f, v in BAD_CONFIGS])
def test_bad_config_values_are_errors_naming_the_field(field, value):
    with pytest.raises(ValueError) as error:
        TrainConfig(**{field: value})
    message = str(error.value)
    assert field in message
    if field in ("learning_rate", "lr_gamma", "grad_clip", "weight_decay"):
        # One message covers the four numbers: it must show the offending one with its value.
        assert f"{field}={value!r}" in message, message


def test_good_config_values_are_kept_as_plain_numbers():
    config = TrainConfig(epochs=np.int64(2), lanes=np.int32(3), learning_rate=np.float32(0.5), lr_gamma=1,
                         lr_milestones=[0.25, np.float64(0.5)], grad_clip=0, weight_decay=np.float64(0.0))
    assert type(config.epochs) is int and type(config.lanes) is int and config.lanes == 3
    assert type(config.learning_rate) is float and config.learning_rate == 0.5
    assert type(config.lr_gamma) is float and type(config.grad_clip) is float
    assert config.lr_milestones == (0.25, 0.5) and all(type(m) is float for m in config.lr_milestones)


def test_bf16_autocast_of_the_output_layer_follows_the_literal_loop(cache):
    """amp=True on the CPU: the output layer and the loss under bf16 autocast; the losses stay within bf16's
    rounding of the float64 loop's, over a few steps (full and sampled softmax)."""
    for loss in ("full", "sampled"):
        config = config_of(amp=True, loss=loss, num_sampled=8, seed=3)
        recorded, peer = run_both("hiertcn", cache, config, model_seed=6, max_steps=4)
        assert recorded.trainer.amp
        assert recorded.positions == peer.positions
        np.testing.assert_allclose([l for _, l in recorded.trainer.curve], peer.losses, rtol=2e-2)


# ---- the lane state cache's dtype ----------------------------------------------------------------

# evaluate() of a float64 stateful model on a cold split raised TypeError (its lane state cache was always float32),
# though the warm split and the model's own forward take float64.
def test_evaluate_takes_a_float64_stateful_model_on_the_cold_split(small_cache):
    """evaluate()'s contract asks only that the model be built for the cache's catalogue; a float64 model is
    evaluated on a warm split (the suite does so) and its forward takes a float64 state, but on a cold split the
    lane generator's state cache (train._Source's LaneStateCache) was float32 whatever the model's dtype. The
    float64 model must score as its float32 original does: the same ranks, so the same metrics to the last digit
    but the float64 sums' rounding (a target moving one rank shifts a metric of these 6 events by 1e-3 or more)."""
    from hiertcn_fast.train import evaluate

    model = make_model("hiertcn", small_cache, 3)
    config = config_of(lanes=3, sessions_per_batch=2)
    expected = evaluate(model, small_cache, "test", config)
    got = evaluate(copy.deepcopy(model).double(), small_cache, "test", config)
    for key, value in expected["per_event"]["all"].items():
        assert got["per_event"]["all"][key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
