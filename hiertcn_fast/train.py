"""Training and evaluation of the neural models on a :class:`~hiertcn_fast.data.SessionCache`.

The loop (:class:`Trainer`) feeds a model through the lane generator (:class:`SessionBatcher`,
batches built by producer threads into the :class:`PinnedRingQueue`), or through whole-user
batches for the single-level history TCN, and for every batch:

1. takes the high-level state of its lanes from the lane state cache, zeroing the lanes whose
   first session starts a new user (``continues``);
2. runs the model (the fused kernels in float32) and the output layer with the loss (bf16
   autocast on a GPU): full softmax cross-entropy over all items, or a sampled softmax with log-q
   correction;
3. backward, gradient clipping, Adam, and a step learning-rate schedule (multiplied by ``lr_gamma``,
   0.2 by default, at fractions ``lr_milestones`` of the run: the paper's "divided by 5 twice");
4. stores the new state, DETACHED (truncated backpropagation through time at batch boundaries).

Checkpoints hold the model, the optimizer, the generator position and the state cache, the RNG
states and the loss curve, and record what the model is and the run's schedule; resuming from one
continues exactly as if uninterrupted (tested on the CPU, where a seed makes a run reproducible),
refuses a checkpoint of another model or schedule, and restores all of it or nothing. Under
torchrun (torch.distributed initialised) the lanes of every batch are sharded across ranks, each
rank keeps the state cache of its lanes, and the loss is normalised by the events of the WHOLE
batch, so the loss curve is that of one rank on the same data (to rounding without dropout; with dropout each
rank draws its own masks, seeded with seed + rank, so the curve is one rank's in distribution, not draw for draw).

Evaluation (:func:`evaluate`) runs a model over a split with its own state cache and scores every
event against the full catalogue with :class:`~hiertcn_fast.evaluate.RankingMetrics`; the events
are the ones the rule baselines are scored on.
"""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import dataclasses
import gc
import glob
import math
import numbers
import os
import signal
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._ints import SEED_LIMIT, is_int
from .data import LaneStateCache, SessionBatch, SessionBatcher, SessionCache
from .data.cache import crc32_of, fsync_path, host_label, left_by_dead_process
from .evaluate import RankingMetrics, batch_targets
from .models import NEURAL_MODELS, HistoryBatch, NextItemModel, UserHistoryBatcher
from .backends import compiling, requested_backend
from .ops import linear_cross_entropy
from .ops.loss import _check_parameters_like_features

__all__ = ["TrainConfig", "Trainer", "evaluate", "build_model", "model_spec", "sampled_softmax_loss",
           "train_item_counts", "DataMemoryMeter", "user_lane_batches"]

LOSSES = ("full", "sampled")
SAMPLERS = ("unigram", "uniform")
# /2: checkpoints record the model (model_spec), the rank, the world size and the device type; /1 did not.
CHECKPOINT_FORMAT = "hiertcn_fast.checkpoint/2"
# The TrainConfig fields a resumed run must share with the run that wrote its checkpoint: they fix the
# batches (lanes, sessions_per_batch, seed), the learning-rate schedule (epochs: the milestones are
# fractions of the run; learning_rate, lr_milestones, lr_gamma) and every update (grad_clip,
# weight_decay, loss, num_sampled, sampler).
RESUME_FIELDS = ("epochs", "lanes", "sessions_per_batch", "learning_rate", "lr_milestones", "lr_gamma", "grad_clip",
                 "weight_decay", "loss", "num_sampled", "sampler", "seed")
# The fields that may change on resume: where the run computes (device, within its type: the
# sampler's random generator cannot move between the CPU and CUDA, so load_checkpoint refuses that on
# its own; amp, bf16 autocast, which changes rounding, not the schedule), how batches are built
# (num_producers, queue_slots: the queue hands out the same batches in the same order), what it prints
# (log_every, progress_bar), where and how often it saves (checkpoint_path, checkpoint_every) and when
# it stops (max_steps: a run is resumed to go further than it went).
RESUME_FREE_FIELDS = ("device", "amp", "num_producers", "queue_slots", "log_every", "progress_bar", "checkpoint_path",
                      "checkpoint_every", "max_steps")
# Compared only when either run samples: a full-softmax run never reads them.
SAMPLED_FIELDS = ("num_sampled", "sampler")
_ABSENT = object()  # a field or layer one side of the comparison does not have
_STDOUT = object()  # Trainer's default stream: sys.stdout when the trainer is made


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a training run (defaults: the paper's, except where noted).

    epochs: passes over the training split. lanes (B) and sessions_per_batch (S): the lane
    generator's batch (32 x 10); the history model takes ``lanes`` users per batch.
    learning_rate (paper 1e-2), lr_milestones (fractions of the run, counted in epochs: batch i of epoch e, of n
    batches, is at (e + i / n) / epochs, whatever the other epochs' batch counts), lr_gamma (0.2: "divided by 5
    twice"), grad_clip (max global norm, 5.0: not in the paper, a guard; 0 disables), weight_decay (Adam's L2).
    loss: "full" (softmax over all items) or "sampled" (num_sampled items per batch from a
    ``sampler`` proposal, "unigram" = (train counts + 1) ** 0.75 or "uniform", with log-q correction).
    amp: bf16 autocast of the output layer and loss; None = on for CUDA devices.
    device: None = CUDA when present. num_producers, queue_slots: the ring queue (0 producers:
    build batches in the consuming thread). log_every: print progress every this many steps (0:
    once per epoch). progress_bar: a live bar per epoch with loss and events/s (None: when the
    output is a terminal). checkpoint_path / checkpoint_every: write a checkpoint every this many steps
    and at the end. max_steps: stop after this many steps in total (tests, time budgets).
    """

    epochs: int = 10
    lanes: int = 32
    sessions_per_batch: int = 10
    learning_rate: float = 1e-2
    lr_milestones: tuple[float, ...] = (0.5, 0.75)
    lr_gamma: float = 0.2
    grad_clip: float = 5.0
    weight_decay: float = 0.0
    loss: str = "full"
    num_sampled: int = 1024
    sampler: str = "unigram"
    seed: int = 0
    amp: bool | None = None
    device: str | None = None
    num_producers: int = 1
    queue_slots: int = 4
    log_every: int = 0
    progress_bar: bool | None = None
    checkpoint_path: str | None = None
    checkpoint_every: int = 0
    max_steps: int | None = None

    def __post_init__(self):
        for name in ("epochs", "lanes", "sessions_per_batch", "num_sampled", "queue_slots"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("num_producers", "log_every", "checkpoint_every"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            setattr(self, name, int(value))
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        finite = all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                     for v in (self.learning_rate, self.lr_gamma, self.grad_clip, self.weight_decay))
        if (not finite or not self.learning_rate > 0 or not 0 < self.lr_gamma <= 1 or self.grad_clip < 0
                or self.weight_decay < 0):
            raise ValueError(f"learning_rate must be finite and > 0, lr_gamma in (0, 1], grad_clip and weight_decay "
                             f"finite and >= 0; got learning_rate={self.learning_rate!r}, lr_gamma={self.lr_gamma!r}, "
                             f"grad_clip={self.grad_clip!r}, weight_decay={self.weight_decay!r}")
        # Plain floats, as the integers are plain ints: a NumPy number in a checkpoint's config made it unreadable
        # by torch.load(weights_only=True).
        for name in ("learning_rate", "lr_gamma", "grad_clip", "weight_decay"):
            setattr(self, name, float(getattr(self, name)))
        milestones = self.lr_milestones
        if (isinstance(milestones, (str, bytes)) or not isinstance(milestones, collections.abc.Iterable)
                or not all(isinstance(m, numbers.Real) and not isinstance(m, bool) for m in milestones)):
            raise ValueError(f"lr_milestones must be a sequence of fractions of the run, got {milestones!r}")
        self.lr_milestones = tuple(float(m) for m in milestones)
        if any(not 0 < m < 1 for m in self.lr_milestones):
            raise ValueError(f"lr_milestones must be fractions of the run in (0, 1), got {self.lr_milestones}")
        if self.max_steps is not None:
            if not is_int(self.max_steps) or self.max_steps < 0:
                raise ValueError(f"max_steps must be a non-negative integer or None, got {self.max_steps!r}")
            self.max_steps = int(self.max_steps)
        if not is_int(self.seed) or not 0 <= self.seed <= SEED_LIMIT:
            raise ValueError(f"seed must be a non-negative integer below 2**63 (torch's generators take 64-bit seeds, "
                             f"and each rank adds its rank), got {self.seed!r}")
        self.seed = int(self.seed)
        if self.device is not None:
            try:  # (a torch.device or an index is taken too, as torch.device takes them)
                torch.device(self.device)
            except (RuntimeError, TypeError, ValueError) as error:
                raise ValueError(f"device must name a torch device (\"cpu\", \"cuda\", \"cuda:1\", ...) or be None, "
                                 f"got {self.device!r}: {error}") from None
        if self.checkpoint_path is not None:
            if not isinstance(self.checkpoint_path, (str, os.PathLike)):
                raise ValueError(f"checkpoint_path must be a path (str or os.PathLike) or None, got "
                                 f"{self.checkpoint_path!r}")
            # Kept as a str: a pathlib.Path in a checkpoint's config made it unreadable by
            # torch.load(weights_only=True).
            self.checkpoint_path = os.fsdecode(os.fspath(self.checkpoint_path))
            if not self.checkpoint_path:  # (its truthiness decides whether a checkpoint is written)
                raise ValueError("checkpoint_path is empty: name the checkpoint file, or None for no checkpoint")
        for name in ("amp", "progress_bar"):  # bool("false") would be True
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True, False or None (automatic), got {getattr(self, name)!r}")


def default_device(device=None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def build_model(name: str, num_items: int, seed: int = 0, **sizes) -> NextItemModel:
    """A model of :data:`hiertcn_fast.models.NEURAL_MODELS` by name, its parameters drawn from ``seed``."""
    if name not in NEURAL_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(NEURAL_MODELS)}")
    if not is_int(seed) or not 0 <= seed <= SEED_LIMIT:
        raise ValueError(f"seed must be a non-negative integer below 2**63, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return NEURAL_MODELS[name](num_items, **sizes)


def model_spec(model: NextItemModel) -> dict[str, str]:
    """What ``model`` is, as a checkpoint records it: its class, the session length it trains on, and
    every layer's type and sizes (its ``extra_repr``: widths, kernel size, dilation, dropout), e.g.
    ``{"class": "hiertcn_fast.models.hiertcn.HierTCN", "max_session_length": "20", ...,
    "tcn.blocks.0.conv": "CausalConv1d(16, 16, kernel_size=3, dilation=1, ...)"}``.

    Read off the module tree, not taken from :func:`build_model`'s arguments, so that it describes a
    model however it was built, and a default spelled out (``dilations=(1, 2)``) equals the default.
    Not part of it: the op backend, the dtype and the device, which change where and how precisely the
    model computes, not what it computes.
    """
    spec = {"class": f"{type(model).__module__}.{type(model).__qualname__}",
            "max_session_length": repr(getattr(model, "max_session_length", None))}
    for name, module in model.named_modules():
        if name:
            spec[name] = f"{type(module).__name__}({module.extra_repr()})"
    return spec


def train_item_counts(cache: SessionCache, split: str = "train") -> np.ndarray:
    """int64 (num_items + 1,): events per item id in ``split`` (entry 0, the padding id, is 0)."""
    code = cache.split_code(split)
    sessions = np.flatnonzero(np.asarray(cache.session_split) == code)
    offsets = np.asarray(cache.session_offsets)
    lengths = offsets[sessions + 1] - offsets[sessions]
    starts = np.repeat(offsets[sessions] - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
    return np.bincount(np.asarray(cache.item)[starts], minlength=cache.num_items + 1).astype(np.int64)


# ---- losses --------------------------------------------------------------------------------------

def sampled_softmax_loss(features: torch.Tensor, targets: torch.Tensor, output: torch.nn.Linear,
                         sampled: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Sampled softmax with log-q correction, summed over events.

    features (events, d); targets (events,) item ids; output: the model's Linear(d -> items);
    sampled (num_sampled,) item ids drawn (with replacement) from the proposal q, shared by the
    batch; log_q (items,) = log(num_sampled * q(item)), the expected-count correction. Each event's
    logits are its target's, as it is, and the sampled items' minus their log_q (importance weights
    1 / (num_sampled * q) in the partition sum); a sampled item that equals the event's target (an
    accidental hit) is masked out. The partition sum then estimates the full one, the target's term
    exactly, so the gradient approaches the full softmax's as num_sampled grows (Bengio & Senecal
    2008). (Correcting the target's logit as well, with hits removed, weighs the target by
    1 / (num_sampled * q(target)): its gradient would tend to -1, not to p(target) - 1.)
    """
    _check_sampled_loss_args(features, targets, output.weight, sampled, log_q)
    return _sampled_softmax_loss(features, targets, output, sampled, log_q)


def _sampled_softmax_loss(features, targets, output, sampled, log_q):
    """sampled_softmax_loss without its argument checks: the training step's, whose targets come from the batcher
    and whose draws from the proposal (the checks' range reductions would run at every step)."""
    weight, bias = output.weight, output.bias
    positive = (features * weight[targets]).sum(-1) + (0.0 if bias is None else bias[targets])
    negative = features @ weight[sampled].T + (0.0 if bias is None else bias[sampled]) - log_q[sampled]
    negative = negative.masked_fill(sampled[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([positive[:, None], negative], dim=1)
    # At least float32 (bf16 logits under autocast are upcast), float64 kept: .float() turned it into float32.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, torch.zeros_like(targets), reduction="sum")


def _check_sampled_loss_args(features, targets, weight, sampled, log_q) -> None:
    """sampled_softmax_loss's arguments, named: indexing would take a negative id for one from the end of the
    catalogue, and broadcasting a features/targets mismatch or a short log_q, each giving a finite, wrong loss."""
    items = weight.shape[0]
    for name, t in (("features", features), ("targets", targets), ("sampled", sampled), ("log_q", log_q)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if features.dim() != 2 or features.shape[1] != weight.shape[1]:
        raise ValueError(f"features must be (events, {weight.shape[1]}), got shape {tuple(features.shape)}")
    _check_parameters_like_features(features, weight, None)  # (the product's own error named no argument)
    for name, ids in (("targets", targets), ("sampled", sampled)):
        if ids.dtype != torch.int64 or ids.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int64 tensor of item ids, got {ids.dtype} of shape "
                             f"{tuple(ids.shape)}")
    if targets.shape[0] != features.shape[0]:
        raise ValueError(f"targets must hold one item id per row of features ({features.shape[0]}), got "
                         f"{targets.shape[0]}")
    if sampled.numel() == 0:  # (the loss was 0 with no gradient: nothing to contrast the target with)
        raise ValueError("sampled must hold at least one item id")
    if tuple(log_q.shape) != (items,):
        raise ValueError(f"log_q must be ({items},), one value per item of the output layer, got shape "
                         f"{tuple(log_q.shape)}")
    if not log_q.is_floating_point():
        raise ValueError(f"log_q must be a floating-point tensor (log of num_sampled * q), got {log_q.dtype}")
    for name, ids in (("targets", targets), ("sampled", sampled)):
        if ids.numel() and ids.device.type == "cpu" and not compiling():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= items:
                raise ValueError(f"{name} must be item ids in [0, {items}), got values in [{low}, {high}]")
    if log_q.device.type == "cpu" and sampled.device.type == "cpu" and not compiling():
        drawn = log_q[sampled]  # an item drawn has q > 0: its log_q is finite (-inf made the loss inf or NaN)
        if not bool(torch.isfinite(drawn).all()):
            bad = sampled[~torch.isfinite(drawn)]
            raise ValueError(f"log_q must be finite at every sampled item; it is {float(log_q[bad[0]])} at item "
                             f"{int(bad[0])}")


def _check_checkpoint_folder(path: str) -> None:
    """Refuse a checkpoint path whose folder cannot be made or written, without making anything: the first save
    (at checkpoint_every, or the run's end) failed there, after the training, naming the parent instead."""
    folder = Path(path).absolute().parent
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"checkpoint_path {path!r}: {str(existing)!r} is not a folder, so the checkpoint's folder "
                         f"{str(folder)!r} cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"checkpoint_path {path!r}: the folder {str(existing)!r} is not writable")


def _remove_dead_saves(path: Path) -> None:
    """Remove the temporary files of saves of ``path`` that a killed process left (SIGKILL, the OOM killer, power
    loss: each a full-sized checkpoint, under its own name, that no later save replaced): those of this host whose
    process is gone. Another host's are its own (a pid means nothing here); a name without the host (before it was
    part of it) counts as this host's."""
    prefix = f".{path.name}.tmp-"
    for candidate in path.parent.glob(f"{glob.escape(prefix)}*"):
        fields = candidate.name[len(prefix):].rsplit("-", 1)
        host, pid = (fields[0], fields[1]) if len(fields) == 2 else (host_label(), fields[0])
        if left_by_dead_process(host, pid):
            candidate.unlink(missing_ok=True)


def checkpoint_digest(state: dict) -> str:
    """CRC-32 of everything a checkpoint holds but its own ``"digest"`` entry: each tensor's dtype, shape and bytes,
    each plain value's type and repr, each container's kind and length, in the dict's order (which a save and load
    keep). :meth:`Trainer.save_checkpoint` writes it and :meth:`Trainer.load_checkpoint` checks it, since
    ``torch.load`` reads a tensor's bytes as they are: a flipped bit on disk or in transfer would otherwise resume
    from a damaged parameter or moment without a word."""
    crc = 0

    def feed(data) -> None:
        nonlocal crc
        crc = zlib.crc32(data, crc)

    def walk(value) -> None:
        nonlocal crc
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to("cpu").contiguous()
            feed(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
            crc = crc32_of(tensor.reshape(-1).view(torch.uint8).numpy(), crc)
        elif isinstance(value, dict):
            feed(f"dict {len(value)};".encode())
            for key, item in value.items():
                walk(key)
                walk(item)
        elif isinstance(value, (list, tuple)):
            feed(f"{type(value).__name__} {len(value)};".encode())
            for item in value:
                walk(item)
        else:
            feed(f"{type(value).__name__} {value!r};".encode())

    walk({key: value for key, value in state.items() if key != "digest"})
    return f"crc32:{crc:08x}"


@contextlib.contextmanager
def _sigint_deferred():
    """A Ctrl-C (SIGINT) that arrives inside the block raises its KeyboardInterrupt at the block's end, not part way.
    torch's optimizers update in several calls (fused Adam: the step counts, then the kernel; then the step hooks),
    and one landing between them left a step half taken or taken without its hooks. Only on the main thread (which
    alone receives signals) and only while Python's own handler is installed; a program's own handler is left
    alone. An error raised in the block goes on as it is (the interrupt is then dropped, the error being raised)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    failed = True
    try:
        yield
        failed = False
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and not failed:
            raise KeyboardInterrupt


class _LossStep(torch.nn.Module):
    """The model plus its loss, as one module, so that DistributedDataParallel sees every parameter
    used in its forward. forward(batch, state, targets, scale, sampled) -> (scaled loss, loss sum, new state)."""

    def __init__(self, model: NextItemModel, amp: bool, device_type: str, log_q: torch.Tensor | None,
                 every_parameter: bool = False):
        super().__init__()
        self.model = model
        self.amp, self.device_type = amp, device_type
        self.log_q = log_q
        # Under DistributedDataParallel every parameter must get a gradient at every step. The state the batch
        # leaves behind reaches the loss only through the next batch (detached there): with one session step
        # per batch the high-level GRU would get none, and DDP's reducer would fail at the next step.
        self.every_parameter = every_parameter

    def forward(self, batch, state, targets, scale: float, sampled):
        features, new_state = self.model(batch, state)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp):
            if sampled is None:
                # model.scores's logits and their cross-entropy, fused on the CPU (ops.linear_cross_entropy):
                # a model on backend='reference' keeps PyTorch's; any other picks automatically (the loss has
                # no GPU kernel, so a model on cuda or triton gets the reference composition there).
                # The classes are the items, columns 1..num_items: id 0 (the start and padding token) is never a
                # target and never ranked in the evaluation, so it is no class of the training softmax either (it
                # was, and took a share of every event's probability mass).
                output = self.model.output
                loss_backend = ("reference" if requested_backend(getattr(self.model, "backend", None)) == "reference"
                                else "auto")
                loss_sum = linear_cross_entropy(self.model.dropout(features), output.weight[1:],
                                                None if output.bias is None else output.bias[1:], targets - 1,
                                                backend=loss_backend)
            else:
                loss_sum = _sampled_softmax_loss(self.model.dropout(features), targets, self.model.output, sampled,
                                                 self.log_q)
        if self.every_parameter and isinstance(new_state, torch.Tensor) and new_state.requires_grad:
            loss_sum = loss_sum + new_state.sum() * 0.0
        if features.shape[0] == 0:
            # No event in this rank's lanes: a zero loss that still reaches every parameter, so that the
            # backward pass (and DDP's gradient all-reduce, which every rank must join) runs as usual.
            loss_sum = loss_sum.nan_to_num(0.0) + sum(p.sum() for p in self.model.parameters()) * 0.0
        return loss_sum * scale, loss_sum.detach(), new_state


# ---- data memory ----------------------------------------------------------------------------------

class DataMemoryMeter:
    """Bytes a training step holds for its data: the batch tensors plus every activation saved for
    the backward pass (parameters excluded; each storage counted once), the paper's "data memory".

    Use ``with meter.step(batch_tensors, parameters): forward...``; ``peak_bytes`` is the largest step.
    """

    def __init__(self):
        self.peak_bytes = 0

    @contextlib.contextmanager
    def step(self, tensors, parameters):
        excluded = {p.untyped_storage().data_ptr() for p in parameters}
        storages: dict[int, int] = {}
        for t in tensors:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in excluded:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.peak_bytes = max(self.peak_bytes, sum(storages.values()))


# ---- data sources -------------------------------------------------------------------------------

class _Source:
    """Batches of one split for one model kind, on ``device``, with the lane state cache and the
    position; a rank of a distributed run sees its slice of the lanes (or users)."""

    def __init__(self, model: NextItemModel, cache: SessionCache, split: str, config: TrainConfig, device,
                 shuffle: bool, rank: int = 0, world_size: int = 1):
        self.kind = model.input_kind
        self.device = device
        self.queued = config.num_producers > 0 and self.kind == "sessions"
        self.num_producers, self.queue_slots = config.num_producers, config.queue_slots
        max_length = getattr(model, "max_session_length", None)
        if self.kind == "sessions":
            self.batcher = SessionBatcher(cache, split, lanes=config.lanes, sessions_per_batch=config.sessions_per_batch,
                                          max_session_length=max_length, shuffle=shuffle, seed=config.seed)
        else:
            self.batcher = UserHistoryBatcher(cache, split, users_per_batch=config.lanes, max_session_length=max_length,
                                              shuffle=shuffle, seed=config.seed)
        if config.lanes % world_size:
            raise ValueError(f"lanes ({config.lanes}) must be a multiple of the world size ({world_size})")
        local = config.lanes // world_size
        self.rows = slice(rank * local, (rank + 1) * local)
        self.sharded = world_size > 1
        self.state_cache = None
        if model.state_shape is not None:
            layers, hidden = model.state_shape
            # In the model's dtype (a float64 model's state is float64; under autocast the parameters, and so
            # the state, stay float32).
            parameters = model.parameters() if isinstance(model, torch.nn.Module) else ()
            dtype = next((p.dtype for p in parameters if p.is_floating_point()), torch.float32)
            self.state_cache = LaneStateCache(layers, local, hidden, device=device, dtype=dtype)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from: a position just past an epoch's last batch (a run stopped or
        checkpointed there) is the next epoch's start, as the generator will treat it."""
        batcher = self.batcher
        if batcher.next_index > 0 and batcher.next_index >= self.num_batches(batcher.epoch):
            return batcher.epoch + 1
        return batcher.epoch

    def num_batches(self, epoch: int) -> int:
        return self.batcher.num_batches(epoch)

    def batches(self):
        """The remaining batches of the current epoch: (local batch on device, events of the whole batch)."""
        stream = (self.batcher.iter_queued(self.num_producers, self.queue_slots, device=self.device) if self.queued
                  else iter(self.batcher))
        # Closed on every way out: an error raised here keeps this frame (and the stream in it) alive as long as
        # the error is held, and with it the queue's producer threads and slots.
        with contextlib.closing(stream):
            for batch in stream:
                try:
                    batch = batch.to(self.device)  # (the queue's are there already: no copy)
                    total_events = int(batch.lengths.sum())
                    local = self._local(batch) if self.sharded else batch
                except BaseException:  # the batcher counts it as handed out: give it back, not skip it
                    self.batcher.epoch, self.batcher.next_index = batch.epoch, batch.index
                    raise
                yield local, total_events

    def _local(self, batch):
        rows = self.rows
        if isinstance(batch, HistoryBatch):
            return batch.rows(rows)
        fields = {name: t[:, rows] for name, t in batch.tensors().items() if name not in ("step_widths", "continues")}
        return SessionBatch(step_widths=batch.step_widths, continues=batch.continues[rows], epoch=batch.epoch,
                            index=batch.index, **fields)

    def targets(self, batch) -> dict:
        return batch.targets() if isinstance(batch, HistoryBatch) else batch_targets(batch)

    def begin(self, batch):
        if self.state_cache is None:
            return None
        return self.state_cache.reset_lanes(batch.continues).clone()

    def end(self, batch, new_state) -> None:
        if self.state_cache is not None:
            self.state_cache.store(new_state)

    def state_dict(self) -> dict:
        return {"batcher": self.batcher.state_dict(),
                "lane_state": None if self.state_cache is None else self.state_cache.state.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.batcher.load_state_dict(state["batcher"])
        if self.state_cache is not None:
            self.state_cache.store(state["lane_state"].to(self.state_cache.state.device))


# ---- the loop -------------------------------------------------------------------------------------

class Trainer:
    """Trains ``model`` on the training split of ``cache`` with ``config``; see the module docstring.

    After :meth:`train`: ``curve`` [(step, mean loss per event)], ``train_events``,
    ``train_seconds``, ``events_per_second``, ``peak_memory_bytes`` (CUDA: device peak; CPU: the
    data memory of the largest step, :class:`DataMemoryMeter`), ``memory_kind`` says which.
    """

    def __init__(self, model: NextItemModel, cache: SessionCache, config: TrainConfig | None = None, name: str = "",
                 out=_STDOUT):
        if not isinstance(model, NextItemModel):
            raise TypeError(f"model must be a NextItemModel, got {type(model).__name__}")
        self.config = config = config or TrainConfig()
        # Refused before any work: a checkpoint that cannot be written failed only at the run's end, and a period
        # without a path wrote nothing without a word.
        if config.checkpoint_every and config.checkpoint_path is None:
            raise ValueError(f"checkpoint_every={config.checkpoint_every} needs a checkpoint_path to write to")
        if config.checkpoint_path is not None and os.path.isdir(config.checkpoint_path):
            raise ValueError(f"checkpoint_path {config.checkpoint_path!r} is a folder: name the checkpoint file "
                             f"(e.g. {os.path.join(config.checkpoint_path, 'checkpoint.pt')!r})")
        if config.checkpoint_path is not None:
            _check_checkpoint_folder(config.checkpoint_path)
        self.name = name or type(model).__name__
        self.out = sys.stdout if out is _STDOUT else out  # the stream of now, not of import time (None: silent)
        self.device = default_device(config.device)
        self.model = model.to(self.device)
        self.cache = cache
        self.distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.world_size = torch.distributed.get_world_size() if self.distributed else 1
        self.source = _Source(model, cache, "train", config, self.device, shuffle=True, rank=self.rank,
                              world_size=self.world_size)
        self.amp = (self.device.type == "cuda") if config.amp is None else bool(config.amp)
        # torch's fused Adam: one kernel over all parameters (on HierTCN's ~1M, 0.7 ms a step against 2.9 ms for
        # the per-parameter loop, on two CPU cores); it takes floating-point CPU and CUDA parameters. Its step
        # moves no version counter: the ops' weight caches hear of it through an optimizer step hook (ops/conv.py).
        parameters = list(model.parameters())
        self.fused_optimizer = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters)
        self.optimizer = torch.optim.Adam(parameters, lr=config.learning_rate, weight_decay=config.weight_decay,
                                          fused=self.fused_optimizer)
        log_q = None
        self.proposal = None
        if config.loss == "sampled":
            counts = train_item_counts(cache).astype(np.float64)
            # Every item has mass, one unseen in training too (add-one smoothing of the counts): with q = 0 it was
            # never drawn, and the sampled partition sum missed its term (its output row never got the negative
            # gradient the full softmax gives it).
            weights = (counts + 1.0) ** 0.75 if config.sampler == "unigram" else np.ones_like(counts)
            weights[0] = 0.0
            self.proposal = torch.from_numpy(weights / weights.sum()).to(self.device, torch.float32)
            log_q = torch.log(config.num_sampled * self.proposal.clamp(min=1e-30))
            # Draws by inverse CDF (torch.multinomial stops at 2^24 categories; catalogues go far beyond): a
            # uniform u in [0, total) lands on the item whose cumulative interval holds it, so an item without
            # mass (the padding id 0) is never drawn; float64 sums keep small items' intervals exact enough.
            self.proposal_cdf = torch.from_numpy(np.cumsum(weights)).to(self.device)
            self.proposal_last = int(np.flatnonzero(weights)[-1]) if weights.any() else 0
        self.sampler = torch.Generator(device=self.device)
        self.sampler.manual_seed(config.seed)
        # Set by the optimizer's first step post-hook, the moment its parameters have moved (see _train_step; a
        # Ctrl-C during the step is deferred to its end, _sigint_deferred); a list, not an attribute the hook sets
        # on self: a hook holding the trainer would make a reference cycle.
        stepped = self._optimizer_stepped = [False]
        self.optimizer.register_step_post_hook(lambda optimizer, args, kwargs: stepped.__setitem__(0, True))
        self._pending_rollback = None  # an interrupted step's restore not yet applied in full (_apply_rollback)
        step_module = _LossStep(model, self.amp, self.device.type, log_q, every_parameter=self.distributed)
        if self.distributed:
            step_module = torch.nn.parallel.DistributedDataParallel(step_module)
        self.loss_step = step_module
        self._ddp_stale = False  # a step was given back under DDP: train() renews the wrapper first (_renew_ddp)
        self.step = 0
        self.curve: list[tuple[int, float]] = []
        self.train_events = 0
        self.train_seconds = 0.0
        self.memory = DataMemoryMeter()
        self._rng_seeded = False
        # The global RNGs (dropout's) as this trainer left them, while it is not training: another trainer (or
        # anything else drawing) may move them in between, and train() and checkpoint() use this trainer's own.
        self._rng_held = None

    # ---- schedule ----

    def learning_rate(self, epoch: int, index: int) -> float:
        """The step schedule at batch ``index`` of ``epoch``: a pure function of the position, so a
        resumed run follows it exactly."""
        batches = max(self.source.num_batches(epoch), 1)
        # One division of exact integers: a milestone at an exact fraction of the run (0.4 of 15 steps) falls on
        # its step, where (epoch + index / batches) / epochs could round just below it.
        progress = (epoch * batches + index) / (batches * self.config.epochs)
        passed = sum(progress >= m for m in self.config.lr_milestones)
        return self.config.learning_rate * self.config.lr_gamma ** passed

    # ---- one step ----

    def _train_step(self, batch, total_events: int, rng=None, lanes=None, counted=None) -> float:
        """One step on ``batch``, counted (step, curve, events). A step that raises before the optimizer's step
        has moved the parameters (an interrupt, a transient error) gives its batch back: the generator's
        position, the lanes' state and the random generators return to where the step found them, so a
        checkpoint taken then, or another train() call, runs this batch again as an uninterrupted run does. One
        that raises after it (in the optimizer's other hooks, the all-reduce of the loss, or reading it) is
        counted with a NaN loss: its parameters moved. (rng, lanes and counted are parameters, not locals, so that no
        statement precedes the try: an interrupt there would escape the rollback.)"""
        try:
            counted = self.step
            self._optimizer_stepped[0] = False
            rng = (torch.get_rng_state(),
                   torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                   self.sampler.get_state())
            cache = self.source.state_cache
            lanes = None if cache is None else cache.state.clone()
            loss = self._run_step(batch, total_events)
            self._count_step(loss, total_events)  # (inside: an interrupt as it starts is a step to count, below)
        except BaseException:
            if not self._optimizer_stepped[0]:
                # Kept until applied in full: a second interrupt during the restore leaves it pending, and train()
                # and checkpoint() apply it first.
                self._pending_rollback = (batch.epoch, batch.index, lanes, rng)
                self._apply_rollback()
            elif self.step == counted:
                # The parameters moved and the lanes' state is stored: the step happened, only its loss (the
                # all-reduce, the read of the value) is lost. Counted, so a checkpoint's step matches its parameters.
                self._count_step(float("nan"), total_events)
            raise
        return loss

    def _apply_rollback(self) -> None:
        """Give back an interrupted step's batch (see _train_step): the generator's position, the lanes' state
        and the random generators as the step found them. Idempotent; a no-op when nothing is pending."""
        if self._pending_rollback is None:
            return
        epoch, index, lanes, rng = self._pending_rollback
        self.source.batcher.epoch, self.source.batcher.next_index = epoch, index
        if lanes is not None:  # (None: the step failed before its snapshot, which it had not changed yet)
            self.source.state_cache.state.copy_(lanes)
        if rng is not None:
            if self._rng_held is not None:  # the step's draws are taken back from this trainer's own RNGs
                _set_global_rngs(self._rng_held)
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1], self.device)
            self.sampler.set_state(rng[2])
            if self._rng_held is not None:
                self._rng_held = _global_rngs()
        self._pending_rollback = None

    def _count_step(self, loss: float, total_events: int) -> None:
        # The counters in one assignment and the curve's append last: an interrupt can land only as a call
        # returns, so none lands between the two counters (it did between the append and the events).
        point = (self.step + 1, loss)
        self.step, self.train_events = point[0], self.train_events + total_events
        self.curve.append(point)

    def _draw_sampled(self) -> torch.Tensor:
        """num_sampled item ids from the proposal, with replacement, by inverse CDF on the sampler generator."""
        cdf = self.proposal_cdf
        u = torch.rand(self.config.num_sampled, generator=self.sampler, device=cdf.device, dtype=torch.float64)
        return torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=self.proposal_last)

    def _run_step(self, batch, total_events: int) -> float:
        config = self.config
        state = self.source.begin(batch)
        targets = self.source.targets(batch)["targets"]
        lr = self.learning_rate(batch.epoch, batch.index)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sampled = None
        if self.proposal is not None:
            sampled = self._draw_sampled()
        # DDP averages gradients over ranks: scale each rank's sum so the average is the mean over the
        # events of the whole batch.
        scale = self.world_size / max(total_events, 1)
        tensors = list(batch.tensors().values()) if isinstance(batch, SessionBatch) else [batch.items]
        with self.memory.step(tensors, self.model.parameters()):
            loss, loss_sum, new_state = self.loss_step(batch, state, targets, scale, sampled)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
        if config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(gradients) if gradients else torch.zeros(())
        # A diverged step (too high a learning rate, bad data) stops here, before it moves the parameters: the
        # step is given back (see _train_step), where the run went on with NaN and failed only in the evaluation.
        # The gradient norm is the same on every rank after DDP's all-reduce, so every rank raises alike; the
        # local loss is looked at only without DDP (one rank alone raising would leave the others waiting).
        finite = bool(torch.isfinite(norm)) and (self.distributed or bool(torch.isfinite(loss_sum)))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            overflowed = not all(bool(torch.isfinite(p).all()) for p in self.model.parameters())
            raise FloatingPointError(
                f"{self.name}: step {self.step + 1} (epoch {batch.epoch}) diverged at learning rate {lr:g}: loss "
                f"{float(loss_sum) / max(total_events, 1):g} per event, gradient norm {float(norm):g}"
                + (" (the parameters were already non-finite: an earlier step's update overflowed them)"
                   if overflowed else "")
                + ". This step is not applied; lower the learning rate (or set grad_clip) and train again")
        self.source.end(batch, new_state)  # before the optimizer's step: undone with the rest if that raises
        # All of the step or none of it: its first post-hook marks the batch spent, and a Ctrl-C cannot land between
        # the update and that hook (the batch was then given back and trained twice on moved parameters).
        with _sigint_deferred():
            self.optimizer.step()
        if self.distributed:
            torch.distributed.all_reduce(loss_sum)
        return float(loss_sum) / max(total_events, 1)

    # ---- the run ----

    def train(self) -> "Trainer":
        config = self.config
        self._apply_rollback()
        if self._ddp_stale:
            self._renew_ddp()
        if not self._rng_seeded and self.step == 0:
            torch.manual_seed(config.seed + self.rank)  # dropout; a resumed run restores the RNG instead
            self._rng_seeded = True
        elif self._rng_held is not None:
            _set_global_rngs(self._rng_held)
        self._rng_held = None
        try:
            return self._train()
        finally:
            self._rng_held = _global_rngs()

    def _train(self) -> "Trainer":
        config = self.config
        self.model.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        def finished() -> bool:
            return config.max_steps is not None and self.step >= config.max_steps

        # The steps counted and the generator's position after the last batch they trained, in one tuple: a batch
        # the batcher has counted as handed out but no step has used (an interrupt in the generators, or between
        # them and _train_step's own give-back) goes back from here.
        mark = (self.step, (self.source.batcher.epoch, self.source.batcher.next_index))
        while self.source.epoch < config.epochs and not finished():
            epoch = self.source.epoch
            epoch_loss, epoch_events = 0.0, 0
            bar = self._progress_bar(epoch)
            started = time.perf_counter()
            try:
                for batch, total_events in self.source.batches():
                    counted = self.step
                    self._optimizer_stepped[0] = False
                    try:
                        loss = self._train_step(batch, total_events)  # counts the step
                    except BaseException:
                        moved = self._optimizer_stepped[0]
                        if self.distributed and not moved:
                            self._ddp_stale = True
                        # Raised before _train_step's own rollback could run (an interrupt at its entry): the
                        # batch was not used, so it goes back. (After that rollback this sets the same position.)
                        # Once the optimizer stepped, the batch was used: counted, never given back.
                        if self.step == counted and not moved:
                            self.source.batcher.epoch, self.source.batcher.next_index = batch.epoch, batch.index
                        elif self.step == counted:
                            self._count_step(float("nan"), total_events)
                        raise
                    mark = (self.step, (batch.epoch, batch.index + 1))
                    epoch_loss += loss * total_events
                    epoch_events += total_events
                    if bar is not None:
                        seconds = self.train_seconds + time.perf_counter() - started
                        bar.set_postfix_str(f"loss {loss:.4f}, {self.train_events / seconds:,.0f} events/s",
                                            refresh=False)
                        bar.update(1)
                    if config.log_every and self.step % config.log_every == 0:
                        self._log(epoch, loss, self.train_events, self.train_seconds + time.perf_counter() - started)
                    if config.checkpoint_path and config.checkpoint_every and self.step % config.checkpoint_every == 0:
                        self.train_seconds += time.perf_counter() - started
                        try:  # the save's time is not training time; nor is it when the save fails
                            self.save_checkpoint(config.checkpoint_path)
                        finally:
                            started = time.perf_counter()
                    # Stop only after a batch is consumed: the generator has already counted it as handed out.
                    if finished():
                        break
            except BaseException:
                if self.step == mark[0]:  # no step since the mark: the batch in flight (if any) goes back
                    self.source.batcher.epoch, self.source.batcher.next_index = mark[1]
                raise
            finally:
                # An interrupted epoch's time counts too (events/s, checkpoints): its steps' events do.
                self.train_seconds += time.perf_counter() - started
                if bar is not None:
                    bar.close()
            if epoch_events and not config.log_every:
                self._log(epoch, epoch_loss / epoch_events, self.train_events, self.train_seconds)
        if config.checkpoint_path:
            self.save_checkpoint(config.checkpoint_path)
        return self

    def _renew_ddp(self) -> None:
        """A new DistributedDataParallel wrapper after a step given back under DDP. A step that raised during its
        backward (an interrupt in an op's backward, an error in a gradient hook) left DDP's reducer part way
        through an iteration, some gradients marked ready and the reduction never finished; the next forward then
        failed on every rank ("Expected to have finished reduction in the prior iteration"), pointing at unused
        parameters. The old wrapper goes first (its reducer removes the hooks it put on the parameters); the new
        one checks the parameters' shapes across ranks and broadcasts rank 0's, the same on every rank since no
        optimizer step ran. A collective: every rank gave its step back, so every rank renews it here."""
        module = self.loss_step.module if isinstance(self.loss_step, torch.nn.parallel.DistributedDataParallel) \
            else self.loss_step
        self.loss_step = module
        gc.collect()  # the old wrapper, should a reference cycle hold it, with its reducer's hooks
        self.loss_step = torch.nn.parallel.DistributedDataParallel(module)
        self._ddp_stale = False

    def _progress_bar(self, epoch: int):
        """A tqdm bar over this epoch's batches, or None (not rank 0, no output, or not wanted)."""
        if self.rank != 0 or self.out is None:
            return None
        wanted = self.config.progress_bar
        if wanted is None:
            wanted = hasattr(self.out, "isatty") and self.out.isatty()
        if not wanted:
            return None
        from tqdm import tqdm

        return tqdm(total=self.source.num_batches(epoch), file=self.out, leave=False, unit="batch",
                    desc=f"[{self.name}] epoch {epoch + 1}/{self.config.epochs}")

    def _log(self, epoch: int, loss: float, events: int, seconds: float) -> None:
        if self.rank != 0 or self.out is None:
            return
        rate = events / seconds if seconds > 0 else float("nan")
        print(f"[{self.name}] epoch {epoch + 1}/{self.config.epochs} step {self.step} loss {loss:.4f} "
              f"lr {self.optimizer.param_groups[0]['lr']:.2e} {rate:,.0f} events/s", file=self.out, flush=True)

    @property
    def events_per_second(self) -> float | None:
        return self.train_events / self.train_seconds if self.train_seconds > 0 else None

    @property
    def memory_kind(self) -> str:
        return ("peak device memory allocated (torch.cuda.max_memory_allocated)" if self.device.type == "cuda" else
                "data memory: the largest step's batch tensors plus activations saved for backward")

    @property
    def peak_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(self.memory.peak_bytes)

    # ---- checkpoints ----

    def checkpoint(self) -> dict:
        """Everything a resume needs (tensors and plain containers only, so it loads with
        ``torch.load(weights_only=True)``); the model and optimizer entries share the live tensors."""
        self._apply_rollback()
        return {"format": CHECKPOINT_FORMAT, "name": self.name, "model_spec": model_spec(self.model),
                "config": dataclasses.asdict(self.config), "world_size": self.world_size, "rank": self.rank,
                "device_type": self.device.type, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "source": self.source.state_dict(), "step": self.step,
                "curve": list(self.curve),
                "train_events": self.train_events, "train_seconds": self.train_seconds,
                **self._rng_states()}

    def _rng_states(self) -> dict:
        """The global RNGs for a checkpoint. Before the first train() they are not yet seeded (train() seeds them
        with config.seed + rank): the checkpoint holds them as seeded, without seeding them here, so a run
        resumed from it draws what the uninterrupted run draws."""
        if self._rng_held is not None:  # not training: its own, whatever drew from the global ones since
            rng, cuda = self._rng_held
            return {"rng": rng.clone(), "sampler": self.sampler.get_state(),
                    "cuda_rng": None if cuda is None else [state.clone() for state in cuda]}
        if self._rng_seeded or self.step > 0:
            rng, cuda = _global_rngs()
            return {"rng": rng, "sampler": self.sampler.get_state(), "cuda_rng": cuda}
        seed = self.config.seed + self.rank
        cpu = torch.Generator()
        cpu.manual_seed(seed)
        cuda = None
        if torch.cuda.is_available():  # torch.manual_seed seeds every device's generator alike
            cuda = []
            for device in range(torch.cuda.device_count()):
                generator = torch.Generator(device=f"cuda:{device}")
                generator.manual_seed(seed)
                cuda.append(generator.get_state())
        return {"rng": cpu.get_state(), "sampler": self.sampler.get_state(), "cuda_rng": cuda}

    def save_checkpoint(self, path) -> Path:
        """Write :meth:`checkpoint` durably; per rank in a distributed run (``path.rank<r>``).

        The checkpoint goes to a temporary file beside ``path``, flushed and fsync'ed, renamed over
        ``path``, and the directory is fsync'ed, so a crash or power loss leaves the old checkpoint or
        the new one, never an empty or partial file; a failed write (a full disk, Ctrl-C) removes its
        temporary file and leaves the old checkpoint in place. The file holds a digest of its contents
        (:func:`checkpoint_digest`), which :meth:`load_checkpoint` checks.
        """
        path = Path(path if self.world_size == 1 else f"{path}.rank{self.rank}")
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_saves(path)
        temporary = path.with_name(f".{path.name}.tmp-{host_label()}-{os.getpid()}")
        state = self.checkpoint()
        state["digest"] = checkpoint_digest(state)
        try:
            with open(temporary, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
            fsync_path(path.parent)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return path

    def load_checkpoint(self, path_or_state, *, strict: bool = True) -> "Trainer":
        """Restore everything :meth:`checkpoint` holds; :meth:`train` then continues where it stopped.

        The checkpoint must come from the same model (:func:`model_spec`: class, session length, every
        layer's sizes), the same schedule (the TrainConfig fields in ``RESUME_FIELDS``) and the same
        rank of the same world size; otherwise ValueError lists every difference, saved vs now.
        ``strict=False`` skips that comparison, to continue on purpose with, say, another learning
        rate; what cannot be loaded (parameter shapes, the batches' identity, the sampler's generator
        state from another device type) is still refused.

        All or nothing: a checkpoint refused at any point leaves the model, the optimizer, the
        generator position and state cache, the RNGs and the counters as they were. A file is read
        with ``torch.load(weights_only=True)``, which runs no code from it, and is refused (ValueError) when its
        contents no longer match the digest :meth:`save_checkpoint` wrote into it. A dict is taken as it is (one
        edited on purpose included): no digest is checked.
        """
        state, problem, before = path_or_state, None, None
        try:
            if not isinstance(state, dict):
                path = Path(path_or_state if self.world_size == 1 else f"{path_or_state}.rank{self.rank}")
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                except (FileNotFoundError, IsADirectoryError, PermissionError):
                    raise  # the path, not the file's contents
                # A damaged or foreign file: torch's zip reader raises OSError for many a truncated one, and its
                # weights-only unpickler UnpicklingError (advising weights_only=False) for other damage.
                # A flipped bit can also make the unpickler's own code fail (an AttributeError where a dtype became
                # a str): any error of reading the contents is the file's.
                except Exception as error:  # noqa: BLE001
                    raise ValueError(f"{path}: not a readable hiertcn_fast checkpoint ({type(error).__name__}: "
                                     f"{error})") from error
            if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
                found = state.get("format") if isinstance(state, dict) else type(state).__name__
                raise ValueError(f"not a hiertcn_fast checkpoint of this version (format {found!r}, "
                                 f"expected {CHECKPOINT_FORMAT!r})")
            if not isinstance(path_or_state, dict) and "digest" in state:
                found = checkpoint_digest(state)
                if found != state["digest"]:
                    raise ValueError(f"{path}: a damaged checkpoint: its contents' digest is {found}, not the "
                                     f"{state['digest']!r} written with them (a bit flipped on disk or in a copy)")
            before = self._restorable_state()
            missing = sorted(before.keys() - state.keys())
            if missing:
                raise ValueError(f"checkpoint lacks {missing}")
            problems = self._entry_problems(state)
            if problems:
                raise ValueError("checkpoint cannot be loaded:\n  " + "\n  ".join(problems))
            if state["device_type"] != self.device.type:
                raise ValueError(f"checkpoint was written on {state['device_type']} and this trainer runs on "
                                 f"{self.device.type}: the sampler's random generator state does not carry over")
            if strict:
                differences = self._checkpoint_differences(state)
                if differences:
                    raise ValueError("checkpoint was written by another model or schedule (saved vs now; "
                                     "strict=False resumes anyway):\n  " + "\n  ".join(differences))
            problems = self._fit_problems(state)
            if problems:
                raise ValueError("checkpoint cannot be loaded:\n  " + "\n  ".join(problems))
        except BaseException as error:  # in a distributed run, said to the other ranks before it is raised
            problem = error
        if self.distributed:
            self._agree_on_checkpoint(state if problem is None else None, problem)
        if problem is not None:
            # An error held in a local of the frame that raises it is a reference cycle (error -> traceback ->
            # frame -> error) that kept this trainer (its model, optimizer, and DDP with its process group) alive
            # after the caller let go of it, until the cyclic collector ran: in a distributed run possibly after
            # destroy_process_group, or during the interpreter's shutdown. The frame drops its reference here.
            try:
                raise problem
            finally:
                problem = None
        rng_seeded, rng_held = self._rng_seeded, self._rng_held
        failure = None
        try:
            self._restore(state)
        except BaseException as error:
            failure = error
        if self.distributed:
            # All restored or none: a rank whose restore failed tells the others, which go back too.
            _, failed = self._ranks_say(None, failure)
            if failed and failure is None:
                failure = ValueError("another rank could not restore its checkpoint, so no rank resumes:\n  "
                                     + "\n  ".join(failed))
        if failure is not None:
            self._restore(before)
            self._rng_seeded, self._rng_held = rng_seeded, rng_held
            try:  # without a reference cycle, as above
                raise failure
            finally:
                failure = None
        return self

    def _agree_on_checkpoint(self, state, problem) -> None:
        """Every rank resumes from the same step or none does. Ranks save their checkpoints one by one, so a job
        stopped between two saves leaves files of different steps; each rank would resume from its own, with
        other parameters and batches, and the run would diverge or hang. A collective call: each rank says what
        it read (or that it could not), and all raise the same ValueError when they disagree."""
        steps, failed = self._ranks_say(None if problem is not None else state.get("step"), problem)
        if failed and problem is None:
            raise ValueError("another rank could not read its checkpoint, so no rank resumes:\n  "
                             + "\n  ".join(failed))
        if not failed and len(set(steps)) > 1:
            shown = ", ".join(f"rank {r}: {step}" for r, step in enumerate(steps))
            raise ValueError(f"the ranks' checkpoints hold different steps ({shown}), as a job stopped between two "
                             "ranks' saves leaves them: resume from a checkpoint every rank wrote at the same step")

    def _ranks_say(self, value, error):
        """A collective call: every rank's ``value``, and "rank r: error" for each rank that passed an error."""
        everyone = [None] * self.world_size
        # The type and the message (its repr hid an OSError's file: "FileNotFoundError(2, 'No such file ...')").
        said = None if error is None else f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        torch.distributed.all_gather_object(everyone, (value, said))
        return [v for v, _ in everyone], [f"rank {r}: {e}" for r, (_, e) in enumerate(everyone) if e is not None]

    def _checkpoint_differences(self, state: dict) -> list[str]:
        """'what: saved vs now' for every recorded fact of ``state`` that differs from this trainer's."""
        differences = []

        def compare(what, saved, now, show=repr):
            if saved != now:
                saved, now = ("absent" if value is _ABSENT else show(value) for value in (saved, now))
                differences.append(f"{what}: {saved} vs {now}")

        saved_spec, spec = state["model_spec"], model_spec(self.model)
        for key in [*saved_spec, *(key for key in spec if key not in saved_spec)]:
            compare(f"model {key}", saved_spec.get(key, _ABSENT), spec.get(key, _ABSENT), show=str)
        saved_config, config = state["config"], dataclasses.asdict(self.config)
        samples = "sampled" in (saved_config.get("loss"), config["loss"])
        for name in RESUME_FIELDS:
            if samples or name not in SAMPLED_FIELDS:
                compare(f"config {name}", saved_config.get(name, _ABSENT), config[name])
        compare("world_size", state["world_size"], self.world_size)
        compare("rank", state["rank"], self.rank)
        return differences

    def _entry_problems(self, state: dict) -> list[str]:
        """What in ``state`` (which has every entry) is of the wrong kind to load, checked before anything is
        changed (and with :meth:`_fit_problems` after the strict comparison: the optimizer's state above all,
        as torch's Optimizer.load_state_dict checks only the sizes of the parameter groups, and fused Adam then
        reads and writes a moment of another shape past its end, a crash, or fails at every later step on a
        missing one)."""
        problems = []
        for key in ("model_spec", "config", "model", "optimizer", "source"):
            if not isinstance(state[key], dict):
                problems.append(f"{key}: expected a dict, got {type(state[key]).__name__}")
        for key in ("step", "train_events"):
            value = state[key]
            if not is_int(value) or value < 0:
                problems.append(f"{key}: expected an integer >= 0, got {value!r}")
        seconds = state["train_seconds"]
        if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real) or not 0 <= seconds < math.inf:
            problems.append(f"train_seconds: expected a finite number >= 0, got {seconds!r}")
        if not isinstance(state["curve"], (list, tuple)) or not all(
                isinstance(point, (list, tuple)) and len(point) == 2 for point in state["curve"]):
            problems.append("curve: expected a list of (step, loss) pairs")
        if not isinstance(state["rng"], torch.Tensor) or state["rng"].dtype != torch.uint8:
            problems.append("rng: expected torch's RNG state (a uint8 tensor)")
        if isinstance(state["source"], dict) and self.source.state_cache is not None and not isinstance(
                state["source"].get("lane_state"), torch.Tensor):
            problems.append("source: expected the lanes' state (a tensor) under 'lane_state'")
        return problems

    def _fit_problems(self, state: dict) -> list[str]:
        """Whether the parameters and the optimizer's state fit this trainer's model (after _entry_problems):
        the parameters' names and shapes, then (only if those fit: a moment follows its parameter) the moments."""
        problems = []
        if isinstance(state["model"], dict):
            current = self.model.state_dict()
            missing = [key for key in current if key not in state["model"]]
            unexpected = [key for key in state["model"] if key not in current]
            if missing or unexpected:
                problems.append(f"model: another model's parameters (missing {missing[:4]}, unexpected "
                                f"{unexpected[:4]}{', ...' if len(missing) > 4 or len(unexpected) > 4 else ''})")
            problems += [f"model: size mismatch for {key}: saved {tuple(value.shape)} vs now "
                         f"{tuple(current[key].shape)}" for key, value in state["model"].items()
                         if key in current and isinstance(value, torch.Tensor) and value.shape != current[key].shape]
        if isinstance(state["optimizer"], dict) and not problems:
            problems += self._optimizer_state_problems(state["optimizer"])
        return problems

    def _optimizer_state_problems(self, saved: dict) -> list[str]:
        """Adam's state per parameter, as this trainer's parameters need it: the moments (and max_exp_avg_sq with
        amsgrad) as tensors of the parameter's shape, and the step count."""
        groups, state = saved.get("param_groups"), saved.get("state")
        if not isinstance(groups, list) or not isinstance(state, dict) or not all(
                isinstance(group, dict) and isinstance(group.get("params"), list) for group in groups):
            return ["optimizer: expected an optimizer state_dict (a dict of 'state' and 'param_groups')"]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        amsgrad = {index: bool(group.get("amsgrad")) for group in groups for index in group["params"]}
        problems = []
        for index, entry in state.items():
            if index not in amsgrad or not isinstance(index, int) or not 0 <= index < len(params):
                problems.append(f"optimizer: state for parameter {index!r}, which no parameter group lists")
                continue
            expected = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad[index] else set())
            if not isinstance(entry, dict) or set(entry) != expected:
                found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                problems.append(f"optimizer: parameter {index}'s state holds {found}, expected {sorted(expected)}")
                continue
            shape = tuple(params[index].shape)
            for key in sorted(expected - {"step"}):
                value = entry[key]
                if not isinstance(value, torch.Tensor) or not value.is_floating_point() or tuple(value.shape) != shape:
                    found = (f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor)
                             else type(value).__name__)
                    problems.append(f"optimizer: parameter {index}'s {key} is {found}, expected a floating tensor "
                                    f"of the parameter's shape {shape}")
            step = entry["step"]
            if not (isinstance(step, torch.Tensor) and step.numel() == 1 and bool(step.isfinite().all())
                    and float(step) >= 0) and not (isinstance(step, numbers.Real) and 0 <= step < math.inf):
                problems.append(f"optimizer: parameter {index}'s step must be one finite count >= 0")
        return problems

    def _restorable_state(self) -> dict:
        """A :meth:`checkpoint` that owns its tensors: what a refused checkpoint is rolled back to. The global
        RNGs as they are (checkpoint() gives an unseeded trainer's as seeded: the rollback must not seed them)."""
        state = self.checkpoint()
        state["model"] = {key: value.clone() for key, value in state["model"].items()}
        state["optimizer"] = copy.deepcopy(state["optimizer"])
        state["rng"], state["cuda_rng"] = _global_rngs()
        return state

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        # A copy: Optimizer.load_state_dict keeps the given tensors (a shallow copy), which training would then
        # change in place: the caller's dict, or the live state of the trainer whose checkpoint() it is.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        for group in self.optimizer.param_groups:  # a checkpoint's options would replace this trainer's choice
            group["fused"], group["foreach"] = self.fused_optimizer or None, None
            # and its weight decay the config's (a resume with strict=False continues with the config's; the
            # learning rate is set at every step from the config's schedule)
            group["weight_decay"] = self.config.weight_decay
        self.source.load_state_dict(state["source"])
        self.step, self.curve = int(state["step"]), [tuple(p) for p in state["curve"]]
        self.train_events, self.train_seconds = int(state["train_events"]), float(state["train_seconds"])
        _set_global_rngs((state["rng"], state["cuda_rng"]))
        self.sampler.set_state(state["sampler"])
        self._rng_seeded = True
        self._rng_held = _global_rngs()  # what train() starts from, whatever draws from the global ones meanwhile


# ---- evaluation -----------------------------------------------------------------------------------

def _global_rngs() -> tuple:
    """Copies of torch's global RNG states: the CPU's, and every CUDA device's (None without CUDA)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_global_rngs(states) -> None:
    rng, cuda = states
    torch.set_rng_state(rng)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _set_modes(modes) -> None:
    """Each module's training flag as recorded (nn.Module.train would set one for all: a submodule the caller
    had put in eval mode on purpose, frozen normalisation say, would come back in training mode)."""
    for module, training in modes:
        module.training = training


def user_lane_batches(cache: SessionCache, splits, users: np.ndarray, users_per_batch: int,
                      max_session_length: int):
    """Lane batches holding ONE user per lane: lane b of a batch is user ``users[k]``'s sessions of
    ``splits`` (in time order), truncated to ``max_session_length`` events. ``keep`` is True throughout
    (a lane never changes user) and padded steps have length 0, so a stateful model's final state of
    lane b is its user's state after those sessions. Yields (users of the batch, SessionBatch)."""
    for name, value in (("users_per_batch", users_per_batch), ("max_session_length", max_session_length)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    users_per_batch, max_session_length = int(users_per_batch), int(max_session_length)
    codes = [cache.split_code(split) for split in splits]
    session_split = np.asarray(cache.session_split)
    user_session_offsets = np.asarray(cache.user_session_offsets)
    num_users = user_session_offsets.shape[0] - 1
    given = users
    users = np.asarray(users)
    if users.ndim != 1 or not (users.dtype.kind in "iu" or users.size == 0):
        raise TypeError(f"users must be a 1-D array of user indices (integers), got {given!r:.80}")
    if users.size and (users.min() < 0 or users.max() >= num_users):
        raise ValueError(f"users must be user indices in 0..{num_users - 1} of this cache, got values from "
                         f"{users.min()} to {users.max()}")
    users = users.astype(np.int64)  # the batch's user field is int64 (-1 where a lane has no session)
    offsets, item = np.asarray(cache.session_offsets), np.asarray(cache.item)
    for start in range(0, users.shape[0], users_per_batch):
        chosen = users[start:start + users_per_batch]
        per_user = []
        for user in chosen:
            sessions = np.arange(user_session_offsets[user], user_session_offsets[user + 1])
            per_user.append(sessions[np.isin(session_split[sessions], codes)])
        steps = max(1, max(s.shape[0] for s in per_user))
        lanes = chosen.shape[0]
        session = np.full((steps, lanes), -1, dtype=np.int64)
        for lane, sessions in enumerate(per_user):
            session[:sessions.shape[0], lane] = sessions
        valid = session >= 0
        safe = np.where(valid, session, 0)
        lengths = np.where(valid, np.minimum(offsets[safe + 1] - offsets[safe], max_session_length), 0)
        width = int(lengths.max()) if lengths.size else 0
        items = np.zeros((steps, lanes, width + 1), dtype=np.int64)
        positions = np.arange(width)
        present = positions < lengths[..., None]
        items[..., 1:][present] = item[(offsets[safe][..., None] + positions)[present]]
        user = np.where(valid, chosen[None, :], -1)
        batch = SessionBatch(torch.from_numpy(items), torch.from_numpy(lengths),
                             torch.from_numpy(np.where(valid.any(1), lengths.max(1) + 1, 0)), torch.from_numpy(valid),
                             torch.ones(steps, lanes, dtype=torch.bool), torch.from_numpy(user),
                             torch.from_numpy(session), torch.zeros(lanes, dtype=torch.bool), 0, start)
        yield chosen, batch


def _split_users(cache: SessionCache, split: str) -> np.ndarray:
    """Dense indices of the users with a session in ``split``, ascending."""
    sessions = np.flatnonzero(np.asarray(cache.session_split) == cache.split_code(split))
    return np.unique(np.searchsorted(np.asarray(cache.user_session_offsets), sessions, side="right") - 1)


EARLIER_SPLITS = {"train": (), "valid": ("train",), "test": ("train", "valid")}


def _events_beyond(cache: SessionCache, split: str, max_length: int | None) -> int:
    """Events of ``split`` after the first ``max_length`` of their session (None: no limit): the
    events a model truncating its sessions to ``max_length`` never predicts."""
    if max_length is None:
        return 0
    lengths = np.diff(np.asarray(cache.session_offsets))[np.asarray(cache.session_split) == cache.split_code(split)]
    return int(np.maximum(lengths - max_length, 0).sum())


@torch.no_grad()
def evaluate(model: NextItemModel, cache: SessionCache, split: str = "test", config: TrainConfig | None = None,
             metrics: RankingMetrics | None = None) -> dict:
    """Full-catalogue metrics of ``model`` on every event of ``split`` (RankingMetrics.result()); every
    event is predicted from exactly the user's earlier events, as the rules' "user" history scope sees them.

    Cold (by user) split: the split's users are new, so the lane generator runs over the split with
    its own state cache (the paper's scheme), lanes starting each user from a zero state. Warm (by
    time) split: a user's sessions in ``split`` follow their sessions in the earlier splits, so each
    user's state is first built over those (one user per lane, :func:`user_lane_batches`) and the
    split is then evaluated from it; the single-level history TCN reads the earlier splits' events
    as the leading part of each user's history and predicts only the split's.

    The model must be built for the cache's catalogue (``model.num_items == cache.num_items``, else
    ValueError). A model reads at most ``model.max_session_length`` events of a session, so the events
    after those are not scored (the rules score them): ``result["session_truncation"]`` holds that
    ``max_session_length`` and ``events_not_scored``, how many, and
    :func:`~hiertcn_fast.report.write_report` prints every model's event count when they differ.
    Caches truncated to the model's length (the main job's) have none.

    ``metrics``: an accumulator to add the split's events to (with its cut-offs and tie policy), whose result is
    returned. It receives them all at the end, or none at all when the call fails part way (an interrupt): a
    retry does not count the first batches twice.
    """
    if not isinstance(model, NextItemModel):
        raise TypeError(f"model must be a NextItemModel, got {type(model).__name__}")
    if model.num_items != cache.num_items:
        raise ValueError(f"model: built for {model.num_items} items, but the cache has {cache.num_items} items; "
                         f"evaluate a model built for this cache (build_model(name, cache.num_items))")
    config = config or TrainConfig()
    device = next(model.parameters()).device
    if metrics is not None and not isinstance(metrics, RankingMetrics):
        raise TypeError(f"metrics must be a RankingMetrics or None, got {type(metrics).__name__}")
    # A copy of the caller's (its settings and class, its events so far) takes the batches; the caller's is left
    # untouched until the end.
    target, metrics = metrics, RankingMetrics() if metrics is None else copy.deepcopy(metrics)
    warm = cache.params.get("split") == "warm"
    modes = [(module, module.training) for module in model.modules()]  # each module's own, put back as it was

    def score(batch, state):
        features, new_state = model(batch, state)
        fields = batch_targets(batch) if isinstance(batch, SessionBatch) else batch.targets()
        scores = model.scores(features)
        # At least float32 (bf16 under autocast is upcast exactly); float64 kept: .float() made a float64 model's
        # close scores ties.
        metrics.update(scores.to(torch.promote_types(scores.dtype, torch.float32)), fields["targets"],
                       fields["users"], fields["first_in_session"])
        return new_state

    try:  # model.eval() inside: an interrupt as it returns is undone by the finally too
        model.eval()
        if warm and model.input_kind == "history":
            max_length = getattr(model, "max_session_length", None)
            for batch in UserHistoryBatcher(cache, split, users_per_batch=config.lanes, max_session_length=max_length,
                                            context_splits=EARLIER_SPLITS[split]):
                score(batch.to(device), None)
        elif not warm:
            source = _Source(model, cache, split, config, device, shuffle=False)
            for batch, _ in source.batches():
                source.end(batch, score(batch, source.begin(batch)))
        else:
            max_length = getattr(model, "max_session_length", None) or cache.max_session_length
            users = _split_users(cache, split)
            for chosen, batch in user_lane_batches(cache, (split,), users, config.lanes, max_length):
                state = None
                if model.state_shape is not None and EARLIER_SPLITS[split]:
                    (_, history), = user_lane_batches(cache, EARLIER_SPLITS[split], chosen, chosen.shape[0],
                                                      max_length)
                    _, state = model(history.to(device), None)
                score(batch.to(device), state)
    finally:
        try:
            _set_modes(modes)
        except BaseException:  # an interrupt as the restore started (a real Ctrl-C lands at a call): once more
            _set_modes(modes)
            raise
    if target is not None:
        target.__dict__.update(metrics.__dict__)  # one call: all of the split, or (an interrupt before) none of it
        metrics = target
    result = metrics.result()
    max_length = getattr(model, "max_session_length", None)
    result["session_truncation"] = {"max_session_length": max_length,
                                    "events_not_scored": _events_beyond(cache, split, max_length)}
    return result
