"""Print the benchmark JSON files as one table: python benchmarks/summarize.py benchmarks/results/*.json"""

import json
import sys

import harness


def main(paths):
    """Rows of several files come from different runs (other commits, other loads of the machine): each file is
    listed with a number, shown beside its rows, so that rows of one run are compared with each other only."""
    rows, runs, files = [], [], 0
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        results = payload.get("results")
        if isinstance(results, list) and all("op" in row for row in results):
            files += 1
            print(f"[{files}] {path}: {payload.get('date')} {payload.get('machine')}")
            rows.extend(results)
            runs.extend([f"[{files}]"] * len(results))
        else:  # a standalone benchmark's own layout (bench_data.py): show it as it is
            print(f"{path}:\n{json.dumps(payload, indent=1, default=str)[:4000]}")
    print(harness.format_table(rows, runs if files > 1 else None))


if __name__ == "__main__":
    main(sys.argv[1:])
