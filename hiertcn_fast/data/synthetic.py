"""A synthetic interaction log with planted structure, generated in blocks so that it streams.

Structure:
- long-term: each user has a few favourite topics (topic popularity is Zipf-like, so rare
  topics feed the item filter); every session picks one of them, weighted per user;
- short-term: within a session the user walks through the topic's items, mostly one step
  forward, sometimes jumping, so the next item is predictable from the previous one;
- time: sessions are separated by at least an hour, events within a session by seconds to a
  few minutes (always under 25 minutes), timestamps are whole seconds (ties happen).

Users are generated in blocks of ``users_per_block`` with a random generator seeded by
``(seed, block)``, so the content never depends on the chunk size the consumer asks for; within a
block events are emitted in time order (users interleave, as in a real log). Exactly
``num_events`` events are produced (the last user is cut short).
"""

from __future__ import annotations

import numpy as np

from .._ints import is_int
from .readers import DEFAULT_CHUNK_SIZE, InteractionChunk, InteractionSource, ReadStats, _check_chunk_size

__all__ = ["SyntheticSource"]


class SyntheticSource(InteractionSource):
    """Synthetic users with long-term interests and in-session dynamics.

    Args:
        num_events: exact number of events produced.
        num_items: size of the item catalogue (raw ids are a permutation offset by 10_000).
        num_topics: number of topics the catalogue is split into.
        mean_events_per_user: mean of the (geometric) number of events per user.
        mean_session_length: mean of the (geometric) session length.
        interests_per_user: favourite topics per user.
        seed: everything is a function of the seed.
        users_per_block: generation granularity (memory per block ~ 100 B per event).
    """

    name = "synthetic"

    def __init__(self, num_events: int, num_items: int = 10_000, num_topics: int = 50,
                 mean_events_per_user: float = 100.0, mean_session_length: float = 6.0,
                 interests_per_user: int = 3, seed: int = 0, users_per_block: int = 4096,
                 start_time: float = 1.5e9):
        for arg, value, low in (("num_events", num_events, 1), ("num_items", num_items, 1),
                                ("num_topics", num_topics, 1), ("interests_per_user", interests_per_user, 1),
                                ("users_per_block", users_per_block, 1), ("seed", seed, 0)):
            if not is_int(value) or value < low:
                raise ValueError(f"{arg} must be an integer >= {low}, got {value!r}")
        if num_topics > num_items:
            raise ValueError(f"num_topics ({num_topics}) must not exceed num_items ({num_items})")
        for arg, value in (("mean_events_per_user", mean_events_per_user),
                           ("mean_session_length", mean_session_length)):
            if not value >= 1.0:
                raise ValueError(f"{arg} must be >= 1, got {value!r}")
        self.num_events = int(num_events)
        self.num_items = int(num_items)
        self.num_topics = int(num_topics)
        self.mean_events_per_user = float(mean_events_per_user)
        self.mean_session_length = float(mean_session_length)
        self.interests_per_user = int(interests_per_user)
        self.seed = int(seed)
        self.users_per_block = int(users_per_block)
        self.start_time = float(start_time)
        self.name = f"synthetic{self.num_events}"
        self._item_raw_ids = np.random.default_rng([self.seed, 1 << 30]).permutation(self.num_items) + 10_000
        topic_weight = 1.0 / np.arange(1, self.num_topics + 1) ** 0.8
        self._topic_probability = topic_weight / topic_weight.sum()

    def fingerprint(self) -> dict:
        return {"reader": type(self).__name__, "num_events": self.num_events, "num_items": self.num_items,
                "num_topics": self.num_topics, "mean_events_per_user": self.mean_events_per_user,
                "mean_session_length": self.mean_session_length,
                "interests_per_user": self.interests_per_user, "seed": self.seed,
                "users_per_block": self.users_per_block, "start_time": self.start_time, "version": 1}

    def topic_of_raw_item(self, raw_item: np.ndarray) -> np.ndarray:
        """The planted topic of raw item ids (for tests of the structure)."""
        index = np.empty(self.num_items, dtype=np.int64)
        index[self._item_raw_ids - 10_000] = np.arange(self.num_items)
        return index[np.asarray(raw_item) - 10_000] // (self.num_items // self.num_topics)

    def _block(self, block: int, max_events: int) -> InteractionChunk:
        rng = np.random.default_rng([self.seed, block])
        users = self.users_per_block
        events_per_user = rng.geometric(1.0 / self.mean_events_per_user, size=users)
        cumulative = np.cumsum(events_per_user)
        if cumulative[-1] > max_events:
            users = int(np.searchsorted(cumulative, max_events)) + 1
            events_per_user = events_per_user[:users].copy()
            events_per_user[-1] -= int(cumulative[users - 1] - max_events)
        total = int(events_per_user.sum())
        user_of_event = np.repeat(np.arange(users), events_per_user)
        user_first_event = np.concatenate(([0], np.cumsum(events_per_user)[:-1]))

        starts_session = rng.random(total) < 1.0 / self.mean_session_length
        starts_session[user_first_event] = True
        session_of_event = np.cumsum(starts_session) - 1
        session_first_event = np.flatnonzero(starts_session)
        session_user = user_of_event[session_first_event]
        sessions = session_first_event.shape[0]

        favourite_topics = rng.choice(self.num_topics, size=(users, self.interests_per_user),
                                      p=self._topic_probability)
        interest = rng.gamma(1.0, size=(users, self.interests_per_user))
        interest_cdf = np.cumsum(interest, axis=1) / interest.sum(axis=1, keepdims=True)
        choice = (rng.random(sessions)[:, None] > interest_cdf[session_user]).sum(axis=1)
        choice = np.minimum(choice, self.interests_per_user - 1)
        session_topic = favourite_topics[session_user, choice]

        items_per_topic = self.num_items // self.num_topics
        session_start_position = (items_per_topic * rng.random(sessions) ** 2).astype(np.int64)
        step = np.where(rng.random(total) < 0.8, 1, rng.integers(0, items_per_topic, size=total))
        step[starts_session] = 0
        walked = np.cumsum(step)
        walked -= walked[session_first_event][session_of_event]
        position = (session_start_position[session_of_event] + walked) % items_per_topic
        item = self._item_raw_ids[session_topic[session_of_event] * items_per_topic + position]

        gap = np.minimum(np.floor(rng.exponential(60.0, size=total)), 1500.0)
        gap[starts_session] = 3600.0 + np.floor(rng.exponential(86400.0, size=sessions))
        gap[user_first_event] = 0.0
        elapsed = np.cumsum(gap)
        elapsed -= elapsed[user_first_event][user_of_event]
        user_start = self.start_time + np.floor(rng.random(users) * 30 * 86400.0)
        timestamp = user_start[user_of_event] + elapsed

        raw_user = block * self.users_per_block + user_of_event + 1
        order = np.argsort(timestamp, kind="stable")
        return InteractionChunk(raw_user[order].astype(np.int64), item[order].astype(np.int64),
                                timestamp[order])

    def iter_chunks(self, chunk_size: int = DEFAULT_CHUNK_SIZE, stats: ReadStats | None = None):
        chunk_size = _check_chunk_size(chunk_size)
        stats = stats if stats is not None else ReadStats()
        produced = 0
        block = 0
        buffer = InteractionChunk(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64))
        offset = 0
        while offset < len(buffer) or produced < self.num_events:
            if len(buffer) - offset < chunk_size and produced < self.num_events:
                # Refill: keep the unread tail, append whole blocks until a chunk is available.
                parts = [InteractionChunk(*(a[offset:] for a in buffer))]
                available = len(parts[0])
                while available < chunk_size and produced < self.num_events:
                    fresh = self._block(block, self.num_events - produced)
                    block += 1
                    produced += len(fresh)
                    available += len(fresh)
                    parts.append(fresh)
                buffer = InteractionChunk(*(np.concatenate(arrays) for arrays in zip(*parts)))
                offset = 0
            head = InteractionChunk(*(a[offset:offset + chunk_size] for a in buffer))
            offset += len(head)
            stats.records += len(head)
            stats.events += len(head)
            yield head
