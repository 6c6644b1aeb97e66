"""Differential fuzz of training checkpoints and exact resume.

Every neural model (tiny widths, dropout on, gradient clipping active, weight decay, two learning-rate milestones)
is trained once straight through; then runs stopped at random points (max_steps mid-epoch, at an epoch's end, an
exception raised in the forward, the loss or the backward) are checkpointed and resumed in a fresh trainer built
from another parameter seed. The resumed run must equal the straight one bitwise: parameters, Adam's moments and
step counts, the loss curve, the event count, the generator position, the lanes' state, the global RNG and the
sampler's generator, the learning rate of every step, and the evaluation metrics. Changed configurations, damaged,
truncated and foreign files must be refused with a ValueError, leaving the trainer and the checkpoint on disk as
they were; saves must be atomic.

The tests after the sweeps pin defects found this way (each failed before its fix).
"""

import builtins
import copy
import dataclasses
import errno
import io
import os
import pickle
import random
from fractions import Fraction
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hiertcn_fast import train as train_module
from hiertcn_fast.train import CHECKPOINT_FORMAT, TrainConfig, Trainer, build_model, checkpoint_digest, evaluate
from model_helpers import synthetic_cache, one_thread  # noqa: F401 (autouse fixture)

SIZES = {
    "hiertcn": dict(embedding_dim=8, state_hidden=8, tcn_channels=(8, 8), kernel_size=2),
    "hrnn": dict(embedding_dim=8, user_hidden=8, session_hidden=8),
    "hiergru": dict(embedding_dim=8, state_hidden=8, session_hidden=8),
    "session_gru": dict(embedding_dim=8, hidden=8),
    "history_tcn": dict(embedding_dim=8, channels=(8, 8), kernel_size=2),
}
MODELS = list(SIZES)
VARIANTS = {
    "full": {},
    "sampled-uniform": dict(loss="sampled", num_sampled=16, sampler="uniform"),
    "sampled-unigram-queued": dict(loss="sampled", num_sampled=16, sampler="unigram", num_producers=1),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("fuzz_resume"), num_events=1500, num_items=60)


def model(cache, name="hiertcn", seed=1, num_items=None, **changes):
    sizes = dict(SIZES[name], dropout=0.2)
    sizes.update(changes)
    return build_model(name, cache.num_items if num_items is None else num_items, seed=seed, **sizes)


def config(**changes):
    # grad_clip 0.05: well below the gradients' norm, so clipping acts at every step.
    values = dict(epochs=2, lanes=4, sessions_per_batch=3, seed=3, num_producers=0, grad_clip=0.05,
                  weight_decay=0.01, lr_milestones=(0.3, 0.6), learning_rate=1e-2, lr_gamma=0.2)
    values.update(changes)
    return TrainConfig(**values)


def record_learning_rates(trainer):
    """The learning rate of every optimizer step the trainer takes, in order."""
    rates = []
    trainer.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: rates.append(
        optimizer.param_groups[0]["lr"]))
    return rates


def snapshot(trainer) -> dict:
    """Everything a resumed run must reproduce (the measured time excepted)."""
    source = trainer.source
    return {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()["state"]),
            "step": trainer.step, "curve": list(trainer.curve), "train_events": trainer.train_events,
            "position": (source.batcher.epoch, source.batcher.next_index, source.epoch),
            "lanes": None if source.state_cache is None else source.state_cache.state.detach().clone(),
            "rng": torch.get_rng_state(), "sampler": trainer.sampler.get_state()}


def differences(a, b, where="") -> list[str]:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return [f"{where} keys"]
        return [d for key in a for d in differences(a[key], b[key], f"{where}[{key!r}]")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and type(a) is type(b):
        if len(a) != len(b):
            return [f"{where} length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def assert_same_run(straight: dict, resumed: dict, what: str):
    found = differences(straight, resumed)
    assert not found, f"{what}: the resumed run differs from the uninterrupted one at {found[:6]}"


_STRAIGHT = {}


def straight_run(cache, name, variant):
    """The uninterrupted run (cached per module): its snapshot, its learning rates, batches per epoch, metrics."""
    key = (name, variant)
    if key not in _STRAIGHT:
        trainer = Trainer(model(cache, name), cache, config(**VARIANTS[variant]), out=None)
        rates = record_learning_rates(trainer)
        trainer.train()
        state = snapshot(trainer)
        metrics = evaluate(trainer.model, cache, "test", config())
        _STRAIGHT[key] = (state, rates, [trainer.source.num_batches(e) for e in range(trainer.config.epochs)],
                          metrics)
    return _STRAIGHT[key]


def expected_learning_rates(batches, settings):
    """The step schedule computed independently (exact fractions): lr0 * gamma ** (milestones passed), the
    progress at batch i of epoch e being (e + i / batches[e]) / epochs (epochs may differ in their batch count)."""
    return [settings.learning_rate * settings.lr_gamma ** sum(
        Fraction(e * batches[e] + i, batches[e] * settings.epochs) >= m for m in settings.lr_milestones)
        for e in range(settings.epochs) for i in range(batches[e])]


def resume_from(cache, path, name, variant, **changes):
    trainer = Trainer(model(cache, name, seed=99), cache, config(**{**VARIANTS[variant], **changes}), out=None)
    trainer.load_checkpoint(path)
    return trainer


# ---- exact resume ---------------------------------------------------------------------------------------------


# Every model with the full softmax; the sampled losses (and the queued batches) on three, to keep the file fast.
RUNS = [(name, "full") for name in MODELS] + [(name, variant) for name in ("hiertcn", "hrnn", "history_tcn")
                                              for variant in VARIANTS if variant != "full"]


@pytest.mark.parametrize("name, variant", RUNS, ids=[f"{n}-{v}" for n, v in RUNS])
def test_resume_at_random_stops_equals_the_uninterrupted_run(cache, tmp_path, name, variant):
    """Stopped by max_steps at a random step mid-epoch, one before an epoch's end and exactly at it, saved,
    resumed in a fresh trainer: bitwise the uninterrupted run, every step at the scheduled learning rate, and the
    same evaluation."""
    straight, straight_rates, per_epoch, metrics = straight_run(cache, name, variant)
    total, batches = sum(per_epoch), per_epoch[0]
    settings = config(**VARIANTS[variant])
    assert straight["step"] == total
    assert straight_rates == expected_learning_rates(per_epoch, settings)
    assert len(set(straight_rates)) == 3, "both milestones fall inside the run"
    rng = random.Random(f"{name}-{variant}")
    stops = sorted({rng.randrange(1, total - 1), batches - 1, batches} if variant == "full" else
                   {rng.randrange(1, total - 1), batches})
    for stop in stops:
        path = tmp_path / f"stop{stop}.pt"
        first = Trainer(model(cache, name), cache, dataclasses.replace(settings, max_steps=stop,
                                                                        checkpoint_path=str(path)), out=None)
        first_rates = record_learning_rates(first)
        first.train()
        assert first.step == stop
        resumed = resume_from(cache, path, name, variant)
        assert resumed.step == stop
        rates = record_learning_rates(resumed)
        resumed.train()
        assert first_rates + rates == straight_rates, f"stop {stop}: the learning-rate schedule across the resume"
        assert_same_run(straight, snapshot(resumed), f"{name} {variant} stopped at step {stop} of {total}")
        assert evaluate(resumed.model, cache, "test", config()) == metrics


class Failure(Exception):
    pass


def _fail_in_forward(trainer, at, calls):
    def hook(module, args):
        calls.append(1)
        if len(calls) == at:
            raise Failure("in the forward")
    return trainer.model.register_forward_pre_hook(hook)


def _fail_in_loss(trainer, at, calls, monkeypatch):
    real = train_module.linear_cross_entropy

    def loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise Failure("in the loss")
        return real(*args, **kwargs)
    monkeypatch.setattr(train_module, "linear_cross_entropy", loss)


def _fail_in_backward(trainer, at, calls):
    parameter = trainer.model.output.weight

    def hook(grad):
        calls.append(1)
        if len(calls) == at:
            raise Failure("in the backward")
        return grad
    return parameter.register_hook(hook)


@pytest.mark.parametrize("where", ["forward", "loss", "backward"])
@pytest.mark.parametrize("name", MODELS)
def test_a_run_killed_by_an_exception_in_a_step_resumes_exactly(cache, tmp_path, monkeypatch, name, where):
    """An exception in a step (before the optimizer's step) at a random step: the checkpoint then written by the
    failed trainer, resumed in a fresh one, gives the uninterrupted run; so does training the failed trainer on."""
    straight, _, per_epoch, _ = straight_run(cache, name, "full")
    at = random.Random(f"{name}-{where}").randrange(2, sum(per_epoch))
    trainer = Trainer(model(cache, name), cache, config(), out=None)
    calls = []
    if where == "forward":
        handle = _fail_in_forward(trainer, at, calls)
    elif where == "loss":
        _fail_in_loss(trainer, at, calls, monkeypatch)
    else:
        handle = _fail_in_backward(trainer, at, calls)
    with pytest.raises(Failure):
        trainer.train()
    assert trainer.step == at - 1
    if where == "loss":
        monkeypatch.undo()
    else:
        handle.remove()
    path = trainer.save_checkpoint(tmp_path / "failed.pt")
    # (Trained on first: the trainers share torch's global RNG, which a resumed trainer sets.)
    trainer.train()
    assert_same_run(straight, snapshot(trainer), f"trained on after a failure {where} step {at}")
    resumed = resume_from(cache, path, name, "full")
    resumed.train()
    assert_same_run(straight, snapshot(resumed), f"resumed after a failure {where} step {at}")


@pytest.mark.parametrize("name", ["hiertcn", "history_tcn", "hiergru"])
def test_periodic_checkpoints_saved_twice_and_resumed_twice_in_a_row(cache, tmp_path, name):
    """A run saving every 3 steps is resumed from its checkpoint, runs on (saving), is resumed again from the newer
    one, finishes: the uninterrupted run. Loading the same file twice into one trainer is the same as once, and two
    saves of one state write the same bytes."""
    straight, _, per_epoch, metrics = straight_run(cache, name, "full")
    batches = per_epoch[0]
    path = tmp_path / "run.pt"
    first_stop = random.Random(name).randrange(3, batches)
    second_stop = first_stop + batches // 2 + 1
    Trainer(model(cache, name), cache, config(max_steps=first_stop, checkpoint_path=str(path), checkpoint_every=3),
            out=None).train()
    saved = path.read_bytes()
    second = resume_from(cache, path, name, "full", max_steps=second_stop, checkpoint_path=str(path),
                         checkpoint_every=3)
    second.load_checkpoint(path)  # a second load of the same file: the same trainer
    second.train()
    assert second.step == second_stop and path.read_bytes() != saved
    again = second.save_checkpoint(tmp_path / "again.pt")
    assert again.read_bytes() == path.read_bytes(), "two saves of one state differ"
    assert torch.load(again, weights_only=True)["digest"] == checkpoint_digest(second.checkpoint())
    third = resume_from(cache, path, name, "full", checkpoint_path=str(path), checkpoint_every=3)
    third.train()
    assert_same_run(straight, snapshot(third), f"{name} resumed at steps {first_stop} and {second_stop}")
    assert evaluate(third.model, cache, "test", config()) == metrics


def test_an_earlier_checkpoint_loaded_into_a_trainer_that_went_further_rewinds_it(cache):
    """A trainer rewound to an earlier checkpoint (evaluated in between: the ops' weight caches filled) evaluates as
    it did then and trains on to the uninterrupted run."""
    straight, _, _, metrics = straight_run(cache, "hiertcn", "full")
    trainer = Trainer(model(cache), cache, config(max_steps=5), out=None).train()
    early = copy.deepcopy(trainer.checkpoint())
    early_metrics = evaluate(trainer.model, cache, "test", config())
    trainer.config.max_steps = 17
    trainer.train()
    assert evaluate(trainer.model, cache, "test", config()) != early_metrics
    trainer.load_checkpoint(early)
    assert trainer.step == 5
    assert evaluate(trainer.model, cache, "test", config()) == early_metrics
    trainer.config.max_steps = None
    trainer.train()
    assert_same_run(straight, snapshot(trainer), "rewound to step 5")
    assert evaluate(trainer.model, cache, "test", config()) == metrics


def test_a_checkpoint_written_before_training_and_one_at_the_end_resume_exactly(cache, tmp_path):
    """max_steps=0 saves the untrained run; a finished run's checkpoint resumed trains no further."""
    straight, _, _, _ = straight_run(cache, "session_gru", "full")
    path = tmp_path / "zero.pt"
    Trainer(model(cache, "session_gru"), cache, config(max_steps=0, checkpoint_path=str(path)), out=None).train()
    assert torch.load(path, weights_only=True)["step"] == 0
    resumed = resume_from(cache, path, "session_gru", "full", checkpoint_path=str(tmp_path / "end.pt"))
    resumed.train()
    assert_same_run(straight, snapshot(resumed), "resumed from step 0")
    done = resume_from(cache, tmp_path / "end.pt", "session_gru", "full").train()
    assert_same_run(straight, snapshot(done), "resumed from the end")


def test_strict_false_resume_with_another_learning_rate_and_clip_uses_the_new_ones(cache):
    """strict=False: "to continue on purpose with, say, another learning rate": the steps after the resume run at
    the new schedule and clip at the new norm."""
    trainer = Trainer(model(cache, "session_gru"), cache, config(max_steps=4), out=None).train()
    state = copy.deepcopy(trainer.checkpoint())
    resumed = Trainer(model(cache, "session_gru"), cache, config(learning_rate=0.5, grad_clip=0.0, max_steps=6),
                      out=None)
    resumed.load_checkpoint(state, strict=False)
    rates = record_learning_rates(resumed)
    norms = []
    real_clip = torch.nn.utils.clip_grad_norm_
    try:
        torch.nn.utils.clip_grad_norm_ = lambda *args, **kwargs: norms.append(1) or real_clip(*args, **kwargs)
        resumed.train()
    finally:
        torch.nn.utils.clip_grad_norm_ = real_clip
    assert rates == [0.5, 0.5] and norms == [], (rates, norms)


# With strict=False the optimizer kept the checkpoint's weight_decay: the new config's was silently ignored (the
# learning rate and grad_clip of the new config did take effect).
def test_strict_false_resume_with_another_weight_decay_uses_the_new_one(cache):
    trainer = Trainer(model(cache, "session_gru"), cache, config(max_steps=4, weight_decay=0.0), out=None).train()
    resumed = Trainer(model(cache, "session_gru"), cache, config(weight_decay=0.5), out=None)
    resumed.load_checkpoint(copy.deepcopy(trainer.checkpoint()), strict=False)
    used = [group["weight_decay"] for group in resumed.optimizer.param_groups]
    assert used == [resumed.config.weight_decay], (
        f"the optimizer steps with weight_decay {used}, the config says {resumed.config.weight_decay}")


# ---- a changed configuration is refused -------------------------------------------------------------------------

CHANGES = [
    ("learning_rate", dict(config=dict(learning_rate=0.02)), "config learning_rate: 0.01 vs 0.02"),
    ("lr_gamma", dict(config=dict(lr_gamma=0.5)), "config lr_gamma: 0.2 vs 0.5"),
    ("lr_milestones", dict(config=dict(lr_milestones=(0.5,))), "config lr_milestones"),
    ("epochs", dict(config=dict(epochs=3)), "config epochs: 2 vs 3"),
    ("grad_clip", dict(config=dict(grad_clip=1.0)), "config grad_clip: 0.05 vs 1.0"),
    ("weight_decay", dict(config=dict(weight_decay=0.0)), "config weight_decay: 0.01 vs 0.0"),
    ("seed", dict(config=dict(seed=4)), "config seed: 3 vs 4"),
    ("lanes", dict(config=dict(lanes=2)), "config lanes: 4 vs 2"),
    ("sessions_per_batch", dict(config=dict(sessions_per_batch=2)), "config sessions_per_batch: 3 vs 2"),
    ("loss", dict(config=dict(loss="sampled", num_sampled=16)), "config loss: 'full' vs 'sampled'"),
    ("width", dict(model=dict(state_hidden=4)), "model state_gru"),
    ("dropout", dict(model=dict(dropout=0.3)), "model dropout"),
    ("kernel", dict(model=dict(kernel_size=3)), "kernel_size=3"),
    ("items", dict(num_items=70), "model item_embedding: Embedding(53"),
    ("model", dict(name="hiergru"), "model class: hiertcn_fast.models.hiertcn.HierTCN vs"),
    ("history model", dict(name="history_tcn"), "model class"),
]


@pytest.fixture(scope="module")
def saved_hiertcn(cache, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "run.pt"
    Trainer(model(cache), cache, config(max_steps=5, checkpoint_path=str(path)), out=None).train()
    return path


@pytest.mark.parametrize("what, change, message", CHANGES, ids=[c[0] for c in CHANGES])
def test_resume_with_a_changed_configuration_is_refused_naming_the_difference(cache, saved_hiertcn, what, change,
                                                                              message):
    name = change.get("name", "hiertcn")
    sizes = change.get("model", {})
    built = model(cache, name, seed=5, num_items=change.get("num_items"), **sizes)
    trainer = Trainer(built, cache, config(max_steps=2, **change.get("config", {})), out=None).train()
    before = snapshot(trainer)
    on_disk = saved_hiertcn.read_bytes()
    with pytest.raises(ValueError, match="another model or schedule") as refused:
        trainer.load_checkpoint(saved_hiertcn)
    assert message in str(refused.value), str(refused.value)
    assert_same_run(before, snapshot(trainer), f"refused ({what})")
    assert saved_hiertcn.read_bytes() == on_disk


def test_resume_on_another_cache_of_the_same_catalogue_is_refused(cache, saved_hiertcn, tmp_path):
    """Same items, same model, another split of the log: the batches are another run's."""
    warm = synthetic_cache(tmp_path / "warm", num_events=1500, num_items=60, split="warm")
    assert warm.num_items == cache.num_items
    trainer = Trainer(model(cache, seed=5), warm, config(), out=None)
    before = snapshot(trainer)
    with pytest.raises(ValueError, match="cache"):
        trainer.load_checkpoint(saved_hiertcn)
    assert_same_run(before, snapshot(trainer), "refused (another cache)")


# ---- damaged, truncated and foreign files -------------------------------------------------------------------------


def _foreign_files(cache, tmp_path, good: bytes):
    """(name, bytes) of files that are not this trainer's checkpoint."""
    def saved(obj):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    state = torch.load(io.BytesIO(good), weights_only=True)
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("data.pkl", b"not a pickle")
    yield "model state_dict", saved(model(cache).state_dict())
    yield "a list", saved([1, 2, 3])
    yield "a tensor", saved(torch.zeros(3))
    yield "format /1", saved({**state, "format": "hiertcn_fast.checkpoint/1"})
    yield "no format", saved({k: v for k, v in state.items() if k != "format"})
    yield "another zip", zipped.getvalue()
    yield "a plain pickle", pickle.dumps({"format": CHECKPOINT_FORMAT})
    yield "digest changed", saved({**state, "digest": "crc32:00000000"})
    yield "step changed under the digest", saved({**state, "step": state["step"] + 1})


def test_damaged_truncated_and_foreign_files_are_refused_and_leave_everything_as_it_was(cache, tmp_path):
    """Random bit flips anywhere in the file, cuts at random lengths, and foreign files: each is refused with a
    ValueError naming the file (or, for flips in bytes no reader uses, loads the intact state); the trainer is as it
    was, its own checkpoint on disk untouched, and it trains on."""
    own = tmp_path / "own.pt"
    trainer = Trainer(model(cache, "session_gru"), cache, config(max_steps=3, checkpoint_path=str(own)),
                      out=None).train()
    good = own.read_bytes()
    intact = snapshot(trainer)
    rng = random.Random(7)
    damaged = []
    for i in range(120):
        data = bytearray(good)
        for _ in range(rng.choice([1, 1, 2, 8])):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        damaged.append((f"flip{i}", bytes(data)))
    damaged += [(f"cut{n}", good[:n]) for n in sorted(rng.sample(range(len(good)), 30)) + [0, len(good) - 1]]
    damaged += list(_foreign_files(cache, tmp_path, good))
    other = Trainer(model(cache, "session_gru", seed=4), cache, config(max_steps=2), out=None).train()
    before = snapshot(other)
    problems = []
    for what, data in damaged:
        path = tmp_path / "bad.pt"
        path.write_bytes(data)
        try:
            other.load_checkpoint(path)
        except ValueError:
            now = snapshot(other)
            if differences(before, now):
                problems.append(f"{what}: refused, but the trainer changed at {differences(before, now)[:3]}")
            continue
        except Exception as error:  # noqa: BLE001 (what escapes is the finding)
            problems.append(f"{what}: {type(error).__name__}: {str(error)[:120]}")
            continue
        loaded = snapshot(other)
        if differences(intact, {**loaded, "rng": intact["rng"]}):
            problems.append(f"{what}: loaded a state that differs from the saved one")
        other = Trainer(model(cache, "session_gru", seed=4), cache, config(max_steps=2), out=None).train()
        before = snapshot(other)
    assert not problems, "\n".join(problems[:8])
    assert own.read_bytes() == good
    trainer.config.max_steps = 5
    trainer.train()
    assert trainer.step == 5


def test_a_refused_file_does_not_touch_the_checkpoint_it_would_replace(cache, tmp_path):
    """A trainer whose checkpoint_path is the refused file: the refusal writes nothing (the bytes are as they were,
    the digest mismatch is not 'repaired')."""
    path = tmp_path / "run.pt"
    Trainer(model(cache, "session_gru"), cache, config(max_steps=3, checkpoint_path=str(path)), out=None).train()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    trainer = Trainer(model(cache, "session_gru"), cache, config(checkpoint_path=str(path), checkpoint_every=1),
                      out=None)
    with pytest.raises(ValueError, match="run.pt"):
        trainer.load_checkpoint(path)
    assert path.read_bytes() == bytes(data) and trainer.step == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


# ---- atomic writes --------------------------------------------------------------------------------------------


def checkpointed_at_2_trained_to_4(cache, tmp_path, name):
    """A run that saved its checkpoint (run.pt) at step 2 and trained on to step 4 without saving: the path, the
    file's bytes, the trainer."""
    path = tmp_path / "run.pt"
    trainer = Trainer(model(cache, name), cache, config(max_steps=2, checkpoint_path=str(path)), out=None).train()
    old = path.read_bytes()
    trainer.config.max_steps = 4
    trainer.config.checkpoint_path = None
    return path, old, trainer.train()


def test_a_save_never_opens_the_checkpoint_itself_and_renames_a_complete_file_over_it(cache, tmp_path, monkeypatch):
    """The only file opened for writing is a temporary one beside the checkpoint; when it is renamed over the
    checkpoint it holds the complete new state (it loads and resumes), and the old checkpoint is intact until
    then."""
    path, old, trainer = checkpointed_at_2_trained_to_4(cache, tmp_path, "hiertcn")
    opened, renamed = [], []
    real_open, real_replace = builtins.open, os.replace

    def spy_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            opened.append(Path(file))
        return real_open(file, mode, *args, **kwargs)

    def spy_replace(source, destination):
        assert Path(destination) == path and path.read_bytes() == old, "the old checkpoint changed before the rename"
        renamed.append(Path(source))
        state = torch.load(source, weights_only=True)
        assert state["step"] == 4 and state["digest"] == checkpoint_digest(state)
        real_replace(source, destination)

    monkeypatch.setattr(train_module, "open", spy_open, raising=False)
    monkeypatch.setattr(os, "replace", spy_replace)
    trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert len(opened) == 1 and opened == renamed and opened[0].parent == tmp_path and opened[0] != path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


@pytest.mark.parametrize("fail", ["rename", "fsync"])
def test_a_save_failing_at_its_rename_or_sync_keeps_the_old_checkpoint(cache, tmp_path, monkeypatch, fail):
    path, old, trainer = checkpointed_at_2_trained_to_4(cache, tmp_path, "session_gru")

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "replace" if fail == "rename" else "fsync", broken)
    with pytest.raises(OSError, match="I/O error"):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]
    resumed = Trainer(model(cache, "session_gru", seed=5), cache, config(), out=None).load_checkpoint(path)
    assert resumed.step == 2


# ---- checkpoints of configurations the config accepts -------------------------------------------------------------


# TrainConfig accepts checkpoint_path as an os.PathLike, and the checkpoint recorded the config as it was: a
# pathlib.Path was pickled into it, which torch.load(weights_only=True) refuses, so every checkpoint such a run
# wrote was unloadable ("not a readable hiertcn_fast checkpoint (UnpicklingError ... pathlib.PosixPath)").
def test_a_checkpoint_of_a_run_with_a_pathlike_checkpoint_path_loads(cache, tmp_path):
    path = tmp_path / "run.pt"
    trainer = Trainer(model(cache, "session_gru"), cache, config(max_steps=3, checkpoint_path=path), out=None)
    trainer.train()
    resumed = Trainer(model(cache, "session_gru", seed=5), cache, config(), out=None)
    resumed.load_checkpoint(path)
    assert resumed.step == 3


# TrainConfig accepts NumPy numbers for its real-valued fields (numbers.Real; a sweep over np.logspace gives them)
# but kept them as NumPy scalars (only the integer fields became ints): the checkpoint then held numpy scalars,
# which torch.load(weights_only=True) refuses, so the run's checkpoints could not be resumed.
@pytest.mark.parametrize("field, value", [("learning_rate", np.float64(0.01)), ("grad_clip", np.float32(0.5)),
                                          ("lr_gamma", np.float64(0.2)), ("weight_decay", np.float64(0.0))])
def test_a_checkpoint_of_a_run_configured_with_numpy_numbers_loads(cache, tmp_path, field, value):
    path = tmp_path / "run.pt"
    Trainer(model(cache, "session_gru"), cache, config(max_steps=3, checkpoint_path=str(path), **{field: value}),
            out=None).train()
    resumed = Trainer(model(cache, "session_gru", seed=5), cache, config(**{field: float(value)}), out=None)
    resumed.load_checkpoint(path)
    assert resumed.step == 3


# The history model's batcher (UserHistoryBatcher.load_state_dict) took any position: a checkpoint whose position
# was past the epoch's end (or negative) was loaded, and training then silently skipped the rest of the epoch (or ran
# an epoch -1). The lane generator's SessionBatcher refused the same position with a ValueError.
@pytest.mark.parametrize("name", ["session_gru", "history_tcn"])
@pytest.mark.parametrize("position", [dict(next_index=99), dict(epoch=-1)], ids=["past-the-end", "negative-epoch"])
def test_a_checkpoint_whose_position_is_outside_the_run_is_refused(cache, name, position):
    trainer = Trainer(model(cache, name), cache, config(max_steps=2), out=None).train()
    state = copy.deepcopy(trainer.checkpoint())
    state["source"]["batcher"].update(position)
    fresh = Trainer(model(cache, name, seed=5), cache, config(), out=None)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match="is past the end of epoch 0" if "next_index" in position
                       else "epoch must be a non-negative integer, got -1"):
        fresh.load_checkpoint(state)
    assert_same_run(before, snapshot(fresh), "refused position")


# A trainer's dropout draws come from torch's global RNG, which every trainer in the process draws from. A run
# stopped, then another trainer run in the same process (a sweep, a notebook), then checkpointed: the checkpoint
# recorded the RNG as the other run left it, and the resumed run (like the stopped trainer trained on) was not the
# uninterrupted run. A trainer now keeps the RNG states it left while it is not training.
def test_a_checkpoint_taken_after_another_trainer_ran_resumes_as_the_uninterrupted_run(cache, tmp_path):
    straight, _, _, _ = straight_run(cache, "hiertcn", "full")
    stopped = Trainer(model(cache), cache, config(max_steps=7), out=None).train()
    Trainer(model(cache, seed=2), cache, config(max_steps=3, seed=5), out=None).train()  # another run, same process
    path = stopped.save_checkpoint(tmp_path / "stopped.pt")
    resumed = resume_from(cache, path, "hiertcn", "full").train()
    assert_same_run(straight, snapshot(resumed), "checkpointed after another trainer ran, then resumed")
    # The stopped trainer itself trained on after yet another run; a loaded one whose first train() comes after
    # other draws.
    torch.manual_seed(123)
    torch.rand(50)
    stopped.config.max_steps = None
    stopped.train()
    assert_same_run(straight, snapshot(stopped), "trained on after another trainer ran")
    loaded = Trainer(model(cache, seed=4), cache, config(), out=None).load_checkpoint(path)
    torch.rand(50)
    assert_same_run(straight, snapshot(loaded.train()), "loaded, then other draws, then trained")
