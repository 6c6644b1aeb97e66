"""The training loop: it learns, it resumes exactly, its losses and its evaluation events are right."""

import copy
import dataclasses
import errno
import gc
import os
import signal
import time
import weakref

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiertcn_fast.data import SessionBatch
from hiertcn_fast.models import iter_split_events
from hiertcn_fast.evaluate import RankingMetrics, batch_targets
from hiertcn_fast import train as train_module
from hiertcn_fast.train import (CHECKPOINT_FORMAT, RESUME_FIELDS, RESUME_FREE_FIELDS, DataMemoryMeter, TrainConfig,
                                Trainer, build_model, evaluate, sampled_softmax_loss, train_item_counts,
                                _Source, user_lane_batches)
from helpers import interrupt_at
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


def test_the_optimizer_is_torchs_fused_adam_and_steps_like_the_plain_one(cache):
    """The trainer's Adam is torch's fused one (one kernel for all parameters); one step of it moves the
    parameters as the per-parameter Adam does, to rounding."""
    model = build_model("hiertcn", cache.num_items, seed=1, **TINY["hiertcn"])
    trainer = Trainer(model, cache, config(weight_decay=0.01), name="hiertcn", out=None)
    assert trainer.optimizer.param_groups[0]["fused"] is True
    twin = build_model("hiertcn", cache.num_items, seed=1, **TINY["hiertcn"])
    plain = torch.optim.Adam(twin.parameters(), lr=trainer.config.learning_rate, weight_decay=0.01)
    for p, q in zip(model.parameters(), twin.parameters()):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    trainer.optimizer.step()
    plain.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_resuming_keeps_the_fused_optimizer_and_evaluation_sees_its_steps(cache):
    """A checkpoint's optimizer options (one written by the per-parameter Adam, say) do not turn the trainer's
    fused Adam off; and evaluating between training runs gives what a fresh copy of the model gives: the fused
    steps, which move no version counter, reach the ops' weight caches."""
    import copy
    model = build_model("hiertcn", cache.num_items, seed=1, **TINY["hiertcn"])
    trainer = Trainer(model, cache, config(epochs=1), name="hiertcn", out=None).train()
    state = trainer.checkpoint()
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = None
    trainer._restore(state)
    assert all(group["fused"] is True for group in trainer.optimizer.param_groups)
    first = evaluate(model, cache, "test", config())  # fills the inference caches
    trainer.config = config(epochs=2)
    trainer.train()
    assert evaluate(model, cache, "test", config()) == evaluate(copy.deepcopy(model), cache, "test", config())
    assert first != evaluate(model, cache, "test", config())


def assert_same_run(straight, resumed):
    assert resumed.step == straight.step and resumed.curve == straight.curve
    for (key, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), key
    if straight.source.state_cache is not None:
        assert torch.equal(straight.source.state_cache.state, resumed.source.state_cache.state)


@pytest.mark.parametrize("name, extra", [("hiertcn", {}), ("history_tcn", {}),
                                         ("hiertcn", dict(loss="sampled", num_sampled=32))],
                         ids=["hiertcn", "history_tcn", "hiertcn-sampled"])
def test_resume_equals_uninterrupted(cache, tmp_path, name, extra):
    """Stop mid-epoch, checkpoint, rebuild everything from the checkpoint: identical parameters,
    loss curve and lane state to a run that never stopped (sampled: the sampler's generator too)."""
    settings = config(epochs=2, checkpoint_path=str(tmp_path / "run.pt"), **extra)
    straight = Trainer(build_model(name, cache.num_items, seed=2, dropout=0.1, **TINY[name]), cache,
                       dataclasses.replace(settings, checkpoint_path=None), out=None).train()

    first = Trainer(build_model(name, cache.num_items, seed=2, dropout=0.1, **TINY[name]), cache,
                    dataclasses.replace(settings, max_steps=5), out=None).train()
    assert first.step == 5
    resumed = Trainer(build_model(name, cache.num_items, seed=99, dropout=0.1, **TINY[name]), cache, settings,
                      out=None)
    resumed.load_checkpoint(tmp_path / "run.pt").train()
    assert_same_run(straight, resumed)


def test_resume_from_a_periodic_checkpoint_equals_uninterrupted(cache, tmp_path):
    """A run that checkpoints every 3 steps dies in step 5; resuming from the step-3 checkpoint (taken
    while the producer thread was building batches ahead) gives the run that never died."""
    settings = config(epochs=2, checkpoint_path=str(tmp_path / "run.pt"), checkpoint_every=3)
    straight = Trainer(build_model("hiertcn", cache.num_items, seed=2, dropout=0.1, **TINY["hiertcn"]), cache,
                       dataclasses.replace(settings, checkpoint_path=None, checkpoint_every=0), out=None).train()

    class Died(Exception):
        pass

    def die_in_step_5(module, args):
        calls.append(1)
        if len(calls) == 5:
            raise Died

    calls = []
    doomed = build_model("hiertcn", cache.num_items, seed=2, dropout=0.1, **TINY["hiertcn"])
    doomed.register_forward_pre_hook(die_in_step_5)
    with pytest.raises(Died):
        Trainer(doomed, cache, settings, out=None).train()
    assert torch.load(tmp_path / "run.pt", weights_only=True)["step"] == 3
    resumed = Trainer(build_model("hiertcn", cache.num_items, seed=99, dropout=0.1, **TINY["hiertcn"]), cache,
                      settings, out=None)
    resumed.load_checkpoint(tmp_path / "run.pt")
    assert resumed.step == 3
    resumed.train()
    assert_same_run(straight, resumed)


def test_resume_may_change_where_and_how_the_run_goes(cache, tmp_path):
    """The fields outside RESUME_FIELDS (device, queue, display, checkpointing, stop) may change on
    resume and the run is still exactly the uninterrupted one; every TrainConfig field is on one list."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(RESUME_FIELDS) | set(RESUME_FREE_FIELDS) == fields
    assert not set(RESUME_FIELDS) & set(RESUME_FREE_FIELDS)
    settings = config(epochs=2)
    straight = Trainer(build_model("hiertcn", cache.num_items, seed=2, **TINY["hiertcn"]), cache, settings,
                       out=None).train()
    Trainer(build_model("hiertcn", cache.num_items, seed=2, **TINY["hiertcn"]), cache,
            dataclasses.replace(settings, max_steps=4, checkpoint_path=str(tmp_path / "a.pt")), out=None).train()
    moved = dataclasses.replace(settings, device="cpu", amp=False, num_producers=0, queue_slots=2, log_every=3,
                                progress_bar=False, checkpoint_path=str(tmp_path / "b.pt"), checkpoint_every=2)
    resumed = Trainer(build_model("hiertcn", cache.num_items, seed=3, **TINY["hiertcn"]), cache, moved, out=None)
    resumed.load_checkpoint(tmp_path / "a.pt").train()
    assert_same_run(straight, resumed)


def trainer_state(trainer) -> dict:
    """A copy of everything a checkpoint restores, to compare trainers with."""
    return {"model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()), "source": trainer.source.state_dict(),
            "step": trainer.step, "curve": list(trainer.curve), "train_events": trainer.train_events,
            "train_seconds": trainer.train_seconds, "rng": torch.get_rng_state(),
            "sampler": trainer.sampler.get_state(), "rng_seeded": trainer._rng_seeded}


def assert_same(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def saved_run(cache, tmp_path_factory):
    """A checkpoint of 5 steps of hiertcn (TINY, config(epochs=2)), as a file."""
    path = tmp_path_factory.mktemp("saved_run") / "run.pt"
    Trainer(build_model("hiertcn", cache.num_items, seed=2, **TINY["hiertcn"]), cache,
            config(epochs=2, max_steps=5, checkpoint_path=str(path)), out=None).train()
    return path


def test_resume_refuses_another_model_or_schedule(cache, saved_run):
    """Every difference is listed (saved vs now), and nothing is loaded; strict=False loads anyway."""
    model = build_model("hiertcn", cache.num_items, seed=3, dilations=(4, 8), max_session_length=30,
                        **TINY["hiertcn"])
    trainer = Trainer(model, cache, config(epochs=50, learning_rate=0.5, loss="sampled", num_sampled=64, seed=8,
                                           lr_milestones=(0.5,), grad_clip=1.0), out=None)
    before = trainer_state(trainer)
    with pytest.raises(ValueError, match="another model or schedule") as refused:
        trainer.load_checkpoint(saved_run)
    lines = str(refused.value).splitlines()[1:]
    expected = ["model max_session_length: 20 vs 30",
                "model tcn.blocks.0.conv: CausalConv1d(16, 16, kernel_size=3, dilation=1",
                "model tcn.blocks.1.conv: CausalConv1d(16, 16, kernel_size=3, dilation=2",
                "config epochs: 2 vs 50", "config learning_rate: 0.01 vs 0.5",
                "config lr_milestones: (0.5, 0.75) vs (0.5,)", "config grad_clip: 5.0 vs 1.0",
                "config loss: 'full' vs 'sampled'", "config num_sampled: 1024 vs 64", "config seed: 7 vs 8"]
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected):
        assert line.strip().startswith(start), line
    assert "dilation=4" in lines[1] and "dilation=8" in lines[2]
    assert_same(before, trainer_state(trainer))

    other = Trainer(build_model("session_gru", cache.num_items, seed=3, **TINY["session_gru"]), cache,
                    config(epochs=2), out=None)
    with pytest.raises(ValueError, match=r"model class: hiertcn_fast.models.hiertcn.HierTCN vs "
                                         r"hiertcn_fast.models.baselines.SessionGRU"):
        other.load_checkpoint(saved_run)
    state = torch.load(saved_run, weights_only=True)
    same = Trainer(build_model("hiertcn", cache.num_items, seed=3, **TINY["hiertcn"]), cache, config(epochs=2),
                   out=None)
    with pytest.raises(ValueError, match=r"(?s)world_size: 2 vs 1.*rank: 1 vs 0"):
        same.load_checkpoint({**state, "world_size": 2, "rank": 1})
    with pytest.raises(ValueError, match="written on cuda and this trainer runs on cpu"):
        same.load_checkpoint({**state, "device_type": "cuda"}, strict=False)
    assert same.step == 0

    # Same parameter shapes: loads when asked to.
    relaxed = Trainer(build_model("hiertcn", cache.num_items, seed=3, dilations=(4, 8), **TINY["hiertcn"]), cache,
                      config(epochs=50, learning_rate=0.5, loss="sampled"), out=None)
    relaxed.load_checkpoint(saved_run, strict=False)
    assert relaxed.step == 5 and all(torch.equal(v, state["model"][k]) for k, v in relaxed.model.state_dict().items())


@pytest.mark.parametrize("how", ["parameter shapes", "batcher", "sampler state", "missing entry"])
def test_a_refused_checkpoint_leaves_the_trainer_as_it_was(cache, saved_run, how):
    """Refused before anything is written (a missing entry) or late, when the parameters, the
    optimizer or the position would already have been written: model, optimizer, position, lane
    state, counters and RNGs are all as before."""
    sizes, settings = dict(TINY["hiertcn"]), config(epochs=2)
    state = torch.load(saved_run, weights_only=True)
    if how == "parameter shapes":
        sizes["tcn_channels"] = (16, 8)  # the first block still fits; the second and the output do not
    elif how == "batcher":
        settings = config(epochs=2, lanes=4)
    elif how == "sampler state":
        state["sampler"] = torch.zeros(3, dtype=torch.uint8)
    else:
        del state["train_seconds"]
    trainer = Trainer(build_model("hiertcn", cache.num_items, seed=3, **sizes), cache,
                      dataclasses.replace(settings, max_steps=2), out=None).train()
    before = trainer_state(trainer)
    message = {"parameter shapes": r"size mismatch for output\.weight: saved \(296, 16\) vs now \(296, 8\)",
               "batcher": r"made by a different batcher or cache: \{'lanes': \(8, 4\)\}",
               "sampler state": "RNG state size", "missing entry": r"checkpoint lacks \['train_seconds'\]"}[how]
    with pytest.raises((ValueError, RuntimeError), match=message):
        trainer.load_checkpoint(state, strict=False)
    assert_same(before, trainer_state(trainer))


@pytest.mark.parametrize("how", ["missing entry", "parameter shapes"])
def test_a_refused_checkpoint_does_not_keep_the_trainer_alive(cache, saved_run, how):
    """The error a refused checkpoint raises makes no reference cycle through the trainer, refused before anything
    is written (a missing entry) or after the rollback (parameter shapes): without the cyclic collector, the
    trainer (model, optimizer; in a distributed run DDP and its process group) is freed when the caller lets go of
    it. The cycle (error -> traceback -> load_checkpoint's frame -> error) kept a refused rank's DDP alive until a
    collection, which could come after destroy_process_group or in the interpreter's shutdown."""
    state = torch.load(saved_run, weights_only=True)
    sizes = dict(TINY["hiertcn"])
    if how == "missing entry":
        del state["train_seconds"]
    else:
        sizes["tcn_channels"] = (16, 8)
    trainer = Trainer(build_model("hiertcn", cache.num_items, seed=3, **sizes), cache, config(epochs=2, max_steps=2),
                      out=None).train()
    alive = weakref.ref(trainer)
    gc.collect()
    gc.disable()
    try:
        refused = None
        try:
            trainer.load_checkpoint(state, strict=False)
        except (ValueError, RuntimeError) as error:
            refused = str(error)
        assert refused and ("train_seconds" in refused if how == "missing entry" else "size mismatch" in refused)
        del trainer
        assert alive() is None, "the refused trainer is still referenced"
    finally:
        gc.enable()


def _optimizer_moment_of_another_shape(state):
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)


def _optimizer_moment_missing(state):
    del state["optimizer"]["state"][0]["exp_avg_sq"]


def _optimizer_state_of_no_parameter(state):
    state["optimizer"]["state"][10_000] = dict(state["optimizer"]["state"][0])


def _negative_step(state):
    state["step"] = -3


def _nan_train_seconds(state):
    state["train_seconds"] = float("nan")


def _no_lane_state(state):
    state["source"]["lane_state"] = None


def _config_not_a_dict(state):
    state["config"] = [1, 2]


@pytest.mark.parametrize("damage, message", [
    (_optimizer_moment_of_another_shape, r"parameter 0's exp_avg is torch.float32 \(3,\), expected a floating "
                                         r"tensor of the parameter's shape"),
    (_optimizer_moment_missing, r"parameter 0's state holds \['exp_avg', 'step'\], expected \['exp_avg', "
                                r"'exp_avg_sq', 'step'\]"),
    (_optimizer_state_of_no_parameter, "state for parameter 10000, which no parameter group lists"),
    (_negative_step, "step: expected an integer >= 0, got -3"),
    (_nan_train_seconds, "train_seconds: expected a finite number >= 0, got nan"),
    (_no_lane_state, "expected the lanes' state"),
    (_config_not_a_dict, "config: expected a dict, got list"),
])
@pytest.mark.parametrize("strict", [True, False])
def test_a_checkpoint_whose_entries_do_not_fit_is_refused_before_anything_changes(cache, saved_run, damage,
                                                                                   message, strict):
    """torch's Optimizer.load_state_dict checks only the sizes of the parameter groups: an Adam moment of another
    shape loaded, and fused Adam then wrote past its end (a segmentation fault); a missing one failed every later
    step with a bare KeyError. These, and counters or entries of the wrong kind, are refused with the reason, the
    trainer as it was, and training goes on."""
    state = torch.load(saved_run, weights_only=True)
    damage(state)
    trainer = Trainer(build_model("hiertcn", cache.num_items, seed=3, **TINY["hiertcn"]), cache,
                      config(epochs=2, max_steps=2), out=None).train()
    before = trainer_state(trainer)
    with pytest.raises(ValueError, match=message):
        trainer.load_checkpoint(state, strict=strict)
    assert_same(before, trainer_state(trainer))
    trainer.config.max_steps = 3
    trainer.train()
    assert trainer.step == 3


def test_a_loaded_checkpoint_shares_no_optimizer_state_with_its_source(cache, saved_run):
    """Optimizer.load_state_dict keeps the tensors it is given: two trainers loading one dict (a sweep from one
    torch.load) trained the same Adam moments and step counts in place, and the second resumed from the first's.
    Each now resumes as from the file, and the dict is left as it was."""
    state = torch.load(saved_run, weights_only=True)
    kept = copy.deepcopy(state["optimizer"])
    runs = []
    for _ in range(2):
        trainer = Trainer(build_model("hiertcn", cache.num_items, seed=3, **TINY["hiertcn"]), cache, config(epochs=2),
                          out=None)
        trainer.load_checkpoint(state)
        trainer.config.max_steps = 8
        runs.append(trainer_state(trainer.train()))
        del runs[-1]["train_seconds"]  # (measured time)
    assert_same(kept, state["optimizer"], "the loaded dict's optimizer state")
    assert_same(runs[0], runs[1], "the second trainer")
    live = Trainer(build_model("hiertcn", cache.num_items, seed=3, **TINY["hiertcn"]), cache, config(epochs=2),
                   out=None).load_checkpoint(saved_run)
    twin = Trainer(build_model("hiertcn", cache.num_items, seed=4, **TINY["hiertcn"]), cache, config(epochs=2),
                   out=None).load_checkpoint(live.checkpoint())
    twin.config.max_steps = 8
    twin.train()
    assert_same(runs[0]["optimizer"], trainer_state(twin)["optimizer"], "the twin")
    assert_same(kept, live.optimizer.state_dict(), "the live trainer's optimizer state")


def test_a_refused_checkpoint_leaves_an_untrained_trainers_global_rng_as_it_was(cache, saved_run):
    """The rollback of a trainer that has not trained put back its RNG as seeded (what its checkpoint holds),
    replacing the caller's global RNG state."""
    trainer = Trainer(build_model("hiertcn", cache.num_items, seed=3, **TINY["hiertcn"]), cache, config(epochs=2),
                      out=None)
    state = torch.load(saved_run, weights_only=True)
    state["sampler"] = torch.zeros(3, dtype=torch.uint8)  # refused late, after the parameters were written
    torch.manual_seed(12345)
    torch.rand(3)
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="RNG state size"):
        trainer.load_checkpoint(state)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not trainer._rng_seeded


@pytest.mark.parametrize("bytes_, what", [(b"", "empty"), (b"PK\x03\x04 truncated", "truncated"),
                                          (b"hello, not a checkpoint\n", "text")])
def test_an_unreadable_checkpoint_file_is_named_in_the_error(cache, tmp_path, bytes_, what):
    path = tmp_path / f"{what}.pt"
    path.write_bytes(bytes_)
    trainer = Trainer(build_model("session_gru", cache.num_items, **TINY["session_gru"]), cache, config(), out=None)
    with pytest.raises(ValueError, match=f"{what}.pt: not a readable hiertcn_fast checkpoint"):
        trainer.load_checkpoint(path)
    assert trainer.step == 0


def test_a_truncated_checkpoint_file_is_a_clear_error_naming_the_file(cache, tmp_path):
    """A checkpoint cut short anywhere (a copy interrupted, a full disk) is refused as any damaged file is: the
    ValueError naming it, the trainer unchanged. At most cut points torch's zip reader raises a bare OSError (Errno
    22), which escaped with neither the file nor the cause named; a missing path stays FileNotFoundError."""
    def model():
        return build_model("session_gru", cache.num_items, **TINY["session_gru"])

    good = tmp_path / "good.pt"
    Trainer(model(), cache, config(max_steps=3, checkpoint_path=str(good)), out=None).train()
    data = good.read_bytes()
    trainer = Trainer(model(), cache, config(), out=None)
    escaped = []
    for cut in range(1000, len(data), max(1, len(data) // 40)):
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        try:
            trainer.load_checkpoint(bad)
        except ValueError as error:
            assert f"{bad}: not a readable hiertcn_fast checkpoint" in str(error)
        except Exception as error:  # noqa: BLE001 (what escapes is the defect)
            escaped.append(f"cut at {cut} of {len(data)} bytes: {type(error).__name__}: {error}")
        assert trainer.step == 0
    assert not escaped, "\n".join(escaped[:5])
    with pytest.raises(FileNotFoundError):
        trainer.load_checkpoint(tmp_path / "missing.pt")


def test_a_failed_periodic_save_counts_no_time_twice(cache, tmp_path, monkeypatch):
    """A periodic save that fails (a full disk) after taking a second: train_seconds stays within train()'s wall
    time. It added the epoch's time before the save and again when the epoch stopped, plus the failed save's."""
    trainer = Trainer(build_model("session_gru", cache.num_items, **TINY["session_gru"]), cache,
                      config(epochs=2, max_steps=6, checkpoint_every=3, checkpoint_path=str(tmp_path / "run.pt")),
                      out=None)

    def slow_failure(*args, **kwargs):
        time.sleep(1.0)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer, "save_checkpoint", slow_failure)
    started = time.perf_counter()
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    wall = time.perf_counter() - started
    assert trainer.step == 3
    assert 0 < trainer.train_seconds < wall - 0.9, (trainer.train_seconds, wall)


@pytest.mark.parametrize("where", ["parameter", "moment"])
def test_a_checkpoint_with_a_flipped_bit_in_a_tensor_is_refused(cache, tmp_path, where):
    """torch.load reads a tensor's bytes as they are (its zip reader checks no CRC): one bit flipped on disk in a
    parameter or an Adam moment resumed from the damaged value without a word. The digest save_checkpoint writes
    is checked on load: a ValueError naming the file, the trainer unchanged; the intact file still loads."""
    def model():
        return build_model("session_gru", cache.num_items, **TINY["session_gru"])

    path = tmp_path / "run.pt"
    saved = Trainer(model(), cache, config(max_steps=3), out=None).train()
    saved.save_checkpoint(path)
    data = bytearray(path.read_bytes())
    key = next(iter(saved.model.state_dict()))
    if where == "parameter":
        tensor = saved.model.state_dict()[key]
    else:
        tensor = saved.optimizer.state_dict()["state"][0]["exp_avg"]
    needle = tensor.detach().contiguous().numpy().tobytes()
    offset = data.find(needle)
    assert offset > 0 and data.find(needle, offset + 1) < 0, "the tensor's bytes should be in the file once"
    data[offset + len(needle) // 2] ^= 0x10
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    raw = torch.load(damaged, map_location="cpu", weights_only=True)  # torch itself reads it without complaint
    assert raw["step"] == 3

    trainer = Trainer(model(), cache, config(max_steps=3), out=None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match="damaged.pt: a damaged checkpoint: its contents' digest"):
        trainer.load_checkpoint(damaged)
    assert trainer.step == 0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.load_checkpoint(path)
    assert trainer.step == 3
    assert all(torch.equal(saved.model.state_dict()[k], v) for k, v in trainer.model.state_dict().items())


def test_a_checkpoint_dict_is_taken_as_it_is_without_a_digest_check(cache, tmp_path):
    """The digest guards files; a dict (read and edited on purpose) is loaded as given."""
    path = tmp_path / "run.pt"
    saved = Trainer(build_model("session_gru", cache.num_items, **TINY["session_gru"]), cache,
                    config(max_steps=3), out=None).train()
    saved.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["digest"].startswith("crc32:")
    state["train_seconds"] = 0.0
    trainer = Trainer(build_model("session_gru", cache.num_items, **TINY["session_gru"]), cache,
                      config(max_steps=3), out=None).load_checkpoint(state)
    assert trainer.step == 3 and trainer.train_seconds == 0.0


_RAN_ON_LOAD = []


def _record_load():
    _RAN_ON_LOAD.append(True)


class _RunsOnLoad:
    """Unpickling it calls _record_load (what a malicious checkpoint would do with os.system)."""

    def __reduce__(self):
        return _record_load, ()


def test_checkpoints_load_without_running_code(cache, tmp_path):
    """A checkpoint file is read with weights_only=True: an object that would run code on unpickling
    is refused, and the code does not run."""
    torch.save({"format": CHECKPOINT_FORMAT, "payload": _RunsOnLoad()}, tmp_path / "evil.pt")
    trainer = Trainer(build_model("session_gru", cache.num_items, **TINY["session_gru"]), cache, config(), out=None)
    with pytest.raises(ValueError, match="evil.pt: not a readable hiertcn_fast checkpoint.*UnpicklingError"):
        trainer.load_checkpoint(tmp_path / "evil.pt")
    assert _RAN_ON_LOAD == []


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk full", "ctrl-c"])
def test_a_failed_save_keeps_the_old_checkpoint_and_leaves_no_temporary_file(cache, tmp_path, monkeypatch, error):
    path = tmp_path / "run.pt"
    trainer = Trainer(build_model("session_gru", cache.num_items, **TINY["session_gru"]), cache,
                      config(epochs=2, max_steps=2), out=None).train()
    trainer.save_checkpoint(path)
    trainer.config.max_steps = 4
    trainer.train()

    def fail_halfway(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as file:
                file.write(b"partial")
        else:
            f.write(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", fail_halfway)
    with pytest.raises(type(error)):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["run.pt"]
    assert torch.load(path, weights_only=True)["step"] == 2


def test_a_checkpoint_is_fsynced_before_its_rename_and_its_directory_after(cache, tmp_path, monkeypatch):
    """Durable: the new file's data is on disk before it replaces the old one, and the rename is on
    disk (the directory fsync'ed) before save_checkpoint returns."""
    trainer = Trainer(build_model("session_gru", cache.num_items, **TINY["session_gru"]), cache,
                      config(epochs=1, max_steps=1), out=None).train()
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(source, destination):
        events.append(("replace", Path(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = trainer.save_checkpoint(tmp_path / "run.pt")
    assert events == [("fsync", path.stat().st_ino), ("replace", path), ("fsync", tmp_path.stat().st_ino)]


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


class _Linear(torch.nn.Module):
    """An output layer holding given tensors as its weight and bias (for gradcheck through them)."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = weight, bias


def test_full_softmax_equals_sampled_softmax_over_every_item():
    """With every item sampled once and no correction, the sampled softmax IS the full softmax over items."""
    torch.manual_seed(0)
    output = torch.nn.Linear(6, 13, dtype=torch.float64)
    features = torch.randn(9, 6, dtype=torch.float64)
    targets = torch.randint(1, 13, (9,))
    sampled = torch.arange(1, 13)
    log_q = torch.zeros(13, dtype=torch.float64)
    got = sampled_softmax_loss(features, targets, output, sampled, log_q)
    expected = F.cross_entropy(output(features)[:, 1:], targets - 1, reduction="sum")
    assert got.dtype == torch.float64  # (it was computed in float32)
    torch.testing.assert_close(got, expected)
    # float64 gradients, checked numerically: features and the output layer, a sample of half the items.
    inputs = [t.detach().clone().requires_grad_() for t in (features, output.weight, output.bias)]
    log_q = torch.rand(13, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(
        lambda f, w, b: sampled_softmax_loss(f, targets, _Linear(w, b), sampled[::2], log_q), inputs)


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


def test_progress_bar_shows_loss_and_events_per_second(cache, monkeypatch):
    import io

    import tqdm

    class EveryUpdate(tqdm.tqdm):
        """tqdm redraws at most every 0.1 s, and this tiny model's whole epoch can take less (the bar then showed
        only its first frame, 0/33, and the test failed once in a full run): draw at every update."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, mininterval=0, miniters=1, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", EveryUpdate)
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


def test_evaluate_refuses_a_model_of_another_catalogue(cache):
    for num_items in (cache.num_items + 50, cache.num_items - 10):
        model = build_model("session_gru", num_items, seed=1, **TINY["session_gru"])
        with pytest.raises(ValueError, match=f"built for {num_items} items, but the cache has {cache.num_items} items"):
            evaluate(model, cache, "test", config())


def test_evaluate_ranks_a_float64_models_scores_in_float64(cache):
    """Every other item scores 1e-9 above the target, which float32 cannot tell apart: ranked in float64 the target
    is last (Recall@1 0); the float32 copy evaluate() once ranked made them ties, which optimistic ties count as
    hits (1)."""

    class NearTies(type(build_model("session_gru", cache.num_items, seed=1, **TINY["session_gru"]))):
        def forward(self, batch, state):
            self.targets = batch_targets(batch)["targets"]
            return super().forward(batch, state)

        def scores(self, features):
            s = torch.full((features.shape[0], self.num_items + 1), 1.0 + 1e-9, dtype=torch.float64)
            s[torch.arange(features.shape[0]), self.targets] = 1.0
            return s

    model = build_model("session_gru", cache.num_items, seed=1, **TINY["session_gru"])
    model.__class__ = NearTies
    result = evaluate(model.double(), cache, "test", config())["per_event"]["all"]
    assert result["events"] > 0 and result["Recall@1"] == 0.0 and result["Recall@20"] == 0.0


@pytest.fixture(scope="module")
def long_session_caches(tmp_path_factory):
    """Cold and warm caches whose sessions are NOT truncated and often longer than 5 events."""
    from hiertcn_fast.data import PreprocessParams, SyntheticSource, preprocess

    root = tmp_path_factory.mktemp("long_sessions")
    source = SyntheticSource(4000, num_items=100, num_topics=5, mean_events_per_user=40, mean_session_length=12,
                             seed=2)
    return {split: preprocess(source, root, PreprocessParams(min_item_count=1, min_user_count=2, max_user_count=None,
                                                             max_session_length=None, split=split, num_partitions=2))
            for split in ("cold", "warm")}


@pytest.mark.parametrize("split", ["cold", "warm"])
@pytest.mark.parametrize("name", ["hiertcn", "history_tcn"])
def test_evaluate_counts_the_events_beyond_the_models_session_length(long_session_caches, split, name):
    """A model reads the first max_session_length events of a session; the others are not scored, and
    the result says how many (the rules score them all), so unequal comparisons show in the report."""
    cache = long_session_caches[split]
    rule_events = sum(len(e) for e in iter_split_events(cache, "test"))
    model = build_model(name, cache.num_items, seed=1, max_session_length=5, **TINY[name])
    quality = evaluate(model, cache, "test", config())
    truncation = quality["session_truncation"]
    assert truncation["max_session_length"] == 5 and truncation["events_not_scored"] > 0
    assert quality["counts"]["events"] + truncation["events_not_scored"] == rule_events
    whole = build_model(name, cache.num_items, seed=1, max_session_length=cache.max_session_length, **TINY[name])
    quality = evaluate(whole, cache, "test", config())
    assert quality["counts"]["events"] == rule_events and quality["session_truncation"]["events_not_scored"] == 0


def test_a_trainer_prints_to_the_stdout_of_when_it_is_made(cache, monkeypatch):
    """The default stream is sys.stdout when the trainer is made, not when the module was imported (a
    replaced or captured stdout, as under pytest, would otherwise be written to after it was closed)."""
    import io
    import sys
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stdout", stream)
    trainer = Trainer(build_model("hiertcn", cache.num_items, seed=0, **TINY["hiertcn"]), cache,
                      config(epochs=1, log_every=1))
    assert trainer.out is stream
    trainer.train()
    assert "events/s" in stream.getvalue()


def test_sampled_softmax_gradient_approaches_the_full_softmax():
    """Averaged over draws, the sampled softmax's gradient on the logits approaches the full softmax's
    (p - onehot) as num_sampled grows: the negatives carry the log-q correction, the target does not (with
    it, the target's gradient tended to -1). The loss takes a bias-less output layer too."""
    items = 12
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(items + 1, generator=generator, dtype=torch.float64) * 1.5
    logits[3] += 3.0  # a popular target: p(target) about 0.6
    target = torch.tensor([3])
    output = torch.nn.Linear(items + 1, items + 1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        output.weight.copy_(torch.eye(items + 1, dtype=torch.float64))  # features are the logits
    proposal = torch.rand(items + 1, generator=generator, dtype=torch.float64) + 0.2
    proposal[0] = 0.0
    proposal /= proposal.sum()
    num_sampled, draws = 2000, 200
    log_q = torch.log(num_sampled * proposal.clamp(min=1e-30))
    mean = torch.zeros(items + 1, dtype=torch.float64)
    for _ in range(draws):
        features = logits[None].clone().requires_grad_()
        sampled = torch.multinomial(proposal, num_sampled, replacement=True, generator=generator)
        sampled_softmax_loss(features, target, output, sampled, log_q).backward()
        mean += features.grad[0] / draws
    full = torch.softmax(logits[1:], 0) - F.one_hot(target - 1, items).double()[0]
    assert float(full[2]) < -0.3
    torch.testing.assert_close(mean[1:], full, rtol=0, atol=0.02)


def test_the_sampler_draws_from_catalogues_beyond_torch_multinomial(cache, monkeypatch):
    """The sampled loss's proposal is drawn by inverse CDF: no limit at 2^24 categories (torch.multinomial's),
    never the padding id 0 or another item without mass, and the proposal's frequencies."""
    import hiertcn_fast.train as train_module

    trainer = Trainer(build_model("session_gru", cache.num_items, **TINY["session_gru"]), cache,
                      config(loss="sampled", num_sampled=20000), out=None)
    counts = train_item_counts(cache)
    draws = torch.cat([trainer._draw_sampled() for _ in range(10)])
    assert int(draws.min()) >= 1
    weights = (counts + 1.0) ** 0.75  # add-one smoothing: every item has mass, one unseen in training too
    weights[0] = 0.0
    expected = weights / weights.sum()
    observed = np.bincount(draws.numpy(), minlength=len(counts)) / len(draws)
    assert np.abs(observed - expected).max() < 0.01
    big = np.zeros(2 ** 24 + 2)
    big[[5, 2 ** 24 + 1]] = [1e12, 3e12]  # two items with nearly all the mass, the last beyond 2^24
    monkeypatch.setattr(train_module, "train_item_counts", lambda cache, split="train": big)
    wide = Trainer(build_model("session_gru", cache.num_items, **TINY["session_gru"]), cache,
                   config(loss="sampled", num_sampled=4000), out=None)
    assert wide.proposal_last == 2 ** 24 + 1
    drawn = wide._draw_sampled()
    heavy = (wide.proposal[[5, 2 ** 24 + 1]] / wide.proposal[[5, 2 ** 24 + 1]].sum()).tolist()
    assert int(drawn.min()) >= 1 and int(drawn.max()) <= 2 ** 24 + 1
    # (1e12 + 1) ** 0.75 and (3e12 + 1) ** 0.75 against 2 ** 24 items of weight 1: 99.5% of the draws are the two.
    share = [float((drawn == item).double().mean()) for item in (5, 2 ** 24 + 1)]
    assert sum(share) > 0.98 and abs(share[1] / sum(share) - heavy[1]) < 0.04, (share, heavy)
    # Items without mass (only the padding id 0 now) are never drawn: a proposal of two items alone.
    cdf = np.zeros(2 ** 24 + 2)
    cdf[[5, 2 ** 24 + 1]] = [1.0, 3.0]
    wide.proposal_cdf = torch.from_numpy(np.cumsum(cdf))
    assert set(wide._draw_sampled().tolist()) == {5, 2 ** 24 + 1}


def test_a_step_that_raises_gives_its_batch_back(cache):
    """A step interrupted before the optimizer's (Ctrl-C, a transient error) leaves the generator and the random
    generators where the step found them: training on afterwards gives the uninterrupted run's curve and
    parameters (it skipped the batch before), with dropout and the sampled loss drawing random numbers."""
    sizes = dict(TINY["hiertcn"], dropout=0.2)
    run = dict(epochs=2, loss="sampled", num_sampled=32)
    plain = Trainer(build_model("hiertcn", cache.num_items, seed=2, **sizes), cache, config(**run), out=None).train()
    model = build_model("hiertcn", cache.num_items, seed=2, **sizes)
    calls = []

    def interrupt_once(module, args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(interrupt_once)
    trainer = Trainer(model, cache, config(**run), out=None)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer.step == 3
    handle.remove()
    trainer.train()
    assert [s for s, _ in trainer.curve] == [s for s, _ in plain.curve]
    torch.testing.assert_close(torch.tensor([l for _, l in trainer.curve]), torch.tensor([l for _, l in plain.curve]),
                               rtol=0, atol=0)
    for p, q in zip(trainer.model.parameters(), plain.model.parameters()):
        assert torch.equal(p, q)


def test_learning_rate_milestones_at_exact_fractions_fall_on_their_step(cache, monkeypatch):
    """0.4 and 0.8 of a 3-epoch run of 5 batches are steps 6 and 12 exactly: the progress is one division of
    integers ((2 + 2 / 5) / 3 rounds to 0.7999999999999999, which put the second division a step late)."""
    trainer = Trainer(build_model("session_gru", cache.num_items, **TINY["session_gru"]), cache,
                      config(epochs=3, lr_milestones=(0.4, 0.8)), out=None)
    monkeypatch.setattr(trainer.source, "num_batches", lambda epoch: 5)
    assert trainer.learning_rate(1, 0) == pytest.approx(1e-2)
    assert trainer.learning_rate(1, 1) == pytest.approx(2e-3)   # step 6 of 15: 0.4
    assert trainer.learning_rate(2, 1) == pytest.approx(2e-3)
    assert trainer.learning_rate(2, 2) == pytest.approx(4e-4)   # step 12 of 15: 0.8


def test_a_run_stopped_at_an_epochs_end_resumes_in_the_next_epoch(cache):
    """Stopped (max_steps) just after an epoch's last batch, the trainer's epoch is the next one: the resumed
    run's progress and logs name it, as the uninterrupted run's do."""
    trainer = Trainer(build_model("session_gru", cache.num_items, **TINY["session_gru"]), cache, config(epochs=2),
                      out=None)
    trainer.config.max_steps = trainer.source.num_batches(0)
    trainer.train()
    assert trainer.step == trainer.source.num_batches(0) and trainer.source.epoch == 1


@pytest.mark.parametrize("field,value,message", [
    ("amp", "false", "amp must be True, False or None"), ("max_steps", True, "max_steps"),
    ("seed", -1, "seed must be a non-negative integer"), ("seed", 1.5, "seed must be a non-negative integer"),
    ("lr_milestones", 0.5, "lr_milestones must be a sequence"), ("lr_milestones", "0.5", "lr_milestones must be a"),
    ("progress_bar", "no", "progress_bar must be True, False or None"),
    # torch's generators take 64-bit seeds: 2**64 failed in Trainer with "Overflow when unpacking long long"
    ("seed", 2 ** 64, "seed must be a non-negative integer below 2\\*\\*63"), ("seed", 2 ** 63, "below 2"),
    ("device", "nonsense", "device must name a torch device"), ("device", 1.5, "device must name a torch device"),
    ("checkpoint_path", 5, "checkpoint_path must be a path")])
def test_config_refuses_values_of_the_wrong_kind(field, value, message):
    """bool("false") is True, True is an int, a float seed failed deep inside torch.manual_seed."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_an_interrupted_epoch_counts_its_time(cache):
    """events/s and checkpoints count the time of an epoch cut short by an interrupt, as they count its events
    (its time was dropped: events/s was overstated, a checkpoint held 0 s)."""
    model = build_model("hiertcn", cache.num_items, seed=2, **TINY["hiertcn"])
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1) or (
        (_ for _ in ()).throw(KeyboardInterrupt) if len(calls) == 5 else None))
    trainer = Trainer(model, cache, config(epochs=1), out=None)
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    elapsed = time.perf_counter() - started
    assert trainer.step == 4 and 0 < trainer.train_seconds <= elapsed
    assert trainer.checkpoint()["train_seconds"] == trainer.train_seconds


def test_a_checkpoint_from_before_the_first_train_resumes_exactly(cache, tmp_path):
    """train() seeds the global RNG (dropout) at its first call; a checkpoint written before it held the unseeded
    generator and marked it seeded, so the resumed run drew other dropout masks than the uninterrupted one."""
    def model(seed):
        return build_model("hiertcn", cache.num_items, seed=seed, dropout=0.2, **TINY["hiertcn"])

    torch.manual_seed(123)  # whatever the global RNG holds when the checkpoint is written
    straight = Trainer(model(2), cache, config(epochs=1), out=None)
    straight.save_checkpoint(tmp_path / "start.pt")
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(123).get_state())  # written without seeding
    straight.train()
    resumed = Trainer(model(9), cache, config(epochs=1), out=None).load_checkpoint(tmp_path / "start.pt").train()
    assert resumed.curve == straight.curve
    for p, q in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("field,value", [("learning_rate", float("inf")), ("learning_rate", float("nan")),
                                         ("grad_clip", float("nan")), ("weight_decay", float("nan")),
                                         ("lr_gamma", float("nan"))])
def test_config_numbers_must_be_finite(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("where", ["storing the lanes' state", "after the optimizer's step", "an optimizer post-hook",
                                   "the step's snapshot", "entering the step", "moving the batch"])
def test_a_step_that_raises_late_leaves_a_consistent_trainer(cache, monkeypatch, where):
    """Raising while the lanes' state is stored (before the optimizer's step) gives the batch back with the lanes'
    state as it was; raising after the optimizer's step (the all-reduce of the loss) counts the step, with a NaN
    loss, so the step count matches the parameters. Either way training on ends where the uninterrupted run
    does, with its parameters. So too for an interrupt in a post-hook of the optimizer's step (the parameters
    moved; it was rolled back, and the batch applied twice), while the step takes its snapshot of the random
    generators, at the step's entry, or while the batch is moved to the device (each before the step's rollback
    covered it: the batch was skipped)."""
    plain = Trainer(build_model("hiertcn", cache.num_items, seed=2, **TINY["hiertcn"]), cache, config(epochs=2),
                    out=None).train()
    trainer = Trainer(build_model("hiertcn", cache.num_items, seed=2, **TINY["hiertcn"]), cache, config(epochs=2),
                      out=None)
    calls = []
    if where == "storing the lanes' state":
        original = trainer.source.end

        def end(batch, new_state):
            calls.append(1)
            if len(calls) == 4:
                original(batch, torch.full_like(new_state, 7.0))  # half done: a wrong state stored, then a failure
                raise KeyboardInterrupt
            original(batch, new_state)
        monkeypatch.setattr(trainer.source, "end", end)
    elif where == "after the optimizer's step":
        trainer.distributed = True  # the step then all-reduces its loss, after the optimizer's step

        def all_reduce(tensor):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
        monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    else:
        def fourth_call_raises(original):
            def call(*args, **kwargs):
                calls.append(1)
                if len(calls) == 4:
                    raise KeyboardInterrupt
                return original(*args, **kwargs)
            return call

        if where == "an optimizer post-hook":
            trainer.optimizer.register_step_post_hook(fourth_call_raises(lambda *args: None))
        elif where == "the step's snapshot":
            monkeypatch.setattr(torch, "get_rng_state", fourth_call_raises(torch.get_rng_state))
        elif where == "entering the step":
            monkeypatch.setattr(trainer, "_train_step", fourth_call_raises(trainer._train_step))
        else:
            monkeypatch.setattr(SessionBatch, "to", fourth_call_raises(SessionBatch.to))
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    optimizer_steps = int(next(iter(trainer.optimizer.state.values()))["step"])
    moved = where in ("after the optimizer's step", "an optimizer post-hook")
    assert trainer.step == optimizer_steps == (4 if moved else 3)
    if moved:
        assert np.isnan(trainer.curve[-1][1])
    if where != "after the optimizer's step":  # (there the patched all-reduce stands in for the process group)
        monkeypatch.undo()
    trainer.train()
    assert trainer.step == plain.step
    for p, q in zip(trainer.model.parameters(), plain.model.parameters()):
        assert torch.equal(p, q)


def test_an_interrupt_during_a_steps_rollback_is_finished_later(cache, monkeypatch):
    """A second interrupt while an interrupted step gives its batch back leaves the rest of that restore pending:
    the next train() (or checkpoint) applies it first, so training on still ends as the uninterrupted run."""
    sizes = dict(TINY["hiertcn"], dropout=0.2)
    plain = Trainer(build_model("hiertcn", cache.num_items, seed=2, **sizes), cache, config(epochs=2),
                    out=None).train()
    model = build_model("hiertcn", cache.num_items, seed=2, **sizes)
    calls, restores = [], []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1) or (
        (_ for _ in ()).throw(KeyboardInterrupt) if len(calls) == 4 else None))
    trainer = Trainer(model, cache, config(epochs=2), out=None)
    original = torch.set_rng_state

    def set_rng_state(state):
        restores.append(1)
        if len(restores) == 1:
            raise KeyboardInterrupt  # the second interrupt, inside the rollback
        original(state)
    monkeypatch.setattr(torch, "set_rng_state", set_rng_state)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert trainer._pending_rollback is not None
    handle.remove()
    trainer.train()
    assert trainer._pending_rollback is None and trainer.step == plain.step
    for p, q in zip(trainer.model.parameters(), plain.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_the_training_softmax_is_over_the_items_only(cache, backend):
    """Column 0 of the output layer is the start/padding id: never a target, never ranked by the evaluation. The
    training softmax counted it as a class (with its bias raised, the loss grew and the column got a gradient)."""
    from hiertcn_fast.evaluate import batch_targets
    from hiertcn_fast.train import _LossStep

    model = build_model("session_gru", cache.num_items, seed=1, backend=backend, **TINY["session_gru"])
    with torch.no_grad():
        model.output.bias[0] = 5.0
    batch = next(iter(_lane_batcher(cache)))
    targets = batch_targets(batch)["targets"]
    loss, loss_sum, _ = _LossStep(model, False, "cpu", None)(batch, None, targets, 1.0, None)
    features, _ = model(batch, None)
    logits = model.scores(features)
    torch.testing.assert_close(loss_sum, F.cross_entropy(logits[:, 1:], targets - 1, reduction="sum"))
    loss.backward()
    assert model.output.bias.grad[0] == 0 and not model.output.weight.grad[0].any()


def _lane_batcher(cache):
    from hiertcn_fast.data import SessionBatcher

    return SessionBatcher(cache, "train", lanes=8, sessions_per_batch=4)


@pytest.mark.parametrize("what", ["train", "evaluate"])
def test_a_failed_batch_hand_over_stops_the_producers_while_the_error_is_held(cache, monkeypatch, what):
    """An error (Ctrl-C) between the queue and the step, while the batch moves to the device: the queue's stream was
    held by the failed frame, which the held error keeps, and its producer threads ran on."""
    import threading

    real_to, calls = SessionBatch.to, []

    def to(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("while moving the batch")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(SessionBatch, "to", to)
    model = build_model("hiertcn", cache.num_items, seed=1, **TINY["hiertcn"])
    settings = config(epochs=1, num_producers=2)
    with pytest.raises(KeyboardInterrupt) as held:  # held: the error stays referenced after the block
        Trainer(model, cache, settings, out=None).train() if what == "train" else evaluate(model, cache, "test",
                                                                                            settings)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any("producer" in t.name for t in threading.enumerate()):
        time.sleep(0.05)
    assert held.value is not None and not [t.name for t in threading.enumerate() if "producer" in t.name]


def test_a_killed_processs_checkpoint_temporary_file_is_removed_by_the_next_save(cache, tmp_path):
    """A save killed before its rename (SIGKILL, the OOM killer) left a full-sized .<name>.tmp-<pid> that no later
    save removed. Now a save removes those of dead processes of this host; another host's and a live process's
    stay."""
    from hiertcn_fast.data.cache import host_label

    path = tmp_path / "run.pt"
    dead_old_style = tmp_path / ".run.pt.tmp-999999999"
    dead_here = tmp_path / f".run.pt.tmp-{host_label()}-999999998"
    other_host = tmp_path / ".run.pt.tmp-another_node-999999998"
    alive = tmp_path / f".run.pt.tmp-{host_label()}-{os.getppid()}"
    for leftover in (dead_old_style, dead_here, other_host, alive):
        leftover.write_bytes(b"partial")
    trainer = Trainer(build_model("session_gru", cache.num_items, **TINY["session_gru"]), cache,
                      config(epochs=1, max_steps=1), out=None).train()
    trainer.save_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, other_host.name, alive.name])


# ---- interrupts (Ctrl-C) as a step is counted: found by a line-by-line interrupt sweep -------------------

def test_an_interrupt_as_a_step_is_counted_does_not_train_its_batch_twice(cache, monkeypatch):
    """A step that raises after the optimizer's step is counted (NaN loss), so the step count matches the
    parameters, and training on ends where the uninterrupted run does. ``_count_step`` was called after
    _train_step's try: a Ctrl-C at its entry escaped the rollback, the step was not counted, and train()'s handler
    (``if self.step == counted``) gave the batch back although the parameters had moved: it was trained on twice."""
    plain = Trainer(build_model("hiertcn", cache.num_items, seed=2, **TINY["hiertcn"]), cache, config(epochs=2),
                    out=None).train()
    trainer = Trainer(build_model("hiertcn", cache.num_items, seed=2, **TINY["hiertcn"]), cache, config(epochs=2),
                      out=None)
    real, calls = trainer._count_step, []

    def count_step(loss, events):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated Ctrl-C at _count_step's entry")
        return real(loss, events)

    monkeypatch.setattr(trainer, "_count_step", count_step)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    optimizer_steps = int(next(iter(trainer.optimizer.state.values()))["step"])
    monkeypatch.undo()
    assert trainer.step == optimizer_steps, (trainer.step, optimizer_steps)
    trainer.train()
    assert trainer.step == plain.step
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), plain.model.parameters(), strict=True)), (
        f"the interrupted batch was applied twice (optimizer steps {optimizer_steps})")


class _AppendThenInterrupt(list):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def append(self, value):
        super().append(value)
        if len(self) == self.at:
            raise KeyboardInterrupt("simulated Ctrl-C just after curve.append returned")


def test_an_interrupt_after_the_curve_is_appended_loses_no_events(cache):
    """Resume equals an uninterrupted run, counters included (train_events feeds events/s and the checkpoint).
    _count_step updated step, curve and train_events in three statements: a Ctrl-C just after ``curve.append``
    returned (a C call, where CPython takes signals) skipped ``train_events += total_events``."""
    plain = Trainer(build_model("session_gru", cache.num_items, seed=2, **TINY["session_gru"]), cache,
                    config(epochs=1), out=None).train()
    trainer = Trainer(build_model("session_gru", cache.num_items, seed=2, **TINY["session_gru"]), cache,
                      config(epochs=1), out=None)
    trainer.curve = _AppendThenInterrupt(3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer.curve = list(trainer.curve)
    trainer.train()
    assert trainer.curve == plain.curve
    assert trainer.train_events == plain.train_events


# ---- interrupts at the edges of a step (found by a line-by-line sweep) ---------------------------------------

INTERRUPT_SIZES = dict(embedding_dim=16, state_hidden=8, tcn_channels=(16, 16), kernel_size=3)


def _sweep_trainer(cache, max_steps):
    return Trainer(build_model("hiertcn", cache.num_items, seed=3, **INTERRUPT_SIZES), cache,
                   config(epochs=2, max_steps=max_steps, num_producers=0), out=None)


def _assert_same_parameters(trainer, straight, what):
    mismatched = [key for key, value in straight.model.state_dict().items()
                  if not torch.equal(value, trainer.model.state_dict()[key])]
    assert not mismatched, f"{what}: parameters differ from the uninterrupted run's: {mismatched[:4]}"


@pytest.mark.parametrize("snippet", ["if warm and model.input_kind", "def score(batch, state):"])
def test_evaluate_interrupted_after_model_eval_puts_every_modules_mode_back(cache, snippet):
    """model.eval() ran before the try whose finally put the mode back: an interrupt as it returned left the caller's
    model in eval mode (training went on without dropout). And the mode put back was the root's, for every module:
    a submodule the caller had put in eval mode came back in training mode."""
    model = build_model("hiertcn", cache.num_items, seed=1, dropout=0.1, **INTERRUPT_SIZES)
    model.train()
    model.item_embedding.eval()  # the caller's choice, to be kept
    modes = {name: module.training for name, module in model.named_modules()}
    with interrupt_at(evaluate, snippet) as fired:
        with pytest.raises(KeyboardInterrupt):
            evaluate(model, cache, "test", config())
    assert fired
    assert {name: module.training for name, module in model.named_modules()} == modes
    evaluate(model, cache, "test", config())
    assert {name: module.training for name, module in model.named_modules()} == modes


def test_evaluate_interrupted_as_its_restore_of_the_modes_starts_still_restores_them(cache):
    """An interrupt as the finally's restore is entered (a real landing point: a call) stopped the one statement that
    put the caller's mode back. The restore runs once more on an interrupt."""
    model = build_model("hiertcn", cache.num_items, seed=1, dropout=0.1, **INTERRUPT_SIZES)
    model.train()
    with interrupt_at(train_module._set_modes, "for module, training in modes:") as fired:
        with pytest.raises(KeyboardInterrupt):
            evaluate(model, cache, "test", config())
    assert fired
    assert all(module.training for module in model.modules())


@pytest.mark.parametrize("when", ["before the kernel", "after the kernel"])
def test_a_ctrl_c_during_the_optimizers_step_lets_the_step_finish_and_counts_it(cache, monkeypatch, when):
    """README: a step that raises after the optimizer's step "is counted (its loss NaN), never run twice", one that
    raises before it gives its batch back. torch's fused Adam adds to the step counts, then runs its kernel, then the
    step hooks, one of which marks the batch spent: a Ctrl-C landing after the kernel (as the hook was entered)
    gave back a batch whose parameters had moved, to be trained again; one landing before the kernel left Adam's
    counts a step ahead. A SIGINT inside the optimizer's step now raises at its end (the test sends a real one)."""
    straight = _sweep_trainer(cache, 4).train()
    trainer = _sweep_trainer(cache, 4)
    real, calls = torch._fused_adam_, []

    def kernel(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2 and when == "before the kernel":
            signal.raise_signal(signal.SIGINT)
        result = real(*args, **kwargs)
        if len(calls) == 2 and when == "after the kernel":
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(torch, "_fused_adam_", kernel)
    # Python's own handler, which the deferral works with: a process started with SIGINT ignored (a shell's
    # background job without job control, nohup ... &) has none, and there the Ctrl-C would not arrive at all.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
        assert len(calls) == 2 and trainer.step == 2 and np.isnan(trainer.curve[-1][1]), trainer.curve
        assert all(float(state["step"]) == 2 for state in trainer.optimizer.state.values())
        trainer.train()
        _assert_same_parameters(trainer, straight, f"a Ctrl-C {when} of the optimizer's step, then trained on")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.parametrize("function, snippet", [
    (_Source.batches, "try:"), (_Source.batches, "yield local, total_events"),
    (Trainer._train, "counted = self.step"), (Trainer._train, "self._optimizer_stepped[0] = False"),
    (Trainer._train, "mark = (self.step, (batch.epoch"),
], ids=["batches-try", "batches-yield", "train-counted", "train-stepped-flag", "train-mark"])
def test_an_interrupt_between_the_batchers_count_and_the_steps_give_back_loses_no_batch(cache, function, snippet):
    """The batcher counts a batch as handed out before it yields it; the give-backs covered _Source.batches' try and
    the try around _train_step, and between them lay lines (a line-level interrupt only, no call among them) where
    an interrupt skipped the batch: the next train() started after it. train() now gives back, on any error, every
    batch after the last step it counted."""
    straight = _sweep_trainer(cache, 4).train()
    trainer = _sweep_trainer(cache, 4)
    with interrupt_at(function, snippet, hit=2) as fired:
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    assert fired
    trainer.train()
    assert (trainer.source.batcher.epoch, trainer.source.batcher.next_index, trainer.step) == (
        straight.source.batcher.epoch, straight.source.batcher.next_index, straight.step), "a batch was skipped"
    _assert_same_parameters(trainer, straight, f"interrupted at {function.__qualname__}: {snippet!r}, then resumed")


def test_evaluate_into_a_callers_accumulator_adds_all_or_nothing(cache):
    """``metrics``: the caller's accumulator (its cut-offs and tie policy) receives the split's events in one merge
    at the end. Interrupted part way, it received the batches scored so far, and a retry counted them twice."""
    model = build_model("hiertcn", cache.num_items, seed=1, **INTERRUPT_SIZES)

    def accumulator():
        metrics = RankingMetrics(recall_ks=(3,), mrr_cutoffs=(), ndcg_ks=(), ties="pessimistic")
        metrics.update(torch.zeros(2, cache.num_items + 1), torch.tensor([1, 2]), torch.tensor([-1, -2]),
                       torch.tensor([True, False]))  # two events of users no split has, scored first
        return metrics

    alone = evaluate(model, cache, "test", config(), metrics=RankingMetrics(recall_ks=(3,), mrr_cutoffs=(),
                                                                            ndcg_ks=(), ties="pessimistic"))
    assert alone["metrics"] == ["Recall@3"]
    expected = evaluate(model, cache, "test", config(), metrics=accumulator())
    assert expected["counts"]["events"] == alone["counts"]["events"] + 2
    metrics = accumulator()
    before = metrics.result()
    with interrupt_at(RankingMetrics.update, "first_in_session = _as_tensor(", hit=3) as fired:
        with pytest.raises(KeyboardInterrupt):
            evaluate(model, cache, "test", config(), metrics=metrics)
    assert fired and metrics.result() == before
    assert evaluate(model, cache, "test", config(), metrics=metrics) == expected
    with pytest.raises(TypeError, match="metrics must be a RankingMetrics or None, got dict"):
        evaluate(model, cache, "test", config(), metrics={})

    class Pessimist(RankingMetrics):  # a subclass's own behaviour is kept: its accumulator takes the events
        def result(self):
            return {**super().result(), "by": "Pessimist"}

    assert evaluate(model, cache, "test", config(), metrics=Pessimist(ties="pessimistic"))["by"] == "Pessimist"


def test_a_checkpoint_that_cannot_be_written_is_refused_before_training(cache, tmp_path):
    """checkpoint_every without a checkpoint_path wrote nothing without a word, and a checkpoint_path that is a folder
    failed only after the whole run (IsADirectoryError when the finished checkpoint was moved into place)."""
    model = build_model("session_gru", cache.num_items, **TINY["session_gru"])
    with pytest.raises(ValueError, match="checkpoint_every=5 needs a checkpoint_path"):
        Trainer(model, cache, config(checkpoint_every=5), out=None)
    with pytest.raises(ValueError, match="is a folder: name the checkpoint file"):
        Trainer(model, cache, config(checkpoint_path=str(tmp_path)), out=None)
    assert list(tmp_path.iterdir()) == []
    trainer = Trainer(model, cache, config(max_steps=2, checkpoint_path=str(tmp_path / "run.pt"), checkpoint_every=1),
                      out=None)
    trainer.train()
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]
