"""The paper's efficiency claims, measured end to end in one run on the same data and hardware.

1. Training events/s of HierTCN against HRNN and HierGRU (paper: 2.5x faster than RNN models;
   our goal 4x); the GRU4Rec-style session GRU for reference.
2. Data memory of HierTCN against the single-level TCN over whole histories (paper: 90% less; our
   goal 95% less): the largest training step's batch tensors plus activations saved for backward
   (hiertcn_fast.train.DataMemoryMeter), and on a GPU the device peak. Measured on ml-100k (short
   histories: 33 events per user on average, fewer than one lane batch's 10 sessions) and on a
   synthetic log in the paper's regime (users of 10..500 events, ~300 on average, the XING filters).
3. HierTCN on the fused kernels (the default backend) against backend='reference' (plain PyTorch)
   (goal >= 2x on the CPU).
4. On a GPU: HierTCN's events/s against the ~222k events/s that would train 1.6 billion
   interactions in under 2 hours.

Every model trains with the same loop (hiertcn_fast.train.Trainer) on ml-100k (the main job's
preprocessing), paper sizes (width 128) unless --dim says otherwise; each model first trains a
warm-up epoch that is not timed, then ``--rounds`` timed epochs, the models taking turns (events/s:
the median over the rounds), so that a change in the machine's load affects all models alike.

    python benchmarks/bench_e2e.py [--quick] [--dim 128] [--rounds 3] [--threads 1] [--out FILE]
                                   [--cpu-conv-blas auto|always|never]   (the cpu conv's route: ops.set_cpu_conv_blas)
    python -m pytest benchmarks/bench_e2e.py       (the quick run, as a test)
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
# The source tree's hiertcn_fast (built in place), not whichever copy is installed.
sys.path[:0] = [BENCH_DIR, os.path.dirname(BENCH_DIR)]

import harness  # noqa: E402

from hiertcn_fast.cli import MODEL_SIZES  # noqa: E402
from hiertcn_fast import _extension  # noqa: E402
from hiertcn_fast.ops.conv import CPU_CONV_BLAS_MODES, cpu_conv_blas, set_cpu_conv_blas  # noqa: E402
from hiertcn_fast.data import PreprocessParams, SyntheticSource, load_dataset, preprocess  # noqa: E402
from hiertcn_fast.rule_report import ML100K_PARAMS  # noqa: E402
from hiertcn_fast.train import TrainConfig, Trainer, build_model, default_device  # noqa: E402

PINTEREST_EVENTS_PER_SECOND = 1.6e9 / (2 * 3600)  # 1.6 B interactions in 2 hours: ~222k events/s
# (label, model name, backend)
RUNS = [("hiertcn", "hiertcn", None), ("hiertcn (reference)", "hiertcn", "reference"), ("hrnn", "hrnn", None),
        ("hiergru", "hiergru", None), ("session_gru", "session_gru", None), ("history_tcn", "history_tcn", None)]


# Long histories as in the paper's data: XING's user filter (10..500 events), 30 min sessions of <= 20.
LONG_HISTORY_PARAMS = PreprocessParams(min_item_count=5, min_user_count=10, max_user_count=500, split="cold")


def long_history_cache(directory):
    source = SyntheticSource(150_000, num_items=3000, num_topics=30, mean_events_per_user=300.0, seed=0)
    return preprocess(source, directory, LONG_HISTORY_PARAMS)


def trained_one_epoch(cache, name, backend, dim, device, lanes) -> Trainer:
    model = build_model(name, cache.num_items, seed=0, backend=backend, **MODEL_SIZES[name](dim))
    return Trainer(model, cache, TrainConfig(epochs=1, lanes=lanes, device=str(device), learning_rate=1e-3),
                   name=name, out=None).train()


def data_memory(cache, name, dim, device, lanes) -> dict:
    """One untimed epoch: the data memory (and device peak) of the largest step."""
    trainer = trained_one_epoch(cache, name, None, dim, device, lanes)
    return {"data_memory_bytes": trainer.memory.peak_bytes,
            "device_peak_bytes": trainer.peak_memory_bytes if device.type == "cuda" else None,
            "events": trainer.train_events}


def make_trainer(cache, name, backend, dim, device, lanes) -> Trainer:
    """A trainer for one model that has run its warm-up epoch (allocator, kernels, threads), untimed."""
    trainer = trained_one_epoch(cache, name, backend, dim, device, lanes)
    trainer.memory.peak_bytes = 0
    return trainer


def timed_epoch(trainer, device) -> float:
    """Train one more epoch; its events/s."""
    events, seconds = trainer.train_events, trainer.train_seconds
    trainer.config.epochs += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    trainer.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (trainer.train_events - events) / (trainer.train_seconds - seconds)


def measure_all(cache, runs, dim, rounds, device, lanes) -> dict:
    """Events/s of every run, as the median over ``rounds`` rounds in which each model trains one epoch
    in turn: a machine whose load changes affects all models alike."""
    trainers = {label: make_trainer(cache, name, backend, dim, device, lanes) for label, name, backend in runs}
    if device.type == "cuda":
        for trainer in trainers.values():
            trainer.train_seconds = 0.0
    rates = {label: [] for label in trainers}
    # The device peak is the process's (torch.cuda.max_memory_allocated), reset at each train(): read after each
    # model's own epoch, not once at the end (which gave every model the last one's).
    device_peaks = {label: None for label in trainers}
    labels = list(trainers)
    for round_index in range(rounds):
        # Each round starts one model later (as the harness rotates its variants): no model always runs first, on
        # a machine still warming up, or last.
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            trainer = trainers[label]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rates[label].append(timed_epoch(trainer, device))
            if device.type == "cuda":
                device_peaks[label] = max(device_peaks[label] or 0, trainer.peak_memory_bytes)
    return {label: {"events_per_second": statistics.median(rates[label]), "events_per_second_rounds": rates[label],
                    "data_memory_bytes": trainer.memory.peak_bytes,
                    "device_peak_bytes": device_peaks[label],
                    "parameters": sum(p.numel() for p in trainer.model.parameters())}
            for label, trainer in trainers.items()}


def run(dim=128, rounds=3, threads=1, device=None, quick=False, out=None, lanes=32, cpu_conv_blas=None) -> dict:
    # The thread count and the conv route are restored on return: under pytest the benchmark files after this one
    # (bench_gru, bench_gru_gates) would otherwise run on this run's one thread.
    # set_cpu_conv_blas refuses a bad mode (ValueError) before anything is changed.
    previous_route = set_cpu_conv_blas(cpu_conv_blas) if cpu_conv_blas is not None else None
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(dim, rounds, device, quick, out, lanes)
    finally:
        torch.set_num_threads(previous)
        if previous_route is not None:
            set_cpu_conv_blas(previous_route)


def _conv_route() -> dict:
    """The cpu conv's route in this run (None without the compiled extension, which then runs no cpu kernel)."""
    return cpu_conv_blas() if _extension.loaded() else None


def _run(dim, rounds, device, quick, out, lanes) -> dict:
    device = default_device(device)
    cache = preprocess(load_dataset("ml-100k"), os.path.join(tempfile.gettempdir(), "hiertcn_fast_cache"),
                       ML100K_PARAMS)
    runs = [run for run in RUNS if not quick or run[0] in ("hiertcn", "hiertcn (reference)", "hrnn", "history_tcn")]
    results = measure_all(cache, runs, dim, rounds, device, lanes)
    for label, result in results.items():
        print(f"{label:<22} {result['events_per_second']:>10,.0f} events/s (median of {rounds} epochs)   "
              f"data memory {result['data_memory_bytes'] / 2**20:8.1f} MiB", flush=True)
    hiertcn = results["hiertcn"]
    ratios = {f"events/s hiertcn / {other}": hiertcn["events_per_second"] / results[other]["events_per_second"]
              for other in ("hrnn", "hiergru", "session_gru", "hiertcn (reference)") if other in results}
    ratios["data memory saved vs history_tcn (ml-100k)"] = 1 - hiertcn["data_memory_bytes"] / results[
        "history_tcn"]["data_memory_bytes"]
    long_cache = long_history_cache(os.path.join(tempfile.gettempdir(), "hiertcn_fast_cache"))
    counts = long_cache.manifest["counts"]
    long_history = {"data": f"synthetic, {long_cache.num_events} events, {long_cache.num_users} users "
                            f"({counts['events'] / counts['users']:.0f} events per user), {long_cache.num_items} items"}
    for name in ("hiertcn", "history_tcn"):
        long_history[name] = data_memory(long_cache, name, dim, device, lanes)
        print(f"{name:<22} long histories: data memory {long_history[name]['data_memory_bytes'] / 2**20:8.1f} MiB",
              flush=True)
    ratios["data memory saved vs history_tcn (long histories)"] = (
        1 - long_history["hiertcn"]["data_memory_bytes"] / long_history["history_tcn"]["data_memory_bytes"])
    if device.type == "cuda":
        ratios["device peak saved vs history_tcn (long histories)"] = (
            1 - long_history["hiertcn"]["device_peak_bytes"] / long_history["history_tcn"]["device_peak_bytes"])
        ratios["hiertcn events/s / 222k (1.6 B events in 2 h)"] = (hiertcn["events_per_second"]
                                                                   / PINTEREST_EVENTS_PER_SECOND)
    for key, value in ratios.items():
        print(f"{key:<48} {value:8.3f}")
    document = {"benchmark": "bench_e2e", "data": "ml-100k", "dim": dim, "timed_rounds": rounds, "lanes": lanes,
                "sessions_per_batch": 10, "device": str(device), "threads": torch.get_num_threads(),
                "cpu_conv_blas": _conv_route(),
                "machine": harness.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv), "models": results, "long_history_memory": long_history, "ratios": ratios,
                "memory_means": "data memory: the largest training step's batch tensors plus the activations "
                                "saved for backward (parameters excluded)"}
    out = out or os.path.join(harness.RESULTS_DIR, "bench_e2e.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=1)
    print(f"results: {out}")
    return document


def test_bench_e2e(tmp_path):
    document = run(dim=32, rounds=1, quick=True, out=str(tmp_path / "bench_e2e.json"))
    assert document["models"]["hiertcn"]["events_per_second"] > 0
    assert 0 < document["ratios"]["data memory saved vs history_tcn (long histories)"] < 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=128, help="model width (paper: 128)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed epochs per model, taken in turns (events/s: the median); after one warm-up epoch")
    parser.add_argument("--lanes", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true", help="only HierTCN (fused and reference), HRNN, history TCN")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_e2e.json)")
    parser.add_argument("--cpu-conv-blas", choices=CPU_CONV_BLAS_MODES, default=None,
                        help="force the cpu backend's route for big dense convolutions (default: leave it: 'auto', or "
                             "HIERTCN_CPU_CONV_BLAS)")
    args = parser.parse_args(argv)
    run(args.dim, args.rounds, args.threads, args.device, args.quick, args.out, args.lanes, args.cpu_conv_blas)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
