"""Helpers for the model, training and serving tests: hand-built lane batches and small caches."""

import pytest
import torch

from hiertcn_fast.data import SessionBatch


def lane_batch(sessions_per_lane, width=None, keep_last=False, continues=None, epoch=0, index=0) -> SessionBatch:
    """A SessionBatch from explicit sessions: ``sessions_per_lane[b]`` is a list of item-id lists
    (lane b's sessions, in order; lanes may hold different counts). keep is True inside each lane
    except after its last session (unless ``keep_last``)."""
    lanes = len(sessions_per_lane)
    steps = max(len(s) for s in sessions_per_lane)
    longest = max(len(items) for lane in sessions_per_lane for items in lane)
    time = 1 + (width or longest)
    items = torch.zeros(steps, lanes, time, dtype=torch.int64)
    lengths = torch.zeros(steps, lanes, dtype=torch.int64)
    valid = torch.zeros(steps, lanes, dtype=torch.bool)
    keep = torch.zeros(steps, lanes, dtype=torch.bool)
    for b, lane in enumerate(sessions_per_lane):
        for j, session in enumerate(lane):
            items[j, b, 1:1 + len(session)] = torch.tensor(session)
            lengths[j, b] = len(session)
            valid[j, b] = True
            keep[j, b] = keep_last or j < len(lane) - 1
    step_widths = torch.where(valid.any(1), lengths.max(1).values + 1, 0)
    user = torch.where(valid, torch.arange(lanes)[None].expand(steps, lanes), -1)
    session = torch.where(valid, torch.arange(steps * lanes).reshape(steps, lanes), -1)
    if continues is None:
        continues = torch.zeros(lanes, dtype=torch.bool)
    return SessionBatch(items, lengths, step_widths, valid, keep, user, session, continues, epoch, index)


def random_sessions(generator, num_items, lanes, max_sessions=4, max_length=7):
    """Random sessions per lane (every lane at least one session of at least one event)."""
    result = []
    for _ in range(lanes):
        count = int(torch.randint(1, max_sessions + 1, (1,), generator=generator))
        result.append([torch.randint(1, num_items + 1, (int(torch.randint(1, max_length + 1, (1,),
                                                                                  generator=generator)),),
                                     generator=generator).tolist() for _ in range(count)])
    return result


def synthetic_cache(path, num_events=6000, num_items=300, seed=1, split="cold"):
    """A small cache of the synthetic log (planted long- and short-term structure), split by user
    ("cold") or by time ("warm")."""
    from hiertcn_fast.data import PreprocessParams, SyntheticSource, preprocess

    params = PreprocessParams(min_item_count=2, min_user_count=3, max_user_count=None, split=split,
                              num_partitions=2)
    source = SyntheticSource(num_events, num_items=num_items, num_topics=10, mean_events_per_user=40, seed=seed)
    return preprocess(source, path, params)


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on a shared 2-core machine run fastest on one intra-op thread (no spinning workers);
    import this fixture into a test module to use it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
