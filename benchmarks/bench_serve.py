"""Streaming inference against recomputing, in the same run: one event of one user, then that user's scores.

streaming: StreamingRecommender.observe(user, item, t) then scores(user): the conv step state within the
session and a GRU update when a session closes (a new session every tenth event here, 2 hours after the
last). recompute (the baseline): what a server without per-user state does for the same answer: the same
model's forward over the user's whole history so far (one lane), in the sessions the stream cut, with a
placeholder event after the newest one, whose features are the prediction after the newest event; then their
scores. make() checks once that this is the streaming answer. Both run the default backend (the fused
kernels). Paper-sized HierTCN (width
128, 2 x 128 GRU, TCN 2 x 128, k 5) over the ml-100k catalogue size (1,682 items), float32.

    python -m pytest benchmarks/bench_serve.py
"""

import os
import sys

import torch

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import harness  # noqa: E402

from hiertcn_fast.data import SessionBatch  # noqa: E402
from hiertcn_fast.models import HierTCN  # noqa: E402
from hiertcn_fast.serve import StreamingRecommender  # noqa: E402

NUM_ITEMS = 1682
SESSION_EVENTS = 10
GAP = 1800.0


def _case(device, events):
    def make():
        torch.manual_seed(0)
        model = HierTCN(NUM_ITEMS).to(device).eval()
        generator = torch.Generator().manual_seed(1)
        items = torch.randint(1, NUM_ITEMS + 1, (events,), generator=generator).tolist()
        recommender = StreamingRecommender(model, session_gap=GAP)
        clock = {"t": 0.0, "n": 0}

        def advance():
            # The next event: 60 s after the last, or a new session 2 hours later every SESSION_EVENTS events.
            clock["n"] += 1
            clock["t"] += 7200.0 if clock["n"] % SESSION_EVENTS == 0 else 60.0
            return clock["t"]

        sessions = []
        for item in items:  # the user's history so far, in the sessions the stream cuts
            now = advance()
            if not sessions or clock["n"] % SESSION_EVENTS == 0:
                sessions.append([])
            sessions[-1].append(item)
            recommender.observe("user", item, now)
        # The placeholder is never read: the features at a position are made of the events before it.
        batch = SessionBatch.of_sessions(sessions[:-1] + [sessions[-1] + [1]], device)

        def streaming():
            recommender.observe("user", items[clock["n"] % events], advance())
            return recommender.scores("user")

        def recompute():
            with torch.no_grad():
                features, _ = model(batch, None)
                return model.scores(features[-1:])[0]

        # The same answer, once, before any call is timed (the padding item's score aside).
        expected, got = recommender.scores("user")[1:], recompute()[1:]
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().max()))):
            raise AssertionError(f"serve: recompute differs from the streaming answer by "
                                 f"{float((got - expected).abs().max())}")
        return {"streaming": streaming, "recompute": recompute}

    # Not the same result call for call: each streaming call adds an event to the history, the recompute runs
    # the fixed one (make() checks the first answer). That streaming equals the full forward is tests/test_serve.py's
    # subject.
    return harness.Case("serve", f"hiertcn one event, history of {events} events", make, fast="streaming",
                        baseline="recompute", variants=("streaming", "recompute"), same_result=False)


def cases(device, quick):
    return [_case(device, events) for events in ((30, 300) if quick else (30, 300, 1000))]


test_bench = harness.bench_test(cases)
