"""Print the benchmark JSON files as one table: python benchmarks/summarize.py benchmarks/results/*.json"""

import json
import sys

import harness


def main(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        results = payload.get("results")
        if isinstance(results, list) and all("op" in row for row in results):
            print(f"{path}: {payload.get('date')} {payload.get('machine')}")
            rows.extend(results)
        else:  # a standalone benchmark's own layout (bench_data.py): show it as it is
            print(f"{path}:\n{json.dumps(payload, indent=1, default=str)[:4000]}")
    print(harness.format_table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
