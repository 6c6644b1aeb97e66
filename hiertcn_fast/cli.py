"""Command line: ``python -m hiertcn_fast <command>`` (also the ``hiertcn-fast`` console script).

- ``info``: which backends are usable here, and how to fix the others.
- ``train``: the main job. Preprocesses the built-in ml-100k data (cold split by user, or warm by
  time with ``--split-by time``), trains
  HierTCN and the neural baselines with the same loop, evaluates them and the rule baselines on
  every event of the test split against the full catalogue, and writes a report folder
  (report.md, PNG plots, results.json). Uses a GPU when present; under ``torchrun`` the lanes of
  every batch are sharded across the ranks (DistributedDataParallel) and rank 0 writes the report.
"""

import argparse
import dataclasses
import os
import sys
import tempfile
import time

# Sizes of each model from one width ``d`` (the paper's 128 by default): embeddings, GRU states and
# TCN channels all d; HierTCN's high-level GRU has two layers (state 2d), as in the paper.
MODEL_SIZES = {
    "hiertcn": lambda d: dict(embedding_dim=d, state_hidden=d, tcn_channels=(d, d)),
    "hrnn": lambda d: dict(embedding_dim=d, user_hidden=d, session_hidden=d),
    "hiergru": lambda d: dict(embedding_dim=d, state_hidden=d, session_hidden=d),
    "session_gru": lambda d: dict(embedding_dim=d, hidden=d),
    "history_tcn": lambda d: dict(embedding_dim=d, channels=(d, d, d, d)),
}
DEFAULT_MODELS = tuple(MODEL_SIZES)


def _info(args) -> int:
    from .backends import describe

    print(describe())
    return 0


def _model_list(text: str) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in MODEL_SIZES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown models {unknown}; choose from {','.join(MODEL_SIZES)}")
    return names


def _train(args) -> int:
    import torch

    from .train import default_device

    started = time.perf_counter()
    device = default_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Under torchrun every rank trains its shard of the lanes; rank 0 alone evaluates and reports.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_rank = not distributed or torch.distributed.get_rank() == 0
    try:
        return _train_and_report(args, device, started, main_rank)
    finally:
        if distributed:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _train_and_report(args, device, started, main_rank) -> int:
    import torch

    from .data import load_dataset, preprocess
    from .report import ModelResult, write_report
    from .rule_report import ML100K_PARAMS, evaluate_rules, format_table
    from .train import TrainConfig, Trainer, build_model, evaluate

    params = dataclasses.replace(ML100K_PARAMS, split="warm" if args.split_by == "time" else "cold")
    cache = preprocess(load_dataset(args.dataset), args.cache_dir, params)
    models = args.models
    print(f"data: {args.dataset}, {cache.num_events} events, {cache.num_users} users, {cache.num_items} items; "
          f"device {device}", flush=True)
    results = evaluate_rules(cache, args.split) if args.rules and main_rank else {}
    config = TrainConfig(epochs=args.epochs, lanes=args.lanes, sessions_per_batch=args.sessions_per_batch,
                         learning_rate=args.lr, seed=args.seed, device=str(device), num_producers=args.producers,
                         log_every=args.log_every, loss=args.loss, num_sampled=args.num_sampled)
    for name in models:
        model = build_model(name, cache.num_items, seed=args.seed, dropout=args.dropout, backend=args.backend,
                            **MODEL_SIZES[name](args.dim))
        trainer = Trainer(model, cache, config, name=name).train()
        if not main_rank:
            continue
        eval_started = time.perf_counter()
        quality = evaluate(model, cache, args.split, config)
        eval_seconds = time.perf_counter() - eval_started
        parameters = sum(p.numel() for p in model.parameters())
        results[name] = ModelResult(
            name, quality, training_curve=trainer.curve, events_per_second=trainer.events_per_second,
            peak_memory_bytes=trainer.peak_memory_bytes,
            extra={"train_seconds": trainer.train_seconds, "evaluate_seconds": eval_seconds,
                   "train_events": trainer.train_events, "parameters": parameters,
                   "events_per_second_means": "training events (targets) per second of the training loop",
                   "peak_memory_means": trainer.memory_kind})
        per_user = quality["per_user"]["all"]
        print(f"[{name}] test Recall@10 {per_user['Recall@10']:.4f} MRR {per_user['MRR']:.4f} (per user); "
              f"{trainer.train_seconds:.0f} s training, {parameters:,} parameters", flush=True)
    if not main_rank:
        return 0
    split_counts = cache.manifest["counts"]["splits"]
    wall = time.perf_counter() - started
    notes = [f"data: {args.dataset}, {cache.num_events} events, {cache.num_users} users, {cache.num_items} items "
             f"({cache.params['split']} split, by {args.split_by}; sessions: 30 min gap, truncated to "
             f"{cache.params['max_session_length']} events)",
             f"evaluated: every event of the {args.split} split ({split_counts[args.split]['events']} events, "
             f"{split_counts[args.split]['users']} users); trained on train ({split_counts['train']['events']} "
             f"events); rules fitted on train",
             f"neural models: width {args.dim}, {args.epochs} epochs, {args.lanes} lanes x {args.sessions_per_batch} "
             f"sessions per batch, Adam lr {args.lr} divided by 5 at 50% and 75%, dropout {args.dropout}, "
             f"{'full softmax' if args.loss == 'full' else f'sampled softmax ({args.num_sampled} items, log-q)'}, "
             f"seed {args.seed}, device {device}, backend {args.backend or 'auto'}, "
             f"{torch.get_num_threads()} CPU thread(s)",
             "peak memory: neural models on CPU = data memory (largest step's batch + saved activations); on GPU "
             "the device peak; rules = peak traced host memory",
             f"wall time of the whole job: {wall:.0f} s"]
    write_report(list(results.values()), args.out, title=f"HierTCN and baselines on {args.dataset}", notes=notes,
                 metadata={"cache_key": cache.key, "params": cache.params, "split": args.split,
                           "argv": sys.argv[1:], "wall_seconds": wall, "device": str(device),
                           "world_size": int(os.environ.get("WORLD_SIZE", "1"))})
    print(format_table(results, "per_user"))
    print(format_table(results, "per_event"))
    print(f"report: {os.path.join(args.out, 'report.md')} ({wall:.0f} s)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hiertcn-fast", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="which backends are usable here, and how to fix the others").set_defaults(
        run=_info)
    train = commands.add_parser("train", help="train and evaluate HierTCN and the baselines on ml-100k; "
                                              "write a report folder")
    train.add_argument("--out", default="reports/ml-100k", help="report folder (default: %(default)s)")
    train.add_argument("--dataset", default="ml-100k", help="built-in data set (default: %(default)s)")
    train.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "hiertcn_fast_cache"),
                       help="session cache folder (default: %(default)s)")
    train.add_argument("--models", type=_model_list, default=DEFAULT_MODELS,
                       help=f"comma-separated neural models (default: {','.join(DEFAULT_MODELS)})")
    train.add_argument("--no-rules", dest="rules", action="store_false", help="skip the rule baselines")
    train.add_argument("--split", default="test", choices=("valid", "test"), help="evaluated split")
    train.add_argument("--split-by", default="user", choices=("user", "time"),
                       help="cold start: users 80/10/10 (default); warm start: sessions by time at 80%%/90%%")
    train.add_argument("--epochs", type=int, default=15)
    train.add_argument("--dim", type=int, default=64, help="embedding / hidden / channel width (paper: 128)")
    train.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (paper: 1e-2)")
    train.add_argument("--dropout", type=float, default=0.3,
                       help="dropout on the low-level input and the output layer input (ml-100k is small)")
    train.add_argument("--loss", default="full", choices=("full", "sampled"),
                       help="full softmax over all items (default) or sampled softmax with log-q correction")
    train.add_argument("--num-sampled", type=int, default=1024, help="items sampled per batch with --loss sampled")
    train.add_argument("--lanes", type=int, default=32)
    train.add_argument("--sessions-per-batch", type=int, default=10)
    train.add_argument("--producers", type=int, default=1, help="batch producer threads of the ring queue")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    train.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (default 1: these small models run several times faster on one "
                            "thread than on two busy cores; 0: torch's default)")
    train.add_argument("--backend", default=None, choices=("cuda", "triton", "cpu", "reference"),
                       help="op backend of the neural models (default: the usual automatic selection)")
    train.add_argument("--log-every", type=int, default=0, help="progress every N steps (0: once per epoch)")
    train.set_defaults(run=_train)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
