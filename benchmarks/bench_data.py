"""Data-path benchmark: preprocessing throughput, cache open time, and batches/s of the lane
generator through the PinnedRingQueue against a torch DataLoader producing the same batches.

    python benchmarks/bench_data.py            # 10M synthetic events
    python benchmarks/bench_data.py --quick    # 2M events, shorter timings
    python benchmarks/bench_data.py --big      # also: 100M events, peak memory of preprocessing

All figures come from one run; results go to benchmarks/results/bench_data.json. Preprocessing
runs in a child process so its peak RSS (ru_maxrss) is its own. On a CUDA machine the consumer
also runs a HierTCN-sized stand-in training step and the queue's wait fraction is reported.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness  # noqa: E402

from hiertcn_fast.data import (PreprocessParams, SessionBatcher, SessionCache, SyntheticSource,  # noqa: E402
                               load_dataset, preprocess)

SYNTHETIC = dict(num_items=20_000, num_topics=100, seed=0)
PARAMS = PreprocessParams()  # the paper's XING settings
LANES, STEPS = 32, 10


def preprocess_child(num_events: int, cache_dir: str, chunk_size: int) -> dict:
    """Runs in a fresh process: build the cache, report time and this process's peak RSS."""
    started = time.perf_counter()
    cache = preprocess(SyntheticSource(num_events, **SYNTHETIC), cache_dir, PARAMS, chunk_size=chunk_size)
    seconds = time.perf_counter() - started
    return {"events_in": num_events, "events_out": cache.num_events, "sessions": cache.num_sessions,
            "users": cache.num_users, "items": cache.num_items, "seconds": seconds,
            "events_per_s": num_events / seconds, "chunk_size": chunk_size,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "cache_path": str(cache.path), "cache_bytes": sum(f.stat().st_size for f in cache.path.iterdir())}


def run_preprocess_in_child(num_events: int, cache_dir: str, chunk_size: int) -> dict:
    code = (f"import sys, json; sys.argv=['bench']; sys.path[:0]={sys.path[:2]!r}; import bench_data; "
            f"print(json.dumps(bench_data.preprocess_child({num_events}, {cache_dir!r}, {chunk_size})))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    return json.loads(output.stdout.strip().splitlines()[-1])


def time_ml100k(cache_dir: str) -> dict:
    params = PreprocessParams(min_item_count=5, min_user_count=5, max_user_count=None)
    started = time.perf_counter()
    cache = preprocess(load_dataset("ml-100k"), cache_dir, params, rebuild=True)
    seconds = time.perf_counter() - started
    return {"events_in": 100_000, "events_out": cache.num_events, "seconds": seconds,
            "events_per_s": 100_000 / seconds}


def time_open(path: str, repeats: int = 20) -> dict:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        SessionCache.open(path)
        times.append(time.perf_counter() - started)
    return {"median_s": statistics.median(times), "max_s": max(times)}


class BatchDataset(torch.utils.data.Dataset):
    """The DataLoader baseline: batch k of epoch 0 built by the same SessionBatcher code."""

    def __init__(self, batcher):
        self.batcher = batcher

    def __len__(self):
        return self.batcher.num_batches(0)

    def __getitem__(self, index):
        return self.batcher.batch(index, 0).tensors()


def consume(batches, step=None) -> tuple[int, float, int]:
    count, events = 0, 0
    started = time.perf_counter()
    for batch in batches:
        lengths = batch["lengths"] if isinstance(batch, dict) else batch.lengths
        events += int(lengths.sum())  # touch the data, as a consumer would
        if step is not None:
            step(batch)
        count += 1
    return count, time.perf_counter() - started, events


def time_generators(cache_path: str, max_batches: int, workers: int) -> dict:
    cache = SessionCache.open(cache_path)
    cuda = torch.cuda.is_available()

    def make():
        return SessionBatcher(cache, "train", lanes=LANES, sessions_per_batch=STEPS, max_session_length=20,
                              shuffle=True, seed=0)

    make().num_batches(0)  # verify partitions and plan once, outside the timings
    results = {"lanes": LANES, "sessions_per_batch": STEPS, "workers": workers}

    def limited(iterator):
        try:
            for index, batch in enumerate(iterator):
                if index == max_batches:
                    return
                yield batch
        finally:
            if hasattr(iterator, "close"):  # stops the queue's producers at once
                iterator.close()

    count, seconds, events = consume(limited(iter(make())))
    results["direct_single_thread"] = {"batches": count, "batches_per_s": count / seconds,
                                       "events_per_s": events / seconds}
    batcher = make()
    queued = batcher.iter_queued(num_producers=workers, num_slots=8, device="cuda" if cuda else "cpu")
    count, seconds, events = consume(limited(queued))
    results["generator_queue"] = {"batches": count, "batches_per_s": count / seconds,
                                  "events_per_s": events / seconds}
    loader = torch.utils.data.DataLoader(BatchDataset(make()), batch_size=None, shuffle=False, num_workers=workers,
                                         pin_memory=cuda, prefetch_factor=4 if workers else None)

    def to_device(iterator):
        for batch in iterator:
            yield {k: v.to("cuda", non_blocking=True) for k, v in batch.items()} if cuda else batch

    count, seconds, events = consume(limited(to_device(iter(loader))))
    results["dataloader"] = {"batches": count, "batches_per_s": count / seconds, "events_per_s": events / seconds,
                             "pin_memory": cuda}
    results["ratio_queue_over_dataloader"] = (results["generator_queue"]["batches_per_s"]
                                              / results["dataloader"]["batches_per_s"])
    if cuda:
        results["gpu_wait"] = time_gpu_wait(make(), max_batches, workers)
    return results


def time_gpu_wait(batcher, max_batches: int, workers: int) -> dict:
    """Consumer wait as a fraction of step time with a HierTCN-sized stand-in step (embedding,
    two conv blocks, full-softmax output over the catalogue)."""
    from hiertcn_fast.data import PinnedRingQueue

    items = batcher.cache.num_items + 1
    embedding = torch.nn.Embedding(items, 128).cuda()
    conv = torch.nn.Conv1d(128, 128, 5, padding=4).cuda()
    output = torch.nn.Linear(128, items).cuda()
    optimizer = torch.optim.Adam([*embedding.parameters(), *conv.parameters(), *output.parameters()], 1e-3)

    def step(batch):
        x = embedding(batch["items"].flatten(0, 1))                    # (S*B, T, 128)
        h = torch.relu(conv(x.transpose(1, 2))[..., :x.shape[1]]).transpose(1, 2)
        loss = torch.nn.functional.cross_entropy(output(h[:, :-1]).flatten(0, 1), batch["items"].flatten(0, 1)[:, 1:]
                                                 .flatten(), ignore_index=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def produce(seq, slot):
        return seq < max_batches and batcher.fill(seq % batcher.num_batches(0), slot, 0)

    with PinnedRingQueue(batcher.batch_spec(), produce, num_producers=workers, num_slots=8, device="cuda") as q:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _, batch in q:
            step(batch)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        stats = q.stats.as_dict()
    return {"steps": stats["delivered"], "step_ms": 1e3 * seconds / stats["delivered"],
            "wait_fraction": stats["consumer_wait_seconds"] / seconds, "queue": stats}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2M events and fewer batches")
    parser.add_argument("--big", action="store_true", help="also preprocess 100M events (peak memory)")
    parser.add_argument("--events", type=int, default=None, help="synthetic events for the main run")
    parser.add_argument("--workers", type=int, default=2, help="producer threads / DataLoader workers")
    parser.add_argument("--cache-dir", default=None, help="where caches go (default: a temporary directory)")
    args = parser.parse_args()
    num_events = args.events or (2_000_000 if args.quick else 10_000_000)
    max_batches = 300 if args.quick else 1500
    results = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "machine": harness.machine(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as cache_dir:
        results["preprocess"] = run_preprocess_in_child(num_events, cache_dir, 1 << 22)
        print(f"preprocess {num_events:,} synthetic events: {results['preprocess']['seconds']:.2f} s, "
              f"{results['preprocess']['events_per_s'] / 1e6:.2f} M events/s, peak RSS "
              f"{results['preprocess']['peak_rss_bytes'] / 2**20:.0f} MiB")
        results["preprocess_ml100k"] = time_ml100k(cache_dir)
        print(f"preprocess ml-100k (parse + all steps): {results['preprocess_ml100k']['events_per_s'] / 1e6:.2f} "
              f"M events/s")
        results["cache_open"] = time_open(results["preprocess"]["cache_path"])
        print(f"cache open: median {results['cache_open']['median_s'] * 1e3:.2f} ms")
        generators = time_generators(results["preprocess"]["cache_path"], max_batches, args.workers)
        results["batches"] = generators
        print(f"batches/s (lanes {LANES}, {STEPS} sessions/batch): direct {generators['direct_single_thread']['batches_per_s']:.0f}, "
              f"generator+queue {generators['generator_queue']['batches_per_s']:.0f}, "
              f"DataLoader({args.workers} workers) {generators['dataloader']['batches_per_s']:.0f}; "
              f"ratio queue/DataLoader {generators['ratio_queue_over_dataloader']:.2f}x")
        if "gpu_wait" in generators:
            print(f"GPU stand-in step {generators['gpu_wait']['step_ms']:.2f} ms, consumer waits "
                  f"{100 * generators['gpu_wait']['wait_fraction']:.2f}% of it")
        if args.big:
            big = run_preprocess_in_child(100_000_000, cache_dir, 1 << 22)
            results["preprocess_100M"] = big
            print(f"preprocess 100M events: {big['seconds']:.1f} s, {big['events_per_s'] / 1e6:.2f} M events/s, "
                  f"peak RSS {big['peak_rss_bytes'] / 2**30:.2f} GiB, cache {big['cache_bytes'] / 2**30:.2f} GiB")
    os.makedirs(harness.RESULTS_DIR, exist_ok=True)
    path = os.path.join(harness.RESULTS_DIR, "bench_data.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
