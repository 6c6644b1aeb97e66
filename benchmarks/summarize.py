"""Print the benchmark JSON files as one table: python benchmarks/summarize.py benchmarks/results/*.json"""

import json
import sys

import harness


def main(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        print(f"{path}: {payload['date']} {payload['machine']}")
        rows.extend(payload["results"])
    print(harness.format_table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
