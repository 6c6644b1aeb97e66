"""Command line: ``python -m hiertcn_fast <command>`` (also the ``hiertcn-fast`` console script).

- ``info``: which backends are usable here, and how to fix the others.
- ``train``: the main job. Preprocesses the built-in ml-100k data (cold split by user, or warm by
  time with ``--split-by time``), trains
  HierTCN and the neural baselines with the same loop, evaluates them and the rule baselines on
  every event of the test split against the full catalogue, and writes a report folder
  (report.md, PNG plots, results.json). Uses a GPU when present; under ``torchrun`` the lanes of
  every batch are sharded across the ranks (DistributedDataParallel) and rank 0 writes the report.

  The report folder is created and checked writable before any work (a usage error if it cannot
  be). results.json and report.md are rewritten as the rules and each model finish (the plots at
  the end), so an interrupted or failed job keeps what it finished. A model that fails is reported
  (traceback on stderr, a note in the report) and the job goes on with the others, then exits with
  status 1. An earlier report in the folder is replaced: the job says so first and removes it, so
  no earlier report outlives the job. A session cache that fails its checksums is refused before any training
  (exit status 1, naming the damaged file); ``--rebuild-cache`` replaces it. A model whose parameters, gradients
  and Adam moments alone need more memory than the device has available is not trained: it is reported as failed
  (MemoryError, with the figures) before it is built, and the job goes on with the others.

  Bad arguments are usage errors (exit status 2) before any work and before the report folder is
  made: numbers out of range (``--threads`` above 1024 and ``--producers`` above 64 included), an empty
  ``--out``, an unknown ``--dataset`` or ``--device``, a ``--cache-dir`` that cannot be created or written,
  ``--device cuda`` with no GPU visible, a ``--backend`` (or HIERTCN_BACKEND) that cannot run here or on the
  job's device, and a RANK or WORLD_SIZE (torchrun's) that is not an integer.
"""

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ._ints import SEED_LIMIT

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


def _positive_int(text: str) -> int:
    return _bounded_int(text, 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    return _bounded_int(text, 0, "a non-negative integer")


# Upper bounds of the thread counts: far above any machine's cores, far below what torch.set_num_threads (a C int)
# or the operating system would refuse only after the job had started.
MAX_THREADS = 1024
MAX_PRODUCERS = 64


def _count_up_to(highest: int):
    """An argparse type: a non-negative integer up to ``highest``."""
    return lambda text: _bounded_int(text, 0, f"a non-negative integer up to {highest}", highest=highest)


def _seed(text: str) -> int:
    return _bounded_int(text, 0, "a non-negative integer below 2**63", highest=SEED_LIMIT)


def _bounded_int(text: str, lowest: int, expected: str, highest: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < lowest or (highest is not None and value > highest):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def _device(text: str):
    """A torch.device of type cpu or cuda (whether it is usable here is checked after parsing)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.index is not None and device.index < 0):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return device


def _folder(text: str) -> str:
    """A folder path, ``~`` expanded (a shell leaves ``--out=~/x`` as it is)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a folder path, got {text!r}")
    return os.path.expanduser(text)


def _positive_float(text: str) -> float:
    return _checked_float(text, lambda value: math.isfinite(value) and value > 0, "a positive finite number")


def _probability(text: str) -> float:
    return _checked_float(text, lambda value: 0 <= value < 1, "a number in [0, 1)")


def _checked_float(text: str, valid, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # fails every check below
    if not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


DEFAULT_NUM_SAMPLED = 1024


def _loss_problem(args) -> str | None:
    """--num-sampled goes with --loss sampled (the full softmax samples nothing); its default is filled in here."""
    if args.num_sampled is not None and args.loss != "sampled":
        return f"--num-sampled {args.num_sampled} applies to --loss sampled only (this job's loss is {args.loss})"
    if args.num_sampled is None:
        args.num_sampled = DEFAULT_NUM_SAMPLED
    return None


def _rank_problem() -> str | None:
    """RANK (set by torchrun) must be a non-negative integer: a usage error now, like WORLD_SIZE, not a traceback."""
    text = os.environ.get("RANK", "0")
    try:
        _bounded_int(text, 0, "a non-negative integer")
    except argparse.ArgumentTypeError:
        return f"RANK={text!r}: expected this process's rank, a non-negative integer (torchrun sets it)"
    return None


def _main_rank_by_environment() -> bool:
    """Rank 0 of a torchrun job (or a plain run), known before torch.distributed starts (RANK checked by
    _rank_problem first)."""
    return int(os.environ.get("RANK", "0")) == 0


def _writable_folder(path: str, option: str, what: str, made: list | None = None) -> str | None:
    """Create the folder and prove it writable; the problem, or None. The top-most folder this call makes is
    appended to ``made`` (so that a later usage error can take it back: _remove_made_folders)."""
    try:
        top, parent = None, Path(path).absolute()
        while not parent.exists() and not parent.is_symlink() and parent.parent != parent:
            top, parent = parent, parent.parent
        Path(path).mkdir(parents=True, exist_ok=True)
        if top is not None and made is not None:
            made.append(top)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        return f"{option} {path}: cannot create or write the {what} ({type(error).__name__}: {error.strerror or error})"
    return None


def _remove_made_folders(made: list) -> None:
    """Remove the folders _writable_folder made, where they are still empty (deepest first)."""
    for top in reversed(made):
        for folder, _, _ in os.walk(top, topdown=False):
            try:
                os.rmdir(folder)
            except OSError:
                pass


def _prepare_report_folder(out: str, made: list | None = None) -> tuple[str | None, list[str]]:
    """Create the report folder and prove it writable. Returns (the problem, or None; the report
    files of an earlier run already there)."""
    from .report import REPORT_FILES

    problem = _writable_folder(out, "--out", "report folder", made)
    if problem:
        return problem, []
    # An earlier report's files are replaced: anything else under one of their names (a folder) cannot be.
    blocking = [name for name in REPORT_FILES if (Path(out) / name).exists() and not (Path(out) / name).is_file()]
    if blocking:
        return (f"--out {out}: {', '.join(blocking)} there {'is' if len(blocking) == 1 else 'are'} not a file, and "
                f"the report writes a file of that name; move it or choose another --out"), []
    return None, [name for name in REPORT_FILES if (Path(out) / name).exists()]


def _device_problem(args) -> str | None:
    """Why the job's device or op backend cannot run here (None when they can): checked once, up front,
    rather than failing every model with the same traceback."""
    import torch

    from .backends import ENV_VAR, backends, requested_backend, triton_interpreted

    device = args.device
    if device is not None and device.type == "cuda":
        if not torch.cuda.is_available():
            return (f"--device {device}: no CUDA device is visible here (torch.cuda.is_available() is False); "
                    "use --device cpu, or run on a machine with an NVIDIA GPU and driver")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"--device {device}: only {count} CUDA device(s) visible (cuda:0 to cuda:{count - 1})"
    if args.backend is not None:
        backend, source = args.backend, f"--backend {args.backend}"
    else:
        try:
            backend = requested_backend()
        except ValueError as error:
            return str(error)
        source = f"{ENV_VAR}={backend}"
    if backend == "auto":
        return None
    status = {s.name: s for s in backends()}[backend]
    if not status.available:
        return f"{source}: not available here: {status.detail}" + (f"; fix: {status.fix}" if status.fix else "")
    device_type = device.type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    shown = f"--device {device}" if device is not None else f"the default device {device_type}"
    if backend == "cpu" and device_type != "cpu":
        return f"{source}: it runs on CPU tensors, not on {shown}"
    if backend == "cuda" and device_type != "cuda":
        return f"{source}: it runs on CUDA tensors, not on {shown}"
    if backend == "triton" and device_type != "cuda" and not triton_interpreted():
        return f"{source}: it runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not on {shown}"
    return None


def _dataset_problem(args) -> str | None:
    """Why --dataset cannot be read here: the built-in data sets ship inside the recbole wheel, and a job without
    it failed in a traceback after making its folders."""
    from .data.readers import recbole_example_path

    try:
        recbole_example_path(args.dataset)
    except (ModuleNotFoundError, FileNotFoundError) as error:
        return f"--dataset {args.dataset}: {error}"
    return None


def _lanes_problem(args) -> str | None:
    """Under torchrun (WORLD_SIZE > 1) every rank takes an equal share of the lanes: a count the world size does not
    divide is a usage error now, not a ValueError from every rank's Trainer after the data's preprocessing."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}: expected the number of ranks (torchrun sets it)"
    if world_size > 1 and args.lanes % world_size:
        return (f"--lanes {args.lanes}: the {world_size} ranks (WORLD_SIZE) each take an equal share of the lanes; "
                f"use a multiple of {world_size}")
    return None


TRAINING_BYTES_PER_PARAMETER = 16  # float32 weight, gradient and Adam's two moments


def _available_memory_bytes(device) -> int | None:
    """Memory a model could still take on ``device``: free device memory on a GPU, the kernel's MemAvailable on a
    Linux CPU (None where neither can be read)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _training_memory_problem(name: str, num_items: int, args, device) -> str | None:
    """Why ``name`` at this job's sizes cannot train on ``device``: the least memory its training takes (its
    parameters, built on the meta device, at TRAINING_BYTES_PER_PARAMETER; activations come on top), when that is
    more than is available (for every rank of a job on this host, on a CPU). None when it fits or is not known.

    Checked before the model is built: a model too large for the machine failed in an allocation, or, as Linux
    grants memory before it is touched, was killed by the kernel's out-of-memory killer, with the job and its
    report."""
    import torch

    from .train import build_model

    with torch.device("meta"):
        parameters = sum(p.numel() for p in build_model(name, num_items, dropout=args.dropout,
                                                        **MODEL_SIZES[name](args.dim)).parameters())
    available = _available_memory_bytes(device)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    needed = parameters * TRAINING_BYTES_PER_PARAMETER * ranks_here
    if available is None or needed <= available:
        return None
    per_rank = f" on each of this host's {ranks_here} ranks" if ranks_here > 1 else ""
    return (f"{name} at --dim {args.dim} needs at least {needed / 2**30:.2f} GiB to train: {parameters:,} parameters "
            f"and their gradients and Adam's two moments, {TRAINING_BYTES_PER_PARAMETER} bytes a parameter"
            f"{per_rank}, before any activation; {device} has {available / 2**30:.2f} GiB available. Not trained; a "
            f"smaller --dim fits")


def _model_list(text: str) -> tuple:
    """The names in order, each once: a repeated name would train the same model again and overwrite it."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no model; choose one or more of {','.join(MODEL_SIZES)}")
    unknown = [n for n in names if n not in MODEL_SIZES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown models {unknown} in {text!r}; choose from {','.join(MODEL_SIZES)}")
    return names


def _train(args) -> int:
    import torch

    from .train import default_device

    started = getattr(args, "started", None) or time.perf_counter()
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
        status = _train_and_report(args, device, started, main_rank)
    except BaseException:
        # No barrier here: the other ranks may be inside a collective this rank will never join, and a barrier
        # would hang this rank with them instead of letting it exit, which is what tells torchrun to stop the job.
        if distributed:
            torch.distributed.destroy_process_group()
        raise
    if distributed:  # every rank has finished communicating before any tears the group down
        try:
            torch.distributed.barrier()
        finally:  # also when the barrier fails (another rank gone, Ctrl-C)
            torch.distributed.destroy_process_group()
    return status


def _train_and_report(args, device, started, main_rank) -> int:
    import torch

    from .data import CacheCorruptError, load_dataset, preprocess
    from .report import REPORT_FILES, ModelResult, write_report
    from .rule_report import ML100K_PARAMS, evaluate_rules, format_table, preprocessing_note
    from .backends import requested_backend
    from .train import TrainConfig, Trainer, build_model, evaluate

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if main_rank and getattr(args, "earlier_report", None):
        print(f"--out {args.out}: replacing the earlier report there ({', '.join(args.earlier_report)}); "
              "other files are kept", flush=True)
        # Removed now, not when the first result is written: a job that finishes nothing (every model fails, or
        # it is stopped first; with --no-rules there is nothing before the first model) must not leave the earlier
        # report, whose status reads "complete", looking like its own.
        for name in REPORT_FILES:
            (Path(args.out) / name).unlink(missing_ok=True)
    params = dataclasses.replace(ML100K_PARAMS, split="warm" if args.split_by == "time" else "cold")
    try:
        # Every partition's checksum is checked now (a few milliseconds on ml-100k), so that a damaged cache is
        # refused here with the way out, not found at its first read in the middle of the rules or a model.
        cache = preprocess(load_dataset(args.dataset), args.cache_dir, params, rebuild=args.rebuild_cache,
                           verify="full")
    except CacheCorruptError as error:
        print(f"hiertcn-fast train: {error}\nhiertcn-fast train: the session cache in {args.cache_dir} cannot be "
              f"used; run again with --rebuild-cache to replace it", file=sys.stderr, flush=True)
        return 1
    models = args.models
    print(f"data: {args.dataset}, {cache.num_events} events, {cache.num_users} users, {cache.num_items} items; "
          f"device {device}", flush=True)
    results = evaluate_rules(cache, args.split) if args.rules and main_rank else {}
    config = TrainConfig(epochs=args.epochs, lanes=args.lanes, sessions_per_batch=args.sessions_per_batch,
                         learning_rate=args.lr, seed=args.seed, device=str(device), num_producers=args.producers,
                         log_every=args.log_every, loss=args.loss, num_sampled=args.num_sampled)
    split_counts = cache.manifest["counts"]["splits"]
    failed: dict[str, str] = {}
    not_trained: set[str] = set()  # failed models refused before they were built (too large for the memory)
    backend = requested_backend(args.backend)  # --backend, else HIERTCN_BACKEND, else auto
    if backend == "auto":
        backend = f"auto ({'cuda, triton or reference' if device.type == 'cuda' else 'cpu or reference'} per op)"

    def save(pending, final: bool) -> None:
        """Write what is finished: results.json and report.md now, the plots with the final write."""
        if not results:
            return
        wall = time.perf_counter() - started
        notes = [f"data: {args.dataset}, {cache.num_events} events, {cache.num_users} users, {cache.num_items} "
                 f"items ({cache.params['split']} split, by {args.split_by}; sessions: 30 min gap, truncated to "
                 f"{cache.params['max_session_length']} events)",
                 preprocessing_note(cache),
                 f"evaluated: every event of the {args.split} split ({split_counts[args.split]['events']} events, "
                 f"{split_counts[args.split]['users']} users); trained on train ({split_counts['train']['events']} "
                 f"events){'; rules fitted on train' if args.rules else ''}",
                 f"neural models: width {args.dim}, {args.epochs} epochs, {args.lanes} lanes x "
                 f"{args.sessions_per_batch} sessions per batch, Adam lr {args.lr} divided by 5 at 50% and 75%, "
                 f"gradients clipped at norm {config.grad_clip:g} (not in the paper), "
                 f"dropout {args.dropout}, "
                 f"{'full softmax' if args.loss == 'full' else f'sampled softmax ({args.num_sampled} items, log-q)'}, "
                 f"seed {args.seed}, device {device}, backend {backend}, "
                 f"{torch.get_num_threads()} CPU thread(s)",
                 "every neural model trained once, at this one setting and seed: how the ranking moves over seeds "
                 "and with each model's own setting chosen on the validation split is what "
                 "benchmarks/quality_sweep.py measures",
                 "peak memory: neural models on CPU = data memory (largest step's batch + saved activations); on "
                 "GPU the device peak; rules = peak traced host memory",
                 f"wall time from the command's start to this report (its plots excluded): {wall:.0f} s"
                 f"{'' if final else ' (the job was still running)'}"]
        traced = ", its traceback is in the job's output"
        notes += [f"FAILED: {name} ({error}); it has no row here{'' if name in not_trained else traced}"
                  for name, error in failed.items()]
        # Only the final write, with the plots, is complete: the one after the last model has nothing pending but
        # the plots, and a job stopped while they are drawn must not leave a report that says "complete".
        unfinished = [*pending, *([] if final else ["the plots"])]
        if unfinished:
            notes.append(f"INCOMPLETE: the job is still running (or was stopped); not finished: "
                         f"{', '.join(unfinished)}")
        status = "incomplete" if unfinished else ("failed" if failed else "complete")
        write_report(list(results.values()), args.out, title=f"HierTCN and baselines on {args.dataset}", notes=notes,
                     metadata={"cache_key": cache.key, "params": cache.params, "split": args.split,
                               "argv": args.argv, "wall_seconds": wall, "device": str(device), "backend": backend,
                               "world_size": int(os.environ.get("WORLD_SIZE", "1")), "status": status,
                               "models_pending": list(pending), "models_failed": dict(failed)},
                     plots=final)

    if main_rank:
        save(models, final=False)
    for index, name in enumerate(models):
        try:
            problem = _training_memory_problem(name, cache.num_items, args, device)
            if distributed:  # every rank decides alike, or one would wait for the others in a collective for ever
                flag = torch.tensor([problem is not None], dtype=torch.int32, device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                if flag.item() and problem is None:
                    problem = f"{name}: another rank of this job has too little memory to train it"
            if problem:
                not_trained.add(name)
                raise MemoryError(problem)
            model = build_model(name, cache.num_items, seed=args.seed, dropout=args.dropout, backend=args.backend,
                                **MODEL_SIZES[name](args.dim))
            trainer = Trainer(model, cache, config, name=name, out=sys.stdout).train()
            if main_rank:
                eval_started = time.perf_counter()
                quality = evaluate(model, cache, args.split, config)
                eval_seconds = time.perf_counter() - eval_started
        except Exception as error:
            # Ranks of a distributed job must fail together; a single process goes on with the next model. A
            # closed stdout (the job piped into `head`) is no model's failure: the job stops.
            if distributed or isinstance(error, BrokenPipeError):
                raise
            if name not in not_trained:  # (a refusal's message says it all)
                traceback.print_exc()
            message = " ".join(str(error).split())  # one line: it goes into a markdown list
            failed[name] = f"{type(error).__name__}: {message[:300]}{'...' if len(message) > 300 else ''}"
            print(f"[{name}] FAILED ({failed[name]}); going on with the other models", file=sys.stderr, flush=True)
        else:
            if not main_rank:
                continue
            parameters = sum(p.numel() for p in model.parameters())
            results[name] = ModelResult(
                name, quality, training_curve=trainer.curve, events_per_second=trainer.events_per_second,
                peak_memory_bytes=trainer.peak_memory_bytes,
                extra={"train_seconds": trainer.train_seconds, "evaluate_seconds": eval_seconds,
                       "train_events": trainer.train_events, "parameters": parameters,
                       "events_per_second_means": "training events (targets) per second of the training loop",
                       "peak_memory_means": trainer.memory_kind})
            per_user = quality["per_user"]["all"]
            print(f"[{name}] {args.split} Recall@10 {per_user['Recall@10']:.4f} MRR {per_user['MRR']:.4f} (per user); "
                  f"{trainer.train_seconds:.0f} s training, {parameters:,} parameters", flush=True)
        if main_rank:
            save(models[index + 1:], final=False)
    if not main_rank:
        return 0
    wall = time.perf_counter() - started
    if not results:
        print(f"no model finished, so nothing was written to {args.out}", file=sys.stderr)
        return 1
    save((), final=True)
    print(format_table(results, "per_user"))
    print(format_table(results, "per_event"))
    print(f"report: {os.path.join(args.out, 'report.md')} ({wall:.0f} s)")
    if failed:
        print(f"FAILED: {', '.join(failed)} (see above); the report holds the other models", file=sys.stderr)
        return 1
    return 0


def _process_age() -> float | None:
    """Seconds since this process started, from Linux's /proc (None elsewhere, or if unreadable)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            # Field 22, starttime, in clock ticks after boot; the fields after the command's ")" start at field 3.
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            since_boot = float(uptime.read().split()[0])
        return max(0.0, since_boot - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def main(argv=None) -> int:
    # The job's wall time counts from the command's start: run as a command (argv from sys.argv: `python -m
    # hiertcn_fast`, the hiertcn-fast script), from the process's start, so that importing torch, the extension and
    # this package counts too (they ran before this line); called with argv, from here.
    age = _process_age() if argv is None else None
    started = time.perf_counter() - (age or 0.0)
    from .data.readers import BUILTIN_DATASETS

    from . import __version__

    parser = argparse.ArgumentParser(prog="hiertcn-fast", description="HierTCN and its baselines: train, evaluate and "
                                                                        "report on a built-in data set (train); which "
                                                                        "op backends work here (info)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="which backends are usable here, and how to fix the others").set_defaults(
        run=_info)
    train = commands.add_parser("train", help="train and evaluate HierTCN and the baselines on ml-100k; "
                                              "write a report folder")
    train.add_argument("--out", type=_folder, default="reports/ml-100k",
                       help="report folder (default: %(default)s). Created and checked writable before any work. "
                            "results.json and report.md are rewritten as each model finishes, the plots at the end; "
                            "a model that fails is noted there, the others go on, and the job exits with status 1. "
                            "An earlier report there (report.md, results.json, the plots) is replaced: the job "
                            "says so when it starts and removes it then; other files in the folder are kept")
    train.add_argument("--dataset", default="ml-100k", choices=BUILTIN_DATASETS,
                       help="built-in data set (default: %(default)s)")
    train.add_argument("--cache-dir", type=_folder, default=os.path.join(tempfile.gettempdir(), "hiertcn_fast_cache"),
                       help="session cache folder (default: %(default)s); created and checked writable before any "
                            "work")
    train.add_argument("--rebuild-cache", action="store_true",
                       help="rebuild the session cache even if one is there (a damaged cache is refused with exit "
                            "status 1 and this advice; the old cache stays until the new one is built)")
    train.add_argument("--models", type=_model_list, default=DEFAULT_MODELS,
                       help=f"comma-separated neural models, trained in that order; duplicates are dropped "
                            f"(default: {','.join(DEFAULT_MODELS)})")
    train.add_argument("--no-rules", dest="rules", action="store_false", help="skip the rule baselines")
    train.add_argument("--split", default="test", choices=("valid", "test"), help="evaluated split")
    train.add_argument("--split-by", default="user", choices=("user", "time"),
                       help="cold start: users 80/10/10 (default); warm start: sessions by time at 80%%/90%%")
    train.add_argument("--epochs", type=_positive_int, default=15, help="training epochs (default: %(default)s)")
    train.add_argument("--dim", type=_positive_int, default=64,
                       help="embedding / hidden / channel width (default: %(default)s; paper: 128)")
    train.add_argument("--lr", type=_positive_float, default=1e-2,
                       help="Adam learning rate (default: %(default)s; paper: 1e-2)")
    train.add_argument("--dropout", type=_probability, default=0.3,
                       help="dropout in [0, 1) on the low-level input and the output layer input (ml-100k is small)")
    train.add_argument("--loss", default="full", choices=("full", "sampled"),
                       help="full softmax over all items (default) or sampled softmax with log-q correction")
    train.add_argument("--num-sampled", type=_positive_int, default=None,
                       help=f"items sampled per batch with --loss sampled (default: {DEFAULT_NUM_SAMPLED}); "
                            f"refused with --loss full, where it would do nothing")
    train.add_argument("--lanes", type=_positive_int, default=32,
                       help="lanes (batch rows), each a queue of users' sessions (default: %(default)s; paper: 32); "
                            "under torchrun a multiple of the world size")
    train.add_argument("--sessions-per-batch", type=_positive_int, default=10,
                       help="sessions each lane contributes to a batch (default: %(default)s; paper: 10)")
    train.add_argument("--producers", type=_count_up_to(MAX_PRODUCERS), default=1,
                       help=f"batch producer threads of the ring queue, at most {MAX_PRODUCERS} (0: build batches "
                            f"in the training thread; default: %(default)s)")
    train.add_argument("--seed", type=_seed, default=0, help="random seed, below 2**63 (default: %(default)s)")
    train.add_argument("--device", type=_device, default=None,
                       help="cpu, cuda or cuda:N (default: cuda when present); cuda with no GPU visible is a usage "
                            "error")
    train.add_argument("--threads", type=_count_up_to(MAX_THREADS), default=1,
                       help=f"torch CPU threads, at most {MAX_THREADS} (default 1: these small models run several "
                            f"times faster on one thread than on two busy cores; 0: torch's default)")
    train.add_argument("--backend", default=None, choices=("cuda", "triton", "cpu", "reference"),
                       help="op backend of the neural models (default: the usual automatic selection, or "
                            "HIERTCN_BACKEND); one that cannot run here or on the job's device is a usage error")
    train.add_argument("--log-every", type=_non_negative_int, default=0,
                       help="progress every N steps (0: once per epoch)")
    train.set_defaults(run=_train)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what this job was asked, as given
    args.started = started
    if args.command == "train":
        # Every check that can fail comes before the folders are made, and a folder made for a job that a later
        # check refuses is removed again, so a usage error leaves nothing behind.
        made = []
        problem = (_device_problem(args) or _lanes_problem(args) or _loss_problem(args) or _rank_problem()
                   or _dataset_problem(args) or _writable_folder(args.cache_dir, "--cache-dir", "cache folder", made))
        if not problem and _main_rank_by_environment():
            problem, args.earlier_report = _prepare_report_folder(args.out, made)
        if problem:
            _remove_made_folders(made)
            train.error(problem)
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader of stdout went away (`... | head`): stop quietly, as command-line tools do, and keep Python
        # from failing again when it flushes stdout at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, sys.stdout.fileno())
            finally:
                os.close(devnull)  # (stdout has its own descriptor of it now)
        except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor
            pass
        return 1


if __name__ == "__main__":
    sys.exit(main())
