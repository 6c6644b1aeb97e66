"""Tests written to kill mutants of hiertcn_fast/serve.py, hiertcn_fast/data/ring_queue.py and
hiertcn_fast/data/cache.py that the rest of the suite let survive (a mutation-testing audit).

Each test names the mutant(s) it kills. Serving results are checked against a full forward pass of the model
over the same history (or against a snapshot taken before a call that must change nothing); queue behaviour
against hand-built expectations. Every wait is bounded, so a broken queue fails a test instead of hanging it.
"""

import threading
import time

import numpy as np
import pytest
import torch

from hiertcn_fast.data import ArraySource, PinnedRingQueue, PreprocessParams, SessionCache, preprocess
from hiertcn_fast.data.cache import CacheCorruptError
from hiertcn_fast.serve import StreamingRecommender
from model_helpers import lane_batch, one_thread  # noqa: F401 (autouse fixture)
from test_serve import GAP, NUM_ITEMS, small_hiertcn

BOUND = 10.0  # seconds: any wait in these tests; reached only by a broken queue


def forward_prediction(model, sessions):
    """Full-forward logits of the event after ``sessions`` (one user, one lane): the last session gets a dummy
    item appended, and the logits at its position predict it from everything before."""
    sessions = [list(s) for s in sessions]
    sessions[-1] = sessions[-1] + [1]
    batch = lane_batch([sessions])
    with torch.no_grad():
        features, _ = model(batch, None)
        return model.scores(features)[-1].float()


def assert_matches_forward(got, model, sessions):
    expected = forward_prediction(model, sessions)
    torch.testing.assert_close(got[1:].float(), expected[1:], rtol=1e-5, atol=1e-5)
    assert got[0] == -torch.inf


def snapshot(recommender):
    users = list(recommender.user_slot)
    saved = recommender.export_users(users)
    return users, {k: v for k, v in saved.items() if isinstance(v, (torch.Tensor, list)) and k != "users"}


def assert_unchanged(recommender, before):
    users, tensors = snapshot(recommender)
    assert users == before[0]
    for key, value in tensors.items():
        want = before[1][key]
        if isinstance(value, list):
            assert all(torch.equal(a, b) for a, b in zip(value, want, strict=True)), key
        else:
            assert torch.equal(value, want), key


# ---- serve: session boundaries ---------------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True])
def test_a_gap_exactly_session_gap_closes_the_session(batched):
    """Kills S1 (serve.py _observe_one: ``>= session_gap`` -> ``>``) with batched=False and S2 (_observe_round:
    the same) with batched=True. A gap equal to session_gap closes the session (the preprocessing's rule)."""
    model = small_hiertcn()
    recommender = StreamingRecommender(model, session_gap=GAP)
    for item, t in [(3, 100.0), (4, 160.0), (5, 160.0 + GAP), (6, 220.0 + GAP)]:
        if batched:
            recommender.observe_many(["u"], [item], [t])
        else:
            recommender.observe("u", item, t)
    assert_matches_forward(recommender.scores("u"), model, [[3, 4], [5, 6]])


def test_a_failed_batched_call_closing_at_exactly_the_gap_changes_nothing(monkeypatch):
    """Kills S5 (serve.py _rows_at_risk: ``>= session_gap`` -> ``>``): a row whose session closes at exactly the
    gap has its GRU step written before its new session's start token is stepped, so it must be saved and put
    back when that step fails."""
    model = small_hiertcn()
    recommender = StreamingRecommender(model, session_gap=GAP)
    recommender.observe_many(["a", "b"], [3, 4], [100.0, 100.0])
    recommender.observe_many(["a"], [7], [160.0])
    before = snapshot(recommender)

    def failing(self, rows, inputs):
        raise RuntimeError("injected failure")

    with monkeypatch.context() as patch:
        patch.setattr(StreamingRecommender, "_conv_step", failing)
        with pytest.raises(RuntimeError, match="injected failure"):
            recommender.observe_many(["a"], [5], [160.0 + GAP])
    assert_unchanged(recommender, before)
    recommender.observe_many(["a"], [5], [160.0 + GAP])
    assert_matches_forward(recommender.scores("a"), model, [[3, 7], [5]])


@pytest.mark.parametrize("batched", [False, True])
def test_a_second_idle_look_up_does_not_close_an_empty_session(batched):
    """Kills S20 (serve.py scores: ``count[row] > 0`` -> ``>= 0``) with batched=False and S21 (scores_many: the
    same in ``idle``) with batched=True: a session closed by ``now`` is empty, and a later ``now`` must not step
    the GRU again with an empty session's (zero) mean."""
    model = small_hiertcn()
    recommender = StreamingRecommender(model, session_gap=GAP)
    recommender.observe("u", 3, 100.0)
    recommender.observe("u", 4, 160.0)

    def look(now):
        return recommender.scores_many(["u"], now=[now])[0] if batched else recommender.scores("u", now=now)

    assert_matches_forward(look(160.0 + GAP), model, [[3, 4], []])
    assert_matches_forward(look(160.0 + 3 * GAP), model, [[3, 4], []])
    recommender.observe("u", 5, 160.0 + 3 * GAP)
    assert_matches_forward(recommender.scores("u"), model, [[3, 4], [5]])


def test_a_look_up_of_a_user_who_is_not_idle_leaves_the_users_time_alone():
    """Kills S22 (serve.py scores_many: ``last_time[rows[idle]] = now[idle]`` -> ``last_time[rows] = now``): the gap
    that closes a session is measured from the user's last event, not from a look-up that closed nothing for that
    user (while it closed another user's session)."""
    model = small_hiertcn()
    recommender = StreamingRecommender(model, session_gap=GAP)
    recommender.observe_many(["u", "v"], [3, 8], [100.0, 100.0])
    recommender.observe("u", 4, 160.0)
    # u idle 1000 s (below the gap: nothing closes for u); v idle for the gap (v's session closes).
    scores = recommender.scores_many(["u", "v"], now=[1160.0, 100.0 + GAP])
    assert_matches_forward(scores[0], model, [[3, 4]])
    assert_matches_forward(scores[1], model, [[8], []])
    recommender.observe("u", 5, 160.0 + GAP)  # GAP after u's last event: a new session
    assert_matches_forward(recommender.scores("u"), model, [[3, 4], [5]])


# ---- serve: recommendations -------------------------------------------------------------------------


def test_k_cannot_reach_the_padding_id():
    """Kills S14 (serve.py _check_k: ``k <= num_items`` -> ``k <= num_items + 1``): k past the item count would
    recommend the padding id 0 (score -inf)."""
    recommender = StreamingRecommender(small_hiertcn(), session_gap=GAP)
    recommender.observe("u", 3, 100.0)
    for call in (lambda k: recommender.recommend("u", k=k), lambda k: recommender.recommend_many(["u"], k=k)):
        with pytest.raises(ValueError, match="k must be"):
            call(NUM_ITEMS + 1)
    assert sorted(recommender.recommend("u", k=NUM_ITEMS)) == list(range(1, NUM_ITEMS + 1))
    assert sorted(recommender.recommend_many(["u"], k=NUM_ITEMS)[0][0].tolist()) == list(range(1, NUM_ITEMS + 1))


# ---- serve: forgetting, saving, failures ---------------------------------------------------------------


def test_a_user_moved_into_a_forgotten_row_does_not_use_that_rows_cached_context():
    """Kills S11 (serve.py forget_users: the freed row's row view is not dropped): the user moved into the freed
    row would step its single events with the forgotten user's cached TCN context."""
    model = small_hiertcn()
    recommender = StreamingRecommender(model, session_gap=GAP)
    histories = {"a": [[3, 4, 5], [6, 7]], "b": [[9], [10, 11]]}
    for user, sessions in histories.items():
        t = 100.0
        for session in sessions:
            for item in session:
                recommender.observe(user, item, t)  # known users: single events, through row views
                t += 60.0
            t += 2 * GAP
    assert recommender.user_slot == {"a": 0, "b": 1} and 0 in recommender._row_views
    recommender.forget_users(["a"])
    assert recommender.user_slot == {"b": 0}
    recommender.observe("b", 12, 100.0 + 2 * GAP + 180.0)  # b's open session goes on
    assert_matches_forward(recommender.scores("b"), model, [[9], [10, 11, 12]])


def test_a_user_restored_mid_session_goes_on_with_that_session():
    """Kills S18 (serve.py load_state_dict: conv positions not restored): a restored open session's circular conv
    buffers are read at the saved positions (here 3 steps in, not a multiple of either layer's buffer)."""
    model = small_hiertcn()
    source = StreamingRecommender(model, session_gap=GAP)
    for item, t in [(3, 100.0), (4, 160.0), (5, 160.0 + 2 * GAP), (6, 220.0 + 2 * GAP)]:
        source.observe("u", item, t)
    restored = StreamingRecommender(model, session_gap=GAP)
    restored.load_state_dict(source.state_dict())
    restored.observe("u", 7, 280.0 + 2 * GAP)
    restored.observe("u", 8, 340.0 + 2 * GAP)
    assert_matches_forward(restored.scores("u"), model, [[3, 4], [5, 6, 7, 8]])


def test_a_load_that_fails_part_way_changes_nothing(monkeypatch):
    """The audit's one bug (serve.py load_state_dict wrote the users' tensors one after another, with no way back):
    a load interrupted after the GRU states were written left a new user registered, half loaded (features zero,
    no session) and served, and a known user with the saved GRU state over its own session. Now neither."""
    model = small_hiertcn()
    source = StreamingRecommender(model, session_gap=GAP)
    for user, item, t in [("a", 3, 100.0), ("a", 4, 160.0), ("k", 9, 100.0), ("k", 8, 100.0 + 2 * GAP)]:
        source.observe(user, item, t)
    saved = source.state_dict()
    target = StreamingRecommender(model, session_gap=GAP)
    for item, t in [(5, 0.0), (6, 2 * GAP), (7, 60.0 + 2 * GAP)]:
        target.observe("k", item, t)  # a known user of the target, with another history than the saved one
    target.observe("z", 11, 50.0)
    before = snapshot(target)
    calls = []
    original = StreamingRecommender._states_changed

    def interrupted_once(self, rows):
        calls.append(rows)
        if len(calls) == 1:  # the load's own call, after the GRU states were written
            raise KeyboardInterrupt
        return original(self, rows)

    with monkeypatch.context() as patch:
        patch.setattr(StreamingRecommender, "_states_changed", interrupted_once)
        with pytest.raises(KeyboardInterrupt):
            target.load_state_dict(saved)
    assert_unchanged(target, before)
    with pytest.raises(KeyError):
        target.scores("a")
    assert_matches_forward(target.scores("k"), model, [[5], [6, 7]])
    target.load_state_dict(saved)  # and the same load, uninterrupted, takes
    assert_matches_forward(target.scores("a"), model, [[3, 4]])
    assert_matches_forward(target.scores("k"), model, [[9], [8]])


def test_a_failed_closing_event_leaves_no_stale_context_behind(monkeypatch):
    """Kills S19 (serve.py _restore_rows: the restored rows' row views are not marked stale): an event that closes
    a session and fails at its start token computed the new context into the row view; once the old state is put
    back, an event of the old session must not be stepped with the new context."""
    model = small_hiertcn()
    recommender = StreamingRecommender(model, session_gap=GAP)
    recommender.observe("a", 3, 100.0)
    recommender.observe("a", 4, 160.0)  # single event: the row view is made
    before = snapshot(recommender)

    def failing(*args, **kwargs):
        raise RuntimeError("injected failure")

    with monkeypatch.context() as patch:
        patch.setattr(model.tcn, "step", failing)
        with pytest.raises(RuntimeError, match="injected failure"):
            recommender.observe("a", 5, 1e5)  # closes the session: GRU step and context, then the start token
    assert_unchanged(recommender, before)
    recommender.observe("a", 6, 220.0)  # the session 3, 4 goes on
    assert_matches_forward(recommender.scores("a"), model, [[3, 4, 6]])


# ---- ring queue --------------------------------------------------------------------------------------

SPEC = {"value": ((4,), torch.int64)}


def consume_bounded(queue, on_item=None):
    """Iterate ``queue`` on another thread, for at most BOUND seconds (a consumer that hangs fails the test).
    Returns (sequence numbers with their values, the exception that ended the loop or None)."""
    got, outcome = [], {}

    def consume():
        try:
            for seq, tensors in queue:
                got.append((seq, tensors["value"].clone()))
                if on_item is not None:
                    on_item(seq)
        except BaseException as error:  # noqa: B902 - the test inspects whatever ended the loop
            outcome["error"] = error

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    consumer.join(BOUND)
    if consumer.is_alive():
        queue._ring.abandon()  # let the producers go; the consumer's get() raises on its next poll
        consumer.join(BOUND)
        assert queue.close(BOUND), "producers still running"
        pytest.fail(f"consumer still waiting after {[seq for seq, _ in got]}")
    assert queue.close(BOUND), "producers still running after the stream ended"
    return got, outcome.get("error")


def get_bounded(queue):
    """queue.get() on another thread, for at most BOUND seconds (a get() that hangs fails the test)."""
    outcome = {}

    def get():
        try:
            outcome["item"] = queue.get()
        except BaseException as error:  # noqa: B902 - the test inspects it
            outcome["error"] = error

    getter = threading.Thread(target=get, daemon=True)
    getter.start()
    getter.join(BOUND)
    if getter.is_alive():
        queue._ring.abandon()  # get() raises on its next poll
        getter.join(BOUND)
        pytest.fail("get() still waiting")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["item"]


@pytest.mark.parametrize("num_slots", [2, 3])
def test_batches_arrive_in_order_from_the_slot_of_their_sequence_number(num_slots):
    """Kills Q1 (ring_queue.py produce_batch: ``slot = seq % num_slots`` -> ``(seq + 1) % num_slots``), which
    otherwise only hangs the suite: every batch, with its own content, in order, within a bounded time."""
    total = 3 * num_slots + 1
    queue = PinnedRingQueue(SPEC, lambda seq, slot: seq < total and (slot["value"].fill_(seq) is not None),
                            num_producers=2, num_slots=num_slots)
    got, error = consume_bounded(queue)
    assert error is None
    assert [seq for seq, _ in got] == list(range(total))
    assert all(bool((value == seq).all()) for seq, value in got)
    assert queue.alive_producers == 0


def test_a_full_ring_lets_no_producer_start_another_batch():
    """Kills Q2 (ring_queue.py produce_batch: ``seq >= next_deliver + num_slots`` -> ``>``), which otherwise only
    hangs the suite: with nothing consumed, exactly num_slots batches are produced, and one more per delivery."""
    produced, lock = [], threading.Lock()

    def produce(seq, slot):
        with lock:
            produced.append(seq)
        slot["value"].fill_(seq)
        return True

    queue = PinnedRingQueue(SPEC, produce, num_producers=3, num_slots=2)
    try:
        deadline = time.monotonic() + BOUND
        while len(produced) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # time for a producer that wrongly runs ahead
        assert sorted(produced) == [0, 1]
        seq, tensors = get_bounded(queue)
        assert seq == 0 and bool((tensors["value"] == 0).all())
        deadline = time.monotonic() + BOUND
        while len(produced) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        assert sorted(produced) == [0, 1, 2]
    finally:
        assert queue.close()


def test_a_producer_error_reaches_the_consumer_within_a_bounded_time():
    """Kills Q4 (ring_queue.py run_producer: the error is not recorded), which otherwise only hangs the suite:
    batches before the failed one arrive, then its exception, and every producer is gone."""
    def produce(seq, slot):
        if seq == 4:
            raise ValueError("bad batch 4")
        slot["value"].fill_(seq)
        return True

    queue = PinnedRingQueue(SPEC, produce, num_producers=3, num_slots=2)
    got, error = consume_bounded(queue)
    assert [seq for seq, _ in got] == [0, 1, 2, 3]
    assert isinstance(error, ValueError) and str(error) == "bad batch 4"
    assert queue.alive_producers == 0


def test_a_slot_is_not_refilled_while_its_batch_is_being_copied_out():
    """Kills Q10 (ring_queue.py get: the slot is released before its batch is copied out): a producer then
    overwrites the batch while the consumer copies it."""
    queue = PinnedRingQueue(SPEC, lambda seq, slot: seq < 4 and (slot["value"].fill_(seq) is not None),
                            num_producers=2, num_slots=1)
    real_copy_out = queue._copy_out

    def slow_copy_out(host, copy_done):
        time.sleep(0.15)  # a slow device copy: a producer let in too early writes the next batch meanwhile
        return real_copy_out(host, copy_done)

    queue._copy_out = slow_copy_out
    got, error = consume_bounded(queue)
    assert error is None
    assert [seq for seq, _ in got] == [0, 1, 2, 3]
    assert [value.tolist() for _, value in got] == [[seq] * 4 for seq in range(4)]


def test_the_stream_ends_at_the_first_missing_batch_whichever_producer_says_so_first():
    """Kills Q13 (ring_queue.py produce_batch: ``end_seq`` keeps the first end reported in time, not the earliest
    batch): batch 4 reports the end before batch 3 does; the stream still ends after batch 2."""
    four_done, four_thread = threading.Event(), []

    def produce(seq, slot):
        if seq == 3:
            assert four_done.wait(BOUND)
            four_thread[0].join(BOUND)  # batch 4's end is recorded: its thread has exited
            return False
        if seq == 4:
            four_thread.append(threading.current_thread())
            four_done.set()
            return False
        if seq > 4:
            return False
        slot["value"].fill_(seq)
        return True

    queue = PinnedRingQueue(SPEC, produce, num_producers=2, num_slots=8)
    got, error = consume_bounded(queue)
    assert error is None
    assert [seq for seq, _ in got] == [0, 1, 2]
    assert queue.alive_producers == 0


# ---- session cache -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_cache_dir(tmp_path_factory):
    rng = np.random.default_rng(3)
    n = 600
    user = rng.integers(0, 40, size=n) * 3 + 1
    item = rng.integers(0, 30, size=n) + 100
    timestamp = rng.integers(0, 100, size=n) * 900.0
    params = PreprocessParams(min_item_count=1, min_user_count=1, max_user_count=None, num_partitions=4)
    cache = preprocess(ArraySource(user, item, timestamp, "mutants"), tmp_path_factory.mktemp("cache"), params)
    return cache.path


def copy_of(cache_dir, tmp_path):
    import shutil

    target = tmp_path / cache_dir.name
    shutil.copytree(cache_dir, target)
    return target


def test_a_cache_file_longer_than_its_manifest_says_is_refused(small_cache_dir, tmp_path):
    """Kills C7 (cache.py open: ``actual != expected`` -> only a missing or short file refused): every file's
    size must be exactly what the manifest says, so a file with bytes appended (replaced, or written by something
    else) is refused, not silently read as its first ``length`` entries."""
    path = copy_of(small_cache_dir, tmp_path)
    SessionCache.open(path, verify="full")  # intact
    with open(path / "timestamp.bin", "ab") as f:
        f.write(np.zeros(1, dtype=np.float64).tobytes())
    with pytest.raises(CacheCorruptError, match="timestamp.bin: expected .* bytes"):
        SessionCache.open(path)


def test_the_session_offsets_end_point_is_checked_when_the_cache_is_opened(small_cache_dir, tmp_path):
    """Kills C4 (cache.py _check_structure: the last offset is not compared with the count): a cache whose
    session offsets do not end at the event count is refused at open, not only at the first read."""
    path = copy_of(small_cache_dir, tmp_path)
    offsets = np.memmap(path / "session_offsets.bin", dtype=np.int64, mode="r+")
    offsets[-1] -= 1
    offsets.flush()
    del offsets
    with pytest.raises(CacheCorruptError, match="session_offsets.bin: offsets do not span"):
        SessionCache.open(path, verify="lazy")


def test_partition_of_users_maps_every_user_to_the_partition_holding_it(small_cache_dir):
    """Kills C8 (cache.py partition_of_users: ``side="right"`` -> ``"left"``): a user at the first place of a
    partition belongs to that partition, not the one before."""
    cache = SessionCache.open(small_cache_dir)
    offsets = np.asarray(cache.partition_user_offsets)
    assert cache.num_partitions == 4 and len(set(offsets.tolist())) == 5  # four non-empty partitions
    expected = np.array([next(p for p in range(cache.num_partitions) if offsets[p] <= u < offsets[p + 1])
                         for u in range(cache.num_users)])
    np.testing.assert_array_equal(cache.partition_of_users(np.arange(cache.num_users)), expected)
