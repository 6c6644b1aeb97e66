"""Integer arguments are taken alike everywhere: any integer (Python's int or a NumPy integer, as a
hyper-parameter sweep over np.arange gives them) but a bool, and kept as a plain int, so that torch's
modules, JSON fingerprints and checkpoints see Python's int whatever the caller passed. Before, the models,
batchers, queue, training config and causal_conv1d refused NumPy integers that the readers, the TCN layers and
serving took."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from helpers import assert_close, rand
from model_helpers import lane_batch, synthetic_cache
from hiertcn_fast.data import DelimitedSource, LaneStateCache, PinnedRingQueue, SessionBatcher
from hiertcn_fast.evaluate import RankingMetrics
from hiertcn_fast.models import HRNN, HierGRU, HierTCN, HistoryTCN, SessionGRU, UserHistoryBatcher
from hiertcn_fast.nn import GRU, GRUCell
from hiertcn_fast.models.base import check_positive
from hiertcn_fast.ops import CausalConvState, causal_conv1d, causal_conv1d_reference, causal_conv1d_step
from hiertcn_fast.train import TrainConfig


def _all_plain_ints(*values):
    return all(type(v) is int for v in values)


def test_check_positive_returns_plain_ints_in_order_and_refuses_bools():
    values = check_positive(a=np.int64(3), b=7, c=np.uint8(2))
    assert values == (3, 7, 2) and _all_plain_ints(*values)
    for bad in (True, np.bool_(True), 0, np.int32(-1), 2.0, "3", torch.tensor(3)):
        with pytest.raises(ValueError, match="a must be a positive integer"):
            check_positive(a=bad)


@pytest.mark.parametrize("model_class, kwargs", [
    (HierTCN, dict(state_layers=np.int64(1), state_hidden=np.int32(6), tcn_channels=(np.int64(5),),
                   kernel_size=np.int64(2), max_session_length=np.int64(4))),
    (HierGRU, dict(state_layers=np.int64(2), state_hidden=np.int64(6), session_hidden=np.int64(5),
                   session_layers=np.int64(1), max_session_length=np.int64(4))),
    (HRNN, dict(user_layers=np.int64(1), user_hidden=np.int64(6), session_hidden=np.int64(5),
                max_session_length=np.int64(4))),
    (SessionGRU, dict(hidden=np.int64(5), layers=np.int64(2), max_session_length=np.int64(4))),
])
def test_session_models_take_numpy_integers_and_match_the_same_model_built_from_ints(model_class, kwargs):
    torch.manual_seed(0)
    model = model_class(np.int64(20), embedding_dim=np.int64(4), **kwargs)
    torch.manual_seed(0)
    plain = model_class(20, embedding_dim=4, **{k: (tuple(int(c) for c in v) if isinstance(v, tuple) else int(v))
                                                 for k, v in kwargs.items()})
    assert type(model.num_items) is int and type(model.max_session_length) is int
    assert model.item_embedding.weight.shape == (21, 4) and model.output.out_features == 21
    batch = lane_batch([[[1, 2, 3], [4, 5]], [[6, 7]]])
    features, _ = model(batch)
    expected, _ = plain(batch)
    assert_close(features, expected)


def test_history_tcn_and_its_batcher_take_numpy_integers(tmp_path):
    model = HistoryTCN(np.int64(300), embedding_dim=np.int64(4), channels=(np.int64(3),), kernel_size=np.int64(2),
                       max_session_length=np.int64(5))
    assert type(model.max_session_length) is int and model.tcn.blocks[0].conv.kernel_size == 2
    cache = synthetic_cache(tmp_path / "cache")
    batcher = UserHistoryBatcher(cache, "train", users_per_batch=np.int64(4), max_session_length=np.int32(3),
                                 seed=np.int64(2), shuffle=True)
    assert _all_plain_ints(batcher.users_per_batch, batcher.max_session_length, batcher.seed)
    plain = UserHistoryBatcher(cache, "train", users_per_batch=4, max_session_length=3, seed=2, shuffle=True)
    assert batcher.num_batches() == plain.num_batches() > 1
    assert torch.equal(batcher.batch(1).items, plain.batch(1).items)
    for bad in ({"users_per_batch": True}, {"max_session_length": np.bool_(True)}, {"seed": False}):
        with pytest.raises(ValueError, match="must be"):
            UserHistoryBatcher(cache, "train", **bad)


def test_session_batcher_and_lane_state_cache_take_numpy_integers(tmp_path):
    cache = synthetic_cache(tmp_path / "cache")
    batcher = SessionBatcher(cache, "train", lanes=np.int64(3), sessions_per_batch=np.int16(2),
                             max_session_length=np.int64(4), seed=np.int64(1), shuffle=True, state_shape=(1, 5))
    assert _all_plain_ints(batcher.lanes, batcher.sessions_per_batch, batcher.max_session_length, batcher.seed)
    plain = SessionBatcher(cache, "train", lanes=3, sessions_per_batch=2, max_session_length=4, seed=1, shuffle=True)
    first, expected = next(iter(batcher)), next(iter(plain))
    assert torch.equal(first.items, expected.items) and first.items.shape[1] == 3
    with pytest.raises(ValueError, match="lanes must be a positive integer"):
        SessionBatcher(cache, "train", lanes=True)
    with pytest.raises(ValueError, match="max_session_length must be a positive integer"):
        SessionBatcher(cache, "train", max_session_length=np.float64(4))

    state = LaneStateCache(np.int64(2), np.int32(3), np.uint16(4))
    assert state.state.shape == (2, 3, 4)
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        LaneStateCache(2, 3, True)


def test_the_ring_queue_takes_numpy_integers():
    def produce(seq, slot):
        if seq >= 3:
            return False
        slot["x"].fill_(seq)
        return True

    with PinnedRingQueue({"x": ((2,), torch.int64)}, produce, num_producers=np.int64(1),
                         num_slots=np.int64(2)) as queue:
        assert type(queue.num_slots) is int
        assert [(seq, batch["x"].tolist()) for seq, batch in queue] == [(0, [0, 0]), (1, [1, 1]), (2, [2, 2])]
    with pytest.raises(ValueError, match="num_slots must be a positive integer"):
        PinnedRingQueue({"x": ((2,), torch.int64)}, produce, num_slots=np.bool_(True))


def test_train_config_keeps_plain_ints_so_its_json_and_checkpoints_work():
    config = TrainConfig(epochs=np.int64(2), lanes=np.int32(4), sessions_per_batch=np.int64(3),
                         num_sampled=np.int64(8), queue_slots=np.int64(2), num_producers=np.int64(0),
                         log_every=np.int64(0), checkpoint_every=np.int64(5), max_steps=np.int64(7),
                         seed=np.int64(11))
    names = ("epochs", "lanes", "sessions_per_batch", "num_sampled", "queue_slots", "num_producers", "log_every",
             "checkpoint_every", "max_steps", "seed")
    assert [getattr(config, n) for n in names] == [2, 4, 3, 8, 2, 0, 0, 5, 7, 11]
    assert _all_plain_ints(*(getattr(config, n) for n in names))
    assert json.loads(json.dumps(dataclasses.asdict(config)))["seed"] == 11
    for bad in ({"lanes": True}, {"log_every": False}, {"max_steps": np.bool_(False)}, {"seed": 1.0}):
        with pytest.raises(ValueError, match="must be a"):
            TrainConfig(**bad)


def test_causal_conv1d_takes_numpy_dilation_and_groups_on_every_cpu_backend():
    x, weight, bias = rand(2, 9, 4, dtype=torch.float32), rand(4, 2, 3, dtype=torch.float32), rand(4)
    expected = causal_conv1d_reference(x, weight, bias.float(), dilation=2, groups=2)
    for backend in ("reference", "cpu"):
        out = causal_conv1d(x, weight, bias.float(), dilation=np.int64(2), groups=np.int32(2), backend=backend)
        assert_close(out, expected)
    for bad in ({"dilation": True}, {"groups": np.bool_(True)}, {"dilation": 2.0}):
        with pytest.raises(TypeError, match="must be an int"):
            causal_conv1d(x, weight, **bad)


def test_a_step_state_made_with_numpy_integers_steps_as_the_full_forward():
    x, weight = rand(2, 6, 3, dtype=torch.float32), rand(5, 3, 3, dtype=torch.float32)
    expected = causal_conv1d(x, weight, dilation=2)
    state = CausalConvState.zeros(2, 3, np.int64(3), np.int64(2))
    assert _all_plain_ints(state.kernel_size, state.dilation)
    steps = torch.stack([causal_conv1d_step(x[:, t], weight, state, groups=np.int64(1)) for t in range(6)], 1)
    assert_close(steps, expected)


def test_a_delimited_source_keeps_numpy_column_indices_as_ints_in_its_fingerprint(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("1,10,100\n1,11,101\n2,10,102\n")
    source = DelimitedSource(path, user=np.int64(0), item=np.int32(1), timestamp=np.uint8(2), header=False)
    assert _all_plain_ints(*source.columns.values())
    json.dumps(source.fingerprint())  # a NumPy integer would make this a TypeError
    chunks = list(source.iter_chunks())
    assert np.concatenate([c.item for c in chunks]).tolist() == [10, 11, 10]
    with pytest.raises(TypeError, match="user: expected a column index"):
        DelimitedSource(path, user=True, item=1, timestamp=2, header=False)
    with pytest.raises(ValueError, match="must be non-negative"):
        DelimitedSource(path, user=np.int64(-1), item=1, timestamp=2, header=False)


def test_ranking_metrics_keep_numpy_cutoffs_as_plain_ints():
    metrics = RankingMetrics(recall_ks=np.array([1, 3]), mrr_cutoffs=(None, np.int64(3)), ndcg_ks=(np.int32(2),),
                             padding_item=np.int64(0))
    assert metrics.recall_ks == (1, 3) and _all_plain_ints(*metrics.recall_ks, metrics.mrr_cutoffs[1],
                                                            *metrics.ndcg_ks, metrics.padding_item)
    assert metrics.metric_names == ["Recall@1", "Recall@3", "MRR", "MRR@3", "NDCG@2"]
    with pytest.raises(ValueError, match="recall_ks must hold positive integers"):
        RankingMetrics(recall_ks=(np.bool_(True),))


def test_the_gru_drop_ins_take_numpy_sizes_as_the_rest_of_the_package():
    """torch.nn.GRU refuses NumPy sizes (a TypeError); the drop-in takes them, as every other layer here does,
    and is then the same module as one built from Python ints."""
    with pytest.raises(TypeError):
        torch.nn.GRU(np.int64(4), 6)
    torch.manual_seed(0)
    gru = GRU(np.int64(4), np.int32(6), np.int64(2), batch_first=True, dropout=0.0)
    torch.manual_seed(0)
    plain = torch.nn.GRU(4, 6, 2, batch_first=True)
    assert _all_plain_ints(gru.input_size, gru.hidden_size, gru.num_layers)
    assert gru.batch_first is True and gru.bias is True
    x = rand(3, 5, 4, dtype=torch.float32)
    assert_close(gru(x)[0], plain(x)[0])
    cell = GRUCell(np.int64(4), np.int64(6))
    assert _all_plain_ints(cell.input_size, cell.hidden_size)


def test_tcn_and_temporal_block_keep_numpy_widths_as_plain_ints():
    """TCN kept a NumPy context_channels as it came (json.dumps of it failed), and TemporalBlock gave its residual
    projections NumPy in_features / out_features; CausalConv1d inside them converted already."""
    from hiertcn_fast.nn import TCN, TemporalBlock
    torch.manual_seed(0)
    tcn = TCN(np.int64(4), [np.int64(8), np.int32(8)], np.int64(3), context_channels=np.int64(2))
    block = TemporalBlock(np.int64(4), np.int64(8), context_channels=np.int64(2))
    first = tcn.blocks[0]
    assert _all_plain_ints(tcn.context_channels, first.projection.in_features, first.projection.out_features,
                           first.context_projection.in_features, first.context_projection.out_features,
                           block.projection.in_features, block.projection.out_features,
                           block.context_projection.in_features)
    assert json.loads(json.dumps({"context_channels": tcn.context_channels})) == {"context_channels": 2}
    torch.manual_seed(0)
    plain = TCN(4, [8, 8], 3, context_channels=2)
    x, context = rand(2, 6, 4, dtype=torch.float32), rand(2, 2, dtype=torch.float32)
    assert torch.equal(tcn(x, context), plain(x, context))
    with pytest.raises(TypeError, match="context_channels"):
        TCN(4, [8], 3, context_channels=True)


# ---- integer arguments: any integer but a bool ---------------------------------------------------------------------
# README, "Integer arguments, everywhere in the package (ops, modules, models, data, training, evaluation, serving),
# may be any integer, Python's or NumPy's ..., but not a bool; they are kept as Python ints ... (the `GRU` drop-in
# too, where torch.nn.GRU takes only Python's)."

@pytest.mark.parametrize("args, kwargs, name", [
    ((4, True), {}, "hidden_size"),
    ((True, 4), {}, "input_size"),
    ((4, 4, True), {}, "num_layers"),
    ((4, 4), {"num_layers": True}, "num_layers"),
    ((4,), {"hidden_size": True}, "hidden_size"),
])
def test_gru_dropin_refuses_bool_sizes(args, kwargs, name):
    """hiertcn_fast.nn.GRU(4, True) built a GRU with hidden_size True (torch.nn.GRU keeps a bool as the size)."""
    with pytest.raises(TypeError, match=rf"^{name} must be an integer, not a bool \(True\)"):
        GRU(*args, **kwargs)


@pytest.mark.parametrize("args, name", [((4, True), "hidden_size"), ((True, 4), "input_size")])
def test_grucell_dropin_refuses_bool_sizes(args, name):
    """hiertcn_fast.nn.GRUCell(4, True) built a cell with hidden_size True."""
    with pytest.raises(TypeError, match=rf"^{name} must be an integer, not a bool \(True\)"):
        GRUCell(*args)


def test_build_model_refuses_bool_seed():
    """hiertcn_fast.train.build_model(name, num_items, seed=True) drew the parameters from seed 1."""
    from hiertcn_fast.train import build_model

    with pytest.raises(ValueError, match="seed must be a non-negative integer below 2\\*\\*63, got True"):
        build_model("session_gru", 10, seed=True, embedding_dim=4, hidden=4)


def test_target_ranks_refuses_bool_padding_item():
    """hiertcn_fast.evaluate.target_ranks(..., padding_item=True) passes its range check (True counted as column 1)
    and then failed deep inside (``block[:, True]`` adds a dimension: a RuntimeError about tensor sizes), or, with a
    target 1, blamed the target ("padding item True excluded"); its sibling RankingMetrics(padding_item=True)
    refuses the bool by name."""
    from hiertcn_fast.evaluate import target_ranks

    scores = torch.randn(2, 5)
    with pytest.raises((TypeError, ValueError), match="padding_item"):
        target_ranks(scores, torch.tensor([2, 3]), padding_item=True)


def _small_cache(tmp_path):
    from hiertcn_fast.data import ArraySource, PreprocessParams, preprocess

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(6), 8)
    items = rng.integers(1, 6, users.shape[0])
    times = np.tile(np.arange(8) * 4000.0, 6)
    params = PreprocessParams(min_item_count=1, min_user_count=1, max_user_count=None, split="warm")
    return preprocess(ArraySource(users, items, times), tmp_path, params)


@pytest.mark.parametrize("which", ["users_per_batch", "max_session_length"])
def test_user_lane_batches_refuses_bool_ints(tmp_path, which):
    """hiertcn_fast.train.user_lane_batches (public, in train.__all__) took users_per_batch=True (one user per
    batch) and max_session_length=True (sessions cut to one event) without a word."""
    from hiertcn_fast.train import user_lane_batches

    cache = _small_cache(tmp_path)
    kwargs = {"users_per_batch": 2, "max_session_length": 20, which: True}
    with pytest.raises((TypeError, ValueError), match=which):
        next(iter(user_lane_batches(cache, ("train",), np.arange(3), kwargs["users_per_batch"],
                                    kwargs["max_session_length"])))


@pytest.mark.parametrize("bad, error", [(True, TypeError), (2.0, TypeError), (-1, ValueError)])
def test_a_states_batch_is_an_integer(bad, error):
    """TCN.init_state(True) and CausalConvState.zeros(True, ...) failed with torch's "zeros() takes 1 positional
    argument but 3 were given", naming no argument; a NumPy integer is taken as a plain int."""
    from hiertcn_fast.nn import TCN

    with pytest.raises(error, match="CausalConvState.zeros: batch"):
        TCN(4, [4, 4], 3).init_state(bad)
    with pytest.raises(error, match="batch"):
        CausalConvState.zeros(bad, 4, 3)
    state = CausalConvState.zeros(np.int64(2), np.int32(4), np.int64(3), np.int16(2))
    assert state.history.shape == (2, 4, 4) and _all_plain_ints(state.kernel_size, state.dilation)
