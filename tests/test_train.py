"""The training loop: it learns, it resumes exactly, its losses and its evaluation events are right."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiertcn_fast.models import iter_split_events
from hiertcn_fast.evaluate import RankingMetrics, batch_targets
from hiertcn_fast.train import (DataMemoryMeter, TrainConfig, Trainer, build_model, evaluate, sampled_softmax_loss,
                                train_item_counts, user_lane_batches)
from model_helpers import synthetic_cache, one_thread  # noqa: F401 (autouse fixture)

TINY = {
    "hiertcn": dict(embedding_dim=16, state_hidden=8, tcn_channels=(16, 16), kernel_size=3),
    "hrnn": dict(embedding_dim=16, user_hidden=8, session_hidden=16),
    "hiergru": dict(embedding_dim=16, state_hidden=8, session_hidden=16),
    "session_gru": dict(embedding_dim=16, hidden=16),
    "history_tcn": dict(embedding_dim=16, channels=(16, 16), kernel_size=3),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("train"))


def config(**kwargs):
    values = dict(epochs=3, lanes=8, sessions_per_batch=4, learning_rate=1e-2, seed=7, num_producers=1)
    values.update(kwargs)
    return TrainConfig(**values)


def epoch_means(trainer):
    """Mean loss of each epoch's steps, from the loss curve (steps per epoch from the batcher)."""
    losses = [loss for _, loss in trainer.curve]
    per_epoch = len(losses) // trainer.config.epochs
    return [np.mean(losses[e * per_epoch:(e + 1) * per_epoch]) for e in range(trainer.config.epochs)]


@pytest.mark.parametrize("name", list(TINY))
def test_training_lowers_the_loss_and_evaluates_every_event(cache, name):
    model = build_model(name, cache.num_items, seed=1, **TINY[name])
    trainer = Trainer(model, cache, config(), name=name, out=None).train()
    means = epoch_means(trainer)
    assert means[-1] < means[0] - 0.3, means
    assert trainer.events_per_second > 0 and trainer.peak_memory_bytes > 0
    assert trainer.train_events == 3 * sum(len(e) for e in iter_split_events(cache, "train"))
    quality = evaluate(model, cache, "test", config())
    stream_events = sum(len(e) for e in iter_split_events(cache, "test"))
    assert quality["counts"]["events"] == stream_events
    # Far better than chance (10 / 300 items) on the synthetic log's planted structure.
    assert quality["per_event"]["all"]["Recall@10"] > 0.1


@pytest.mark.parametrize("name", ["hiertcn", "history_tcn"])
def test_resume_equals_uninterrupted(cache, tmp_path, name):
    """Stop mid-epoch, checkpoint, rebuild everything from the checkpoint: identical parameters,
    loss curve and lane state to a run that never stopped."""
    settings = config(epochs=2, checkpoint_path=str(tmp_path / "run.pt"))
    straight = Trainer(build_model(name, cache.num_items, seed=2, dropout=0.1, **TINY[name]), cache,
                       dataclasses.replace(settings, checkpoint_path=None), out=None).train()

    first = Trainer(build_model(name, cache.num_items, seed=2, dropout=0.1, **TINY[name]), cache,
                    dataclasses.replace(settings, max_steps=5), out=None).train()
    assert first.step == 5
    resumed = Trainer(build_model(name, cache.num_items, seed=99, dropout=0.1, **TINY[name]), cache, settings,
                      out=None)
    resumed.load_checkpoint(tmp_path / "run.pt").train()
    assert resumed.step == straight.step and resumed.curve == straight.curve
    for (key, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), key
    if straight.source.state_cache is not None:
        assert torch.equal(straight.source.state_cache.state, resumed.source.state_cache.state)


def zero_state_metrics(model, cache, split, users_per_batch):
    """Metrics of ``split`` with one user per lane, every user starting from a zero state."""
    model.eval()
    metrics = RankingMetrics()
    users = np.unique(np.concatenate([e.user for e in iter_split_events(cache, split)]))
    with torch.no_grad():
        for _, batch in user_lane_batches(cache, (split,), users, users_per_batch, model.max_session_length):
            features, _ = model(batch, None)
            fields = batch_targets(batch)
            metrics.update(model.scores(features), fields["targets"], fields["users"], fields["first_in_session"])
    return metrics


def test_one_user_per_lane_batches_equal_the_lane_generator(cache):
    """The warm-split path (one user per lane) scores a cold split exactly as the lane generator does."""
    model = build_model("hiertcn", cache.num_items, seed=1, **TINY["hiertcn"])
    metrics = zero_state_metrics(model, cache, "test", 5)
    expected = evaluate(model, cache, "test", config())
    assert metrics.result()["counts"] == expected["counts"]
    for unit in ("per_user", "per_event"):
        for metric in ("Recall@10", "MRR"):
            assert metrics.result()[unit]["all"][metric] == pytest.approx(expected[unit]["all"][metric], abs=1e-6)


def test_warm_split_evaluation_starts_from_the_earlier_sessions(tmp_path):
    warm = synthetic_cache(tmp_path / "warm", split="warm")
    model = build_model("hiertcn", warm.num_items, seed=1, **TINY["hiertcn"])
    Trainer(model, warm, config(epochs=2), out=None).train()
    quality = evaluate(model, warm, "test", config())
    assert quality["counts"]["events"] == sum(len(e) for e in iter_split_events(warm, "test"))
    # Without the warm-up (zero states) the first events of the test sessions are predicted differently.
    cold_start = zero_state_metrics(model, warm, "test", 8)
    assert cold_start.result()["per_event"]["first_in_session"]["MRR"] != quality["per_event"]["first_in_session"]["MRR"]


def test_warm_split_evaluation_of_the_history_tcn_reads_the_earlier_splits(tmp_path):
    from hiertcn_fast.models.history_tcn import UserHistoryBatcher

    warm = synthetic_cache(tmp_path / "warm", split="warm")
    model = build_model("history_tcn", warm.num_items, seed=1, **TINY["history_tcn"])
    Trainer(model, warm, config(epochs=2), out=None).train()
    quality = evaluate(model, warm, "test", config())
    events = list(iter_split_events(warm, "test"))
    assert quality["counts"]["events"] == sum(len(e) for e in events)
    assert quality["counts"]["first_in_session_events"] == sum(int(e.first_in_session.sum()) for e in events)
    # The same users without their earlier sessions as context are predicted differently.
    model.eval()
    no_context = RankingMetrics()
    with torch.no_grad():
        for batch in UserHistoryBatcher(warm, "test", users_per_batch=8):
            features, _ = model(batch, None)
            fields = batch.targets()
            no_context.update(model.scores(features).float(), fields["targets"], fields["users"],
                              fields["first_in_session"])
    assert no_context.result()["counts"]["events"] == quality["counts"]["events"]
    assert no_context.result()["per_event"]["all"]["MRR"] != quality["per_event"]["all"]["MRR"]


def test_context_splits_must_precede_the_split(tmp_path):
    from hiertcn_fast.models.history_tcn import UserHistoryBatcher

    warm = synthetic_cache(tmp_path / "warm", split="warm")
    with pytest.raises(ValueError, match="precedes one of the context splits"):
        UserHistoryBatcher(warm, "train", context_splits=("test",))


def test_full_softmax_equals_sampled_softmax_over_every_item():
    """With every item sampled once and no correction, the sampled softmax IS the full softmax over items."""
    torch.manual_seed(0)
    output = torch.nn.Linear(6, 13, dtype=torch.float64)
    features = torch.randn(9, 6, dtype=torch.float64)
    targets = torch.randint(1, 13, (9,))
    sampled = torch.arange(1, 13)
    log_q = torch.zeros(13, dtype=torch.float64)
    got = sampled_softmax_loss(features, targets, output, sampled, log_q)
    expected = F.cross_entropy(output(features)[:, 1:].float(), targets - 1, reduction="sum")
    torch.testing.assert_close(got, expected.to(got.dtype))


def test_sampled_softmax_training_lowers_the_loss(cache):
    model = build_model("hiertcn", cache.num_items, seed=1, **TINY["hiertcn"])
    trainer = Trainer(model, cache, config(loss="sampled", num_sampled=64), out=None).train()
    means = epoch_means(trainer)
    assert means[-1] < means[0] - 0.3, means
    counts = train_item_counts(cache)
    assert counts[0] == 0 and counts.sum() == sum(len(e) for e in iter_split_events(cache, "train"))


def test_bf16_autocast_of_the_output_layer_trains(cache):
    """amp=True (the GPU default) runs the output layer and loss under bf16 autocast; here on the CPU."""
    model = build_model("hiertcn", cache.num_items, seed=1, **TINY["hiertcn"])
    trainer = Trainer(model, cache, config(amp=True, epochs=2), out=None).train()
    means = epoch_means(trainer)
    assert trainer.amp and means[-1] < means[0], means


def test_learning_rate_schedule_divides_by_five_twice(cache):
    trainer = Trainer(build_model("session_gru", cache.num_items, **TINY["session_gru"]), cache,
                      config(epochs=4), out=None)
    batches = trainer.source.num_batches(0)
    assert trainer.learning_rate(0, 0) == pytest.approx(1e-2)
    assert trainer.learning_rate(2, 0) == pytest.approx(2e-3)
    assert trainer.learning_rate(3, batches - 1) == pytest.approx(4e-4)


def test_data_memory_meter_counts_saved_activations():
    meter = DataMemoryMeter()
    weight = torch.nn.Parameter(torch.randn(100, 100))
    x = torch.randn(50, 100, requires_grad=True)
    with meter.step([x], [weight]):
        (torch.tanh(x @ weight)).sum()
    # x (saved by the matmul, and the batch) and the tanh output; the weight is not data.
    assert meter.peak_bytes == 2 * 50 * 100 * 4


def test_config_and_model_errors(cache):
    with pytest.raises(ValueError, match="loss must be"):
        TrainConfig(loss="nce")
    with pytest.raises(ValueError, match="lr_milestones"):
        TrainConfig(lr_milestones=(1.5,))
    with pytest.raises(ValueError, match="unknown model"):
        build_model("transformer", 10)
    with pytest.raises(TypeError, match="NextItemModel"):
        Trainer(torch.nn.Linear(2, 2), cache)
    trainer = Trainer(build_model("session_gru", cache.num_items, **TINY["session_gru"]), cache, config(), out=None)
    with pytest.raises(ValueError, match="not a hiertcn_fast checkpoint"):
        trainer.load_checkpoint({"format": "other"})


def test_main_job_command_writes_the_report(tmp_path, capsys):
    """``python -m hiertcn_fast train`` end to end on ml-100k, shrunk to seconds."""
    pytest.importorskip("recbole")
    from hiertcn_fast.cli import main

    out = tmp_path / "report"
    assert main(["train", "--epochs", "1", "--dim", "8", "--models", "hiertcn,session_gru", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--loss", "sampled", "--num-sampled", "64"]) == 0
    assert {"report.md", "results.json", "quality.png", "training_curves.png"} <= {p.name for p in out.iterdir()}
    report = (out / "report.md").read_text()
    for name in ("hiertcn", "session_gru", "transitions", "most_popular"):
        assert f"| {name} |" in report
    assert "Recall@10" in capsys.readouterr().out


def test_progress_bar_shows_loss_and_events_per_second(cache):
    import io

    out = io.StringIO()
    model = build_model("hiertcn", cache.num_items, seed=1, **TINY["hiertcn"])
    trainer = Trainer(model, cache, config(epochs=1, progress_bar=True), name="hiertcn", out=out).train()
    batches = trainer.source.num_batches(0)
    bar_frames = [frame for frame in out.getvalue().split("\r") if f"/{batches} [" in frame]
    assert any("events/s" in frame and "loss" in frame for frame in bar_frames), bar_frames
    quiet = io.StringIO()  # not a terminal: log lines only, no bar
    Trainer(build_model("hiertcn", cache.num_items, seed=1, **TINY["hiertcn"]), cache, config(epochs=1),
            name="hiertcn", out=quiet).train()
    assert "\r" not in quiet.getvalue() and "events/s" in quiet.getvalue()
