"""How much of the models' ranking on ml-100k is tuning and seed, and how much is the model.

The main job (`python -m hiertcn_fast train`) trains every neural model once, with one setting
(Adam lr 1e-2, dropout 0.3) and one seed, and evaluates it on the test split. Its gaps in Recall@10
are inside one standard error of the evaluation sample, and they may also be inside the spread of
training seeds, or come from a setting that suits one model better than another. This script
measures both, the same way for every model:

1. Selection, on the VALIDATION split (never the test split): every neural model is trained with
   every (learning rate, dropout) of the grid at each selection seed (seeds that no test run uses:
   a setting is not tested from the initialisations it was chosen on), and the setting with the best
   per-user Recall@10 on the validation users, averaged over those seeds, is kept for that model
   (the mean MRR breaks exact ties). One seed is not enough: the settings' differences on 95
   validation users are often smaller than the spread between seeds.
2. Test: every model is trained with its selected setting and with the main job's default setting,
   at each seed, and evaluated on the test split. The table gives the mean and the sample standard
   deviation over the seeds of per-user Recall@10, MRR and NDCG@10 (and per event), and how many
   seeds each model ranked first on per-user Recall@10. The rule baselines (deterministic) are
   evaluated once.

Everything else is the main job's: ml-100k cold split by user, width 64, 15 epochs, 32 lanes x 10
sessions per batch, full softmax, one CPU thread. The split's users are disjoint, so the selection
never sees a test user.

    python benchmarks/quality_sweep.py --out /tmp/quality      # about 25 min on 2 CPU cores

Writes quality.json (every run's figures) and quality.md (the tables) in --out.
"""

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hiertcn_fast.cli import DEFAULT_MODELS, MODEL_SIZES
from hiertcn_fast.data import load_dataset, preprocess
from hiertcn_fast.rule_report import ML100K_PARAMS, evaluate_rules
from hiertcn_fast.train import TrainConfig, Trainer, build_model, evaluate

HEADLINE = ("Recall@10", "MRR", "NDCG@10")
DEFAULT_SETTING = (1e-2, 0.3)  # the main job's --lr and --dropout


def _floats(text: str) -> tuple:
    values = tuple(float(v) for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _ints(text: str) -> tuple:
    values = tuple(int(v) for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def train_and_evaluate(name, cache, split, *, lr, dropout, seed, dim, epochs) -> dict:
    """One model trained on the train split and evaluated on ``split``: the figures this script uses."""
    config = TrainConfig(epochs=epochs, lanes=32, sessions_per_batch=10, learning_rate=lr, seed=seed,
                         device="cpu", num_producers=1, progress_bar=False)
    model = build_model(name, cache.num_items, seed=seed, dropout=dropout, **MODEL_SIZES[name](dim))
    started = time.perf_counter()
    Trainer(model, cache, config, name=name, out=None).train()  # silent: the script prints one line a run
    quality = evaluate(model, cache, split, config)
    return {"model": name, "split": split, "lr": lr, "dropout": dropout, "seed": seed,
            "seconds": time.perf_counter() - started,
            "per_user": {m: quality["per_user"]["all"][m] for m in HEADLINE},
            "per_event": {m: quality["per_event"]["all"][m] for m in HEADLINE},
            "users": quality["per_user"]["all"]["users"], "events": quality["per_event"]["all"]["events"]}


def select(runs: list[dict]) -> dict:
    """The (lr, dropout) whose validation runs have the best mean per-user Recall@10 (then mean MRR), with those
    means."""
    settings = {}
    for run in runs:
        settings.setdefault((run["lr"], run["dropout"]), []).append(run)

    def means(group):
        return {m: statistics.fmean(r["per_user"][m] for r in group) for m in HEADLINE}

    scored = {key: means(group) for key, group in settings.items()}
    best = max(scored, key=lambda key: (scored[key]["Recall@10"], scored[key]["MRR"]))
    return {"model": runs[0]["model"], "lr": best[0], "dropout": best[1], "per_user": scored[best],
            "seeds": sorted(r["seed"] for r in settings[best]), "default": scored.get(DEFAULT_SETTING)}


def summarize(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def markdown(record: dict) -> str:
    lines = [f"# Quality sweep on ml-100k ({record['command']})", "",
             f"Selection on the validation split ({record['valid_users']} users, {record['valid_events']} events) at "
             f"seeds {list(record['selection_seeds'])} (means) over lr {list(record['lrs'])} x dropout {list(record['dropouts'])}; test split "
             f"({record['test_users']} users, {record['test_events']} events) over seeds {list(record['seeds'])}. "
             f"Mean +- sample standard deviation over the seeds; 'wins' = seeds on which the model has the best "
             f"per-user Recall@10 among the neural models of that setting. Wall time {record['seconds']:.0f} s.", ""]
    lines += ["## Selected settings (validation, per-user, means over the selection seeds)", "",
              "| model | lr | dropout | Recall@10 | MRR | default's Recall@10 | default's MRR |", "|---|---|---|---|---|---|---|"]
    for name, chosen in record["selected"].items():
        default = chosen["default"]
        lines.append(f"| {name} | {chosen['lr']:g} | {chosen['dropout']:g} | {chosen['per_user']['Recall@10']:.4f} | "
                     f"{chosen['per_user']['MRR']:.4f} | {default['Recall@10']:.4f} | "
                     f"{default['MRR']:.4f} |")
    for setting in ("default", "selected"):
        lines += ["", f"## Test split, {setting} settings", "",
                  "| model | lr | dropout | per-user Recall@10 | per-user MRR | per-user NDCG@10 | per-event Recall@10 | "
                  "per-event MRR | wins |", "|---|---|---|---|---|---|---|---|---|"]
        for row in record["tables"][setting]:
            cells = [f"{row['mean'][k]:.4f} +- {row['std'][k]:.4f}" for k in
                     ("user Recall@10", "user MRR", "user NDCG@10", "event Recall@10", "event MRR")]
            lines.append(f"| {row['model']} | {row['lr']:g} | {row['dropout']:g} | " + " | ".join(cells)
                         + f" | {row['wins']} |")
        lines += [""]
    lines += ["## Rule baselines (test split, deterministic)", "", "| rule | per-user Recall@10 | per-user MRR |",
              "|---|---|---|"]
    for name, quality in record["rules"].items():
        lines.append(f"| {name} | {quality['Recall@10']:.4f} | {quality['MRR']:.4f} |")
    return "\n".join(lines) + "\n"


def table(runs: list[dict], seeds) -> list[dict]:
    """Per model: mean and std over seeds, and on how many seeds it had the best per-user Recall@10."""
    by_seed = {s: max((r for r in runs if r["seed"] == s), key=lambda r: r["per_user"]["Recall@10"])["model"]
               for s in seeds}
    rows = []
    for name in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == name]
        figures = {f"user {m}": [r["per_user"][m] for r in mine] for m in HEADLINE}
        figures |= {f"event {m}": [r["per_event"][m] for r in mine] for m in HEADLINE}
        stats = {k: summarize(v) for k, v in figures.items()}
        rows.append({"model": name, "lr": mine[0]["lr"], "dropout": mine[0]["dropout"],
                     "mean": {k: v[0] for k, v in stats.items()}, "std": {k: v[1] for k, v in stats.items()},
                     "wins": sum(1 for s in seeds if by_seed[s] == name)})
    return sorted(rows, key=lambda row: -row["mean"]["user Recall@10"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for quality.json and quality.md")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--lrs", type=_floats, default=(3e-3, 1e-2, 3e-2))
    parser.add_argument("--dropouts", type=_floats, default=(0.1, 0.3, 0.5))
    parser.add_argument("--seeds", type=_ints, default=(0, 1, 2, 3, 4), help="training seeds of the test runs")
    parser.add_argument("--selection-seeds", type=_ints, default=(5, 6, 7),
                        help="training seeds of every setting's validation runs (none of them a test seed)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "hiertcn_fast_cache"))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODEL_SIZES]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {','.join(MODEL_SIZES)}")
    shared = sorted(set(args.seeds) & set(args.selection_seeds))
    if shared:
        # A setting chosen on a seed's initialisation and then tested from that same initialisation is measured
        # with the selection's luck in it.
        parser.error(f"--seeds and --selection-seeds must be disjoint; both hold {shared}")
    if DEFAULT_SETTING[0] not in args.lrs or DEFAULT_SETTING[1] not in args.dropouts:
        parser.error(f"the grid must hold the main job's setting lr {DEFAULT_SETTING[0]}, dropout {DEFAULT_SETTING[1]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    started = time.perf_counter()
    cache = preprocess(load_dataset("ml-100k"), args.cache_dir, dataclasses.replace(ML100K_PARAMS, split="cold"))
    common = dict(dim=args.dim, epochs=args.epochs)

    def log(run):
        print(f"{run['split']:5} {run['model']:12} lr {run['lr']:<6g} dropout {run['dropout']:<4g} seed {run['seed']} "
              f"user R@10 {run['per_user']['Recall@10']:.4f} MRR {run['per_user']['MRR']:.4f} "
              f"({run['seconds']:.1f} s)", flush=True)
        return run

    selection_runs = [log(train_and_evaluate(m, cache, "valid", lr=lr, dropout=p, seed=seed, **common))
                      for m in models for lr in args.lrs for p in args.dropouts for seed in args.selection_seeds]
    selected = {m: select([r for r in selection_runs if r["model"] == m]) for m in models}
    test_runs = {"default": [], "selected": []}
    for m in models:
        for seed in args.seeds:
            default = log(train_and_evaluate(m, cache, "test", lr=DEFAULT_SETTING[0], dropout=DEFAULT_SETTING[1],
                                             seed=seed, **common))
            test_runs["default"].append(default)
            lr, p = selected[m]["lr"], selected[m]["dropout"]
            same = (lr, p) == DEFAULT_SETTING  # the same run: training is reproducible on the CPU for a seed
            test_runs["selected"].append(default if same else log(
                train_and_evaluate(m, cache, "test", lr=lr, dropout=p, seed=seed, **common)))
    rules = {name: {m: result.quality["per_user"]["all"][m] for m in HEADLINE}
             for name, result in evaluate_rules(cache, "test").items()}
    counts = cache.manifest["counts"]["splits"]
    record = {"command": "python benchmarks/quality_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "lrs": args.lrs, "dropouts": args.dropouts, "seeds": args.seeds, "selection_seeds": args.selection_seeds, "epochs": args.epochs, "dim": args.dim,
              "valid_users": counts["valid"]["users"], "valid_events": counts["valid"]["events"],
              "test_users": counts["test"]["users"], "test_events": counts["test"]["events"],
              "selection_runs": selection_runs, "selected": selected, "test_runs": test_runs,
              "tables": {k: table(v, args.seeds) for k, v in test_runs.items()}, "rules": rules,
              "seconds": time.perf_counter() - started, "torch": torch.__version__}
    (out / "quality.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    (out / "quality.md").write_text(markdown(record), encoding="utf-8")
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
