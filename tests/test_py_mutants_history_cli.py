"""Tests written by a mutation-testing audit of models/history_tcn.py, models/events.py, models/base.py, cli.py,
report.py and rule_report.py: each kills a planted bug the rest of the suite let through (named in its docstring:
H = history_tcn.py, E = events.py, B = base.py, C = cli.py, R = report.py, RR = rule_report.py). Expected values
are hand-computed (from the small logs of test_models_rules.py), recomputed with plain numpy / torch, or read from
the inputs given to the code, never from the code's own output."""

import importlib
import json
import tracemalloc
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiertcn_fast import cli
from hiertcn_fast.evaluate import RankingMetrics
from hiertcn_fast.models import HistoryBatch, HistoryTCN, UserHistoryBatcher, iter_split_events
from hiertcn_fast.models.base import NextItemModel, check_positive
from hiertcn_fast.report import ModelResult, write_report
from model_helpers import synthetic_cache, one_thread  # noqa: F401 (autouse fixture)
from test_models_rules import LOG, PARAMS
from test_models_session import make
from test_cli_audit_fixes import _usage_error, no_job  # noqa: F401 (no_job: a fixture)

EARLIER = ("train", "valid")  # the splits that precede the test split of a warm (by time) cache


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("cold"))


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("warm"), split="warm")


@pytest.fixture(scope="module")
def context_cache(tmp_path_factory):
    """A warm split where every one of 6 users has test events after u training sessions of 3 events (user u's
    context: 3u events), so the rows of a test batch have different context lengths."""
    from hiertcn_fast.data import ArraySource, preprocess

    rows = []
    for u in range(1, 7):
        for s in range(u):
            rows += [(u, 10 * ((u + s + k) % 7 + 1), 100 * u + 1000 * s + 10 * k) for k in range(3)]
        rows += [(u, 10 * ((u + k) % 5 + 1), 9000 + 100 * u + 10 * k) for k in range(2 + u % 2)]
    user, item, timestamp = (np.array(column) for column in zip(*rows))
    return preprocess(ArraySource(user, item, timestamp, name="context"), tmp_path_factory.mktemp("context"), PARAMS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """test_models_rules.py's hand-checkable log (warm split, no truncation)."""
    from hiertcn_fast.data import ArraySource, preprocess

    user, item, timestamp = (np.array(column) for column in zip(*LOG))
    return preprocess(ArraySource(user, item, timestamp, name="tiny"), tmp_path_factory.mktemp("tiny"), PARAMS)


def _quality(seed=0, n=30, items=12):
    """A RankingMetrics.result() of random scores (every group non-empty)."""
    rng = np.random.default_rng(seed)
    metrics = RankingMetrics()
    first = np.arange(n) % 3 == 0
    metrics.update(torch.from_numpy(rng.normal(size=(n, items + 1))), torch.from_numpy(rng.integers(1, items + 1, n)),
                   torch.from_numpy(rng.integers(0, 5, n)), torch.from_numpy(first))
    return metrics.result()


# ---- history_tcn.py: the whole-user batches ------------------------------------------------------------------

def _context_batch(cache):
    batcher = UserHistoryBatcher(cache, "test", users_per_batch=6, context_splits=EARLIER)
    batch = batcher.batch(0)
    assert sorted(batch.context_lengths.tolist()) == [3, 6, 9, 12, 15, 18]  # rows differ: a selection shows
    return batcher, batch


def test_a_rank_share_of_a_warm_batch_keeps_each_rows_context(context_cache):
    """Kills H3 (HistoryBatch.rows dropping context_lengths): a rank's rows of a warm evaluation batch must keep
    their own context lengths, so its context events stay unpredicted."""
    _, batch = _context_batch(context_cache)
    rows = torch.tensor([3, 0, 5])
    share = batch.rows(rows)
    assert share.context_lengths is not None
    assert share.context_lengths.tolist() == [batch.context_lengths[r].item() for r in rows.tolist()]
    assert share.items.tolist() == [batch.items[r].tolist() for r in rows.tolist()]
    # The share predicts exactly its rows' events beyond their context.
    expected = sum(int(batch.lengths[r] - batch.context_lengths[r]) for r in rows.tolist())
    assert int(share.targets()["mask"].sum()) == expected


def test_moving_a_batch_moves_its_context_lengths(context_cache):
    """Kills H4 (HistoryBatch.to leaving context_lengths behind): every tensor, context_lengths included, goes to
    the device (the meta device stands for a GPU here)."""
    _, batch = _context_batch(context_cache)
    moved = batch.to("meta")
    for name in ("items", "lengths", "first_in_session", "user", "context_lengths"):
        assert getattr(moved, name).device.type == "meta", name
    assert (moved.epoch, moved.index) == (batch.epoch, batch.index)


@pytest.mark.parametrize("which", ["context", "warm"])
def test_a_warm_batchers_event_count_excludes_the_context(context_cache, warm, which):
    """Kills H10 (num_events counting the context events): the events a warm test batcher predicts are the test
    split's, which the per-event stream counts independently."""
    cache = context_cache if which == "context" else warm
    batcher = UserHistoryBatcher(cache, "test", users_per_batch=4, context_splits=EARLIER)
    stream = sum(len(events) for events in iter_split_events(cache, "test"))
    predicted = sum(int(batch.targets()["mask"].sum()) for batch in batcher)
    assert batcher.num_events == stream == predicted
    assert sum(batcher._context) > 0  # the context is there, just not counted


def _epoch_orders(batcher, epochs):
    return [[batcher.batch(i, epoch).user.tolist() for i in range(batcher.num_batches())] for epoch in epochs]


def test_shuffled_length_batches_change_order_with_the_epoch(cold):
    """Kills H13 (the batches of similar-length users never shuffled) and H14 (the shuffle seeded by the seed alone,
    the same order every epoch): each epoch is a different order of the users (each once), not simply shortest
    first, and the order is a function of (seed, epoch)."""
    batcher = UserHistoryBatcher(cold, "train", users_per_batch=4, shuffle=True, seed=5)
    lengths = dict(zip(batcher.users.tolist(), batcher._lengths.tolist()))
    orders = _epoch_orders(batcher, range(4))
    assert len({str(order) for order in orders}) == 4
    for order in orders:
        assert sorted(u for batch in order for u in batch) == sorted(lengths)
        longest = [max(lengths[u] for u in batch) for batch in order]
        assert longest != sorted(longest)
    again = UserHistoryBatcher(cold, "train", users_per_batch=4, shuffle=True, seed=5)
    assert _epoch_orders(again, [2]) == orders[2:3]


def test_a_negative_batch_index_is_refused(cold):
    """Kills H15 (index >= 0 not checked): batch(-1) silently gave an empty or wrapped batch."""
    batcher = UserHistoryBatcher(cold, "train", users_per_batch=8)
    with pytest.raises(IndexError, match="out of range"):
        batcher.batch(-1)
    with pytest.raises(IndexError, match="out of range"):
        batcher.batch(batcher.num_batches())


def test_a_position_just_past_an_epochs_end_resumes_in_the_next_epoch(cold):
    """Kills H18 (iteration from next_index == num_batches not starting the next epoch): a batcher restored at the
    end of epoch 0 (a run checkpointed there) must deliver all of epoch 1, not an empty epoch."""
    batcher = UserHistoryBatcher(cold, "train", users_per_batch=8, shuffle=True, seed=2)
    saved = dict(batcher.state_dict(), epoch=0, next_index=batcher.num_batches())
    restored = UserHistoryBatcher(cold, "train", users_per_batch=8, shuffle=True, seed=2)
    restored.load_state_dict(saved)
    batches = list(restored)
    assert [(b.epoch, b.index) for b in batches] == [(1, i) for i in range(batcher.num_batches())]
    assert all(torch.equal(a.items, batcher.batch(i, 1).items) for i, a in enumerate(batches))


def test_resuming_restores_the_epoch(cold):
    """Kills H21 (load_state_dict restoring next_index but not the epoch): resumed in epoch 1, the rest of the
    batches are epoch 1's (a shuffled order that differs from epoch 0's)."""
    batcher = UserHistoryBatcher(cold, "train", users_per_batch=5, shuffle=True, seed=1)
    list(batcher)  # epoch 0
    iterator = iter(batcher)
    next(iterator), next(iterator)
    saved = batcher.state_dict()
    assert (saved["epoch"], saved["next_index"]) == (1, 2)
    rest = [b.items for b in iterator]
    again = UserHistoryBatcher(cold, "train", users_per_batch=5, shuffle=True, seed=1)
    again.load_state_dict(saved)
    assert again.epoch == 1
    resumed = list(again)
    assert all(b.epoch == 1 for b in resumed)
    assert len(resumed) == len(rest) and all(torch.equal(a, b.items) for a, b in zip(rest, resumed))


# ---- history_tcn.py: the model -------------------------------------------------------------------------------

def _history_tcn(**kwargs):
    torch.manual_seed(3)
    return HistoryTCN(20, **{**dict(embedding_dim=5, channels=(6, 7), kernel_size=3), **kwargs})


def test_an_empty_history_batch_gives_no_features_of_the_feature_width():
    """Kills H23 (the empty batch's features as wide as the embeddings, not as the last block): a batch with no
    events gives (0, channels[-1]) features, which the output layer accepts."""
    model = _history_tcn()
    empty = HistoryBatch(torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                         torch.zeros(2, 0, dtype=torch.bool), torch.arange(2), 0, 0)
    features, state = model(empty)
    assert features.shape == (0, 7) and state is None
    assert model.scores(features).shape == (0, 21)


def _one_user_batch(items):
    items = torch.tensor([[0, *items]])
    n = len(items[0]) - 1
    return HistoryBatch(items, torch.tensor([n]), torch.zeros(1, n, dtype=torch.bool), torch.tensor([0]), 0, 0)


def test_the_history_tcn_drops_out_its_input_in_training_only():
    """Kills H24 (no dropout on the history TCN's input): in training, with dropout 0.5, the features (before the
    output layer, whose dropout is separate) differ from eval's; in eval they are the dropout-free model's."""
    batch = _one_user_batch([3, 1, 4, 1, 5, 9, 2, 6])
    model, plain = _history_tcn(dropout=0.5), _history_tcn(dropout=0.0)
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch)[0], plain(batch)[0])
        model.train()
        torch.manual_seed(0)
        trained = model(batch)[0]
    assert not torch.allclose(trained, plain(batch)[0])


def test_the_history_tcn_refuses_a_state_and_an_empty_channel_list():
    """Kills H25 (a state passed to the stateless model silently ignored) and H26 (channels=() failing with an
    IndexError, not the ValueError that names the argument)."""
    model = _history_tcn()
    with pytest.raises(ValueError, match="state=None"):
        model(_one_user_batch([1, 2]), torch.zeros(1, 1, 7))
    with pytest.raises(ValueError, match="channels must list at least one block"):
        HistoryTCN(20, channels=())


def test_the_history_tcn_refuses_a_session_length_of_zero():
    """Kills H33 (max_session_length not checked by the model: 0 was accepted, and the run failed only when its
    batcher was made)."""
    with pytest.raises(ValueError, match="max_session_length must be a positive integer"):
        HistoryTCN(20, embedding_dim=4, channels=(4,), max_session_length=0)


# ---- events.py ------------------------------------------------------------------------------------------------

def test_stream_fields_have_their_documented_dtypes(tiny):
    """Kills E11 (history_start as int32): user, target, session, event and history_start are int64,
    first_in_session bool."""
    events = next(iter_split_events(tiny, "test"))
    for name in ("user", "target", "session", "event", "history_start"):
        assert getattr(events, name).dtype == np.int64, name
    assert events.first_in_session.dtype == np.bool_ and events.history_length.dtype == np.int64


def test_a_bool_chunk_size_is_refused(tiny):
    """Kills E3 (chunk_size=True accepted as chunks of one event)."""
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        list(iter_split_events(tiny, "test", chunk_size=True))


# ---- base.py --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, True, False, 2.0])
def test_check_positive_refuses_zero_bools_and_floats(value):
    """Kills B1 (0 accepted: value < 0) and B2 (True accepted as 1): the models' sizes must be positive ints."""
    with pytest.raises(ValueError, match="kernel_size must be a positive integer"):
        check_positive(kernel_size=value)
    with pytest.raises(ValueError, match="kernel_size must be a positive integer"):
        HistoryTCN(10, embedding_dim=4, channels=(4,), kernel_size=value)
    check_positive(kernel_size=1, other=3)  # fine


def test_item_embeddings_start_at_a_linear_like_scale():
    """Kills B5 (the embeddings drawn N(0, 1)): rows 1.. are N(0, 1/d) (std d ** -0.5), row 0 zeros."""
    torch.manual_seed(0)
    model = NextItemModel(4000, 64, 8)
    weight = model.item_embedding.weight.detach()
    assert torch.count_nonzero(weight[0]) == 0
    assert abs(weight[1:].std().item() - 64 ** -0.5) < 0.01  # 256,000 draws: the std's error is ~2e-4


def test_scores_drop_out_their_input_in_training_only():
    """Kills B7 (no dropout on the output layer's input): scores in training with dropout 0.5 are not the plain
    linear map of the features; in eval they are."""
    model = _history_tcn(dropout=0.5)
    features = torch.ones(6, 7)
    expected = F.linear(features, model.output.weight, model.output.bias)
    model.eval()
    torch.testing.assert_close(model.scores(features), expected)
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model.scores(features), expected)


def test_length_groups_are_exact_at_the_candidate_limit():
    """Kills B21 (group ends restricted to quantiles from 32 distinct lengths on, not from 33): with exactly 32
    distinct lengths, most of them 1, every length is a candidate end and the groups are the cheapest partition
    (brute force over every split into at most MAX_LENGTH_GROUPS consecutive groups)."""
    import collections
    import itertools

    from hiertcn_fast.models import base

    lengths = [1] * 200 + list(range(2, 32)) + [100] * 40
    counts = sorted(collections.Counter(lengths).items())
    assert len(counts) == 32

    def cost(ends):
        total, low = 0, 0
        for end in ends:
            total += sum(n for length, n in counts if low < length <= end) * end + base.GROUP_OVERHEAD_POSITIONS
            low = end
        return total

    distinct = [length for length, _ in counts]
    best = min(cost([*cuts, distinct[-1]]) for k in range(base.MAX_LENGTH_GROUPS)
               for cuts in itertools.combinations(distinct[:-1], k))
    assert cost(base.length_groups(lengths)) == best


def test_embed_refuses_item_ids_that_are_not_int64():
    """Kills B10 (the dtype check dropped: int32 ids embedded silently)."""
    model = _history_tcn()
    with pytest.raises(TypeError, match="items must be int64"):
        model.embed(torch.tensor([1, 2], dtype=torch.int32))


def test_a_state_of_the_wrong_number_of_layers_is_refused():
    """Kills B11 (only the lanes and hidden size of a given state checked): HierTCN's state has 2 layers."""
    from model_helpers import lane_batch

    model = make("hiertcn")
    batch = lane_batch([[[1, 2]]])
    for shape in [(1, 1, 6), (3, 1, 6)]:
        with pytest.raises(ValueError, match="state must be"):
            model(batch, torch.zeros(shape))
    model(batch, torch.zeros(2, 1, 6))  # the right shape passes


# ---- cli.py: usage errors ---------------------------------------------------------------------------------------

def test_the_triton_backend_on_cpu_tensors_needs_the_interpreter(no_job, monkeypatch, tmp_path, capsys):
    """Kills C13 (the triton-on-CPU check dropped): --backend triton --device cpu without TRITON_INTERPRET is a
    usage error, and passes with it."""
    backends = importlib.import_module("hiertcn_fast.backends")  # the package exports a function of that name
    monkeypatch.setattr(backends, "backends", lambda: [backends.BackendStatus("triton", True, "pretend")])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    error = _usage_error(capsys, ["train", "--backend", "triton", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert ("--backend triton: it runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not on --device cpu"
            in error), error
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(cli, "_train", lambda args: 0)
    assert cli.main(["train", "--backend", "triton", "--device", "cpu", "--out", str(tmp_path / "r")]) == 0


# ---- cli.py: what the job hands to each part --------------------------------------------------------------------

class _Recorder:
    """Fakes of the job's parts that record what the command line handed them."""

    def __init__(self, monkeypatch, cache, fail_with=None):
        import hiertcn_fast.data as data
        import hiertcn_fast.rule_report as rule_report
        import hiertcn_fast.train as train

        self.seen = {"build": [], "trainer": [], "evaluate": []}
        recorder = self

        def preprocess(source, cache_dir, params, rebuild=False, verify="lazy"):
            recorder.seen["params"], recorder.seen["rebuild"], recorder.seen["verify"] = params, rebuild, verify
            return cache

        def evaluate_rules(cache, *args, **kwargs):
            recorder.seen["rules"] = (args, kwargs)
            return {"most_popular": ModelResult("most_popular", _quality(1))}

        def build_model(name, num_items, **kwargs):
            if torch.get_default_device().type != "meta":  # (the memory check's count of the parameters)
                recorder.seen["build"].append((name, num_items, kwargs))
            return torch.nn.Linear(2, 3)

        class Trainer:
            def __init__(self, model, cache, config, name, out):
                recorder.seen["trainer"].append((name, config, torch.get_num_threads()))
                self.curve, self.events_per_second, self.peak_memory_bytes = [(0, 2.0), (1, 1.5)], 10.0, 1024
                self.train_seconds, self.train_events, self.memory_kind = 1.0, 5, "data memory"

            def train(self):
                return self

        def evaluate(model, cache, split, config):
            recorder.seen["evaluate"].append(split)
            if fail_with is not None:
                raise fail_with
            return _quality(2)

        monkeypatch.setattr(data, "load_dataset", lambda name: "a source")
        monkeypatch.setattr(data, "preprocess", preprocess)
        monkeypatch.setattr(rule_report, "evaluate_rules", evaluate_rules)
        for name, fake in (("build_model", build_model), ("Trainer", Trainer), ("evaluate", evaluate)):
            monkeypatch.setattr(train, name, fake)


def test_the_job_hands_every_option_to_the_part_that_uses_it(monkeypatch, tmp_path, warm):
    """Kills C16 (--threads ignored), C18 (--split-by time still preprocessed cold), C20 (--lanes and
    --sessions-per-batch swapped), C21 (--loss not passed: always the full softmax), C23 (--dropout not passed to the
    models), C24 (the models' seed not --seed), C36 (the models evaluated on the test split whatever --split says)
    and C37 (the rules likewise)."""
    recorder = _Recorder(monkeypatch, warm)
    out = tmp_path / "report"
    argv = ["train", "--split", "valid", "--split-by", "time", "--lanes", "3", "--sessions-per-batch", "7",
            "--loss", "sampled", "--num-sampled", "5", "--dropout", "0.25", "--seed", "11", "--dim", "6",
            "--epochs", "2", "--lr", "0.5", "--producers", "0", "--log-every", "4", "--threads", "2",
            "--models", "history_tcn,hiertcn", "--device", "cpu", "--out", str(out), "--cache-dir", str(tmp_path),
            "--rebuild-cache"]
    assert cli.main(argv) == 0
    seen = recorder.seen
    assert seen["params"].split == "warm"
    assert seen["rebuild"] is True and seen["verify"] == "full"
    assert seen["rules"][0][:1] == ("valid",) or seen["rules"][1].get("split") == "valid"
    assert seen["evaluate"] == ["valid", "valid"]
    assert [(name, items) for name, items, _ in seen["build"]] == [("history_tcn", warm.num_items),
                                                                    ("hiertcn", warm.num_items)]
    history_kwargs = seen["build"][0][2]
    assert history_kwargs["seed"] == 11 and history_kwargs["dropout"] == 0.25
    assert history_kwargs["embedding_dim"] == 6 and tuple(history_kwargs["channels"]) == (6, 6, 6, 6)
    for name, config, threads in seen["trainer"]:
        assert threads == 2
        assert (config.epochs, config.lanes, config.sessions_per_batch) == (2, 3, 7)
        assert (config.loss, config.num_sampled, config.learning_rate, config.seed) == ("sampled", 5, 0.5, 11)
        assert (config.num_producers, config.log_every, config.device) == (0, 4, "cpu")
    document = json.loads((out / "results.json").read_text())
    assert list(document["models"]) == ["most_popular", "history_tcn", "hiertcn"]
    assert document["metadata"]["split"] == "valid" and document["metadata"]["status"] == "complete"


def test_a_long_error_message_is_cut_to_one_short_line(monkeypatch, tmp_path, warm, capsys):
    """Kills C26 (the failed model's message not cut): the report's note holds the first 300 characters of the
    message, its whitespace collapsed onto one line, and '...'."""
    message = "bad\n  news " * 60  # 660 characters, newlines included
    _Recorder(monkeypatch, warm, fail_with=RuntimeError(message))
    out = tmp_path / "report"
    assert cli.main(["train", "--models", "session_gru", "--device", "cpu", "--out", str(out),
                     "--cache-dir", str(tmp_path)]) == 1
    one_line = " ".join(message.split())
    expected = f"RuntimeError: {one_line[:300]}..."
    document = json.loads((out / "results.json").read_text())
    assert document["metadata"]["models_failed"] == {"session_gru": expected}
    assert f"- FAILED: session_gru ({expected}); it has no row here" in (out / "report.md").read_text()
    assert "Traceback" in capsys.readouterr().err


# ---- report.py ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [True, float("nan"), float("inf"), -1])
def test_a_bool_or_a_non_finite_number_is_not_a_throughput(bad):
    """Kills R3 (True accepted as 1 event/s or 1 byte). NaN and inf were accepted too (NaN < 0 is False) and then
    printed as n/a; now every such value is refused, as a negative one was."""
    for field in ("events_per_second", "peak_memory_bytes"):
        with pytest.raises(ValueError, match=f"{field} of 'a' must be a finite non-negative number or None"):
            ModelResult("a", _quality(), **{field: bad})


def test_non_finite_figures_are_null_in_the_json_lists_and_extras_included(tmp_path):
    """Kills R8 (infinity kept: json.dumps refuses it and no results.json is written) and R9 (lists not cleaned:
    a diverged training curve's NaN loss broke the strict JSON)."""
    result = ModelResult("a", _quality(), training_curve=[(0, 1.5), (1, float("nan"))],
                         extra={"ratio": float("inf"), "per_epoch": [1.0, float("-inf")]})
    write_report([result], tmp_path, plots=False)
    document = json.loads((tmp_path / "results.json").read_text())  # strict JSON: no NaN / Infinity tokens
    model = document["models"]["a"]
    assert model["training_curve"] == [[0.0, 1.5], [1.0, None]]
    assert model["extra"] == {"ratio": None, "per_epoch": [1.0, None]}


def _markdown_rows(markdown, section_start):
    """model -> cells of the first table after ``section_start``."""
    rows = {}
    for line in markdown.split(section_start, 1)[1].splitlines():
        if line.startswith("| ") and not line.startswith("| model"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


def test_the_first_event_table_shows_first_then_rest_and_ties_are_each_models(tmp_path):
    """Kills R21 (the breakdown table's first-of-session and other-events columns swapped) and R22 (every model's
    tied-target fraction read from the first model)."""
    a, b = _quality(3), _quality(4)
    a["ties"]["fraction_events_with_tied_target"] = 0.125
    b["ties"]["fraction_events_with_tied_target"] = 0.5
    markdown = write_report([ModelResult("a", a), ModelResult("b", b)], tmp_path, plots=False)["report"].read_text()
    rows = _markdown_rows(markdown, "## First event of a session vs the other events (per user)")
    for name, quality in (("a", a), ("b", b)):
        per_user = quality["per_user"]
        expected = [f"{per_user[group][m]:.4f}" for group in ("first_in_session", "rest")
                    for m in ("Recall@10", "MRR", "NDCG@10")]
        assert rows[name] == expected, name
    assert "- Targets tied with another item (fraction of events): a 0.1250, b 0.5000." in markdown


def test_the_catalogue_line_counts_the_catalogue_and_the_table_names_the_tie_policy(tmp_path):
    """Kills R41 (the catalogue line giving the events count as the number of items) and RR11 (the terminal
    table's header printing the whole tie-policy sentence instead of its name)."""
    from hiertcn_fast.rule_report import format_table

    quality = _quality()  # 30 events over a catalogue of 12 items (13 columns, column 0 the padding)
    assert (quality["counts"]["catalogue_items"], quality["counts"]["events"]) == (12, 30)
    markdown = write_report([ModelResult("a", quality)], tmp_path, plots=False)["report"].read_text()
    assert "; 12 items, no sampled negatives." in markdown
    assert format_table({"a": ModelResult("a", quality)}, "per_event").splitlines()[0] == "[per event; optimistic ties]"


def test_a_failed_text_write_leaves_the_old_file_and_no_temporary(monkeypatch, tmp_path):
    """Kills R27 (_write_text keeping its temporary file when the replace fails)."""
    from hiertcn_fast import report

    write_report([ModelResult("a", _quality())], tmp_path, plots=False)
    before = (tmp_path / "results.json").read_text()

    def failing_replace(source, destination):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        write_report([ModelResult("b", _quality())], tmp_path, plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]
    assert (tmp_path / "results.json").read_text() == before


@pytest.mark.parametrize("figures", [dict(events_per_second=5.0), dict(peak_memory_bytes=2**20)])
def test_the_throughput_plot_is_drawn_when_any_figure_is_there(tmp_path, figures):
    """Kills R32 (the throughput plot drawn only when a model has both events/s and peak memory)."""
    written = write_report([ModelResult("a", _quality(), **figures)], tmp_path)
    assert "throughput" in written and (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"


# ---- rule_report.py ---------------------------------------------------------------------------------------------

# test_models_rules.py's log, in dense ids: training events user 1: 1 2 3, user 2: 1 2 | 2 3; test events user 2:
# 3 1 (one session), user 3: 1 2 | 4. Training counts 1: 2, 2: 3, 3: 2, 4: 0, so the popularity order is 2, 1, 3, 4
# (ties by smaller id) and the targets 3 1 1 2 4 rank 3 2 2 1 4. repeat_previous puts the previous item of the
# history first, then popularity; with the session scope the previous items are none, 3, none, 1, none, so the
# targets rank 3 (2 1 3), 3 (3 2 1), 2 (2 1), 2 (1 2), 4 (2 1 3 4); with the user scope the first event's previous
# item is user 2's last training item, 3, its own target (rank 1).
MOST_POPULAR_RANKS = [3, 2, 2, 1, 4]
REPEAT_SESSION_RANKS = [3, 3, 2, 2, 4]


def _mrr_per_event(ranks):
    return sum(1 / r for r in ranks) / len(ranks)


def test_rules_are_fitted_on_train_and_see_the_asked_history(tiny):
    """Kills RR1 (rules fitted on the evaluated split) and RR2 (the history scope not passed to the event stream):
    the figures of most_popular and of repeat_previous with the session scope are the hand-ranked ones."""
    from hiertcn_fast.rule_report import evaluate_rules

    results = evaluate_rules(tiny, "test", rules=("most_popular",))
    assert results["most_popular"].quality["per_event"]["all"]["MRR"] == pytest.approx(
        _mrr_per_event(MOST_POPULAR_RANKS))
    results = evaluate_rules(tiny, "test", rules=("repeat_previous",), history="session")
    assert results["repeat_previous"].quality["per_event"]["all"]["MRR"] == pytest.approx(
        _mrr_per_event(REPEAT_SESSION_RANKS))
    assert results["repeat_previous"].extra["history"] == "session"


def test_the_rule_report_records_the_evaluated_split(tiny, tmp_path):
    """Kills RR10 (results.json's metadata always saying split 'test')."""
    from hiertcn_fast.rule_report import evaluate_rules

    evaluate_rules(tiny, "train", rules=("most_popular",), out_dir=tmp_path)
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["metadata"]["split"] == "train"
    assert any(note.startswith("evaluated split: train (") for note in document["notes"])


def test_the_preprocessing_note_counts_both_user_filters():
    """Kills RR3 (users dropped for too many events not counted) and RR4 (the upper user bound not named)."""
    from hiertcn_fast.rule_report import preprocessing_note

    stats = dict(events_read=10_000, items_dropped_item_filter=7, events_dropped_item_filter=70,
                 users_dropped_too_few_events=3, users_dropped_too_many_events=2,
                 events_dropped_user_too_few_events=9, events_dropped_user_too_many_events=1_200,
                 events_dropped_session_truncation=40)
    params = dict(min_item_count=5, min_user_count=4, max_user_count=500, max_session_length=20)
    note = preprocessing_note(types.SimpleNamespace(manifest={"stats": stats}, params=params))
    assert ("users with fewer than 4 or more than 500 events (5 users, 1,209 events) were dropped" in note), note
    assert "items with fewer than 5 events (7 items, 70 events)" in note
    assert "truncating sessions to their first 20 events dropped 40 events" in note
    note = preprocessing_note(types.SimpleNamespace(manifest={"stats": stats}, params=dict(params,
                                                                                             max_user_count=None)))
    assert "users with fewer than 4 events (5 users" in note and "more than" not in note


def test_a_callers_earlier_peak_is_not_a_rules_peak(tiny):
    """Kills RR6 (the traced peak not reset for each rule when the caller traces): a 32 MiB block the caller
    allocated and freed before must not count as the rule's peak memory."""
    from hiertcn_fast.rule_report import evaluate_rules

    tracemalloc.start()
    try:
        block = bytearray(32 * 2**20)
        del block
        results = evaluate_rules(tiny, "test", rules=("most_popular",))
        assert tracemalloc.is_tracing()
    finally:
        tracemalloc.stop()
    assert 0 < results["most_popular"].peak_memory_bytes < 8 * 2**20


# ---- a defect the audit found (fixed with this test) ----------------------------------------------------------------
# UserHistoryBatcher._order shuffled the batches of similar-length users, the short last batch (users % users_per_batch
# of them) included, then batch(index) slices the concatenation every users_per_batch users: after a short batch in the
# middle, every later slice straddled two length groups (e.g. users of 24 and of 318 events in one batch), undoing
# the by_length grouping whose point is to cut the padding. The short batch now stays last, and holds the shortest
# users, so that the largest batch (the memory peak, which bench_e2e compares with HierTCN's) is a whole batch.

@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("users_per_batch", [4, 7, 9])
def test_length_batches_stay_runs_of_similar_length(cold, users_per_batch, shuffle):
    """Shuffled or not, each batch must be a run of the length-sorted users (no two batches' length ranges
    overlap), only the last batch may be short, and it holds the shortest users: the longest users come in a whole
    batch of users_per_batch."""
    batcher = UserHistoryBatcher(cold, "train", users_per_batch=users_per_batch, shuffle=shuffle, seed=5)
    count = batcher.users.shape[0]
    assert count % users_per_batch  # a short batch exists
    lengths = dict(zip(batcher.users.tolist(), batcher._lengths.tolist()))
    shortest = sorted(lengths.values())[:count % users_per_batch]
    for order in _epoch_orders(batcher, range(3)):
        assert [len(batch) for batch in order[:-1]] == [users_per_batch] * (len(order) - 1)
        assert sorted(lengths[u] for u in order[-1]) == shortest
        ranges = sorted((min(lengths[u] for u in batch), max(lengths[u] for u in batch)) for batch in order)
        assert all(high <= low for (_, high), (low, _) in zip(ranges, ranges[1:])), ranges
