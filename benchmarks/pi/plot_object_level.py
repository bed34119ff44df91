"""One plot of time per iteration against n_groups from several runs of bench_object_level.py.

Rows are merged by (n_groups, mode), a later file's row replacing an earlier one's; the title names each
file's device, date and source digest. Run: ``python3 benchmarks/pi/plot_object_level.py a.json b.json --out c.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_object_level import plot_rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSON files written by bench_object_level.py")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    merged, sources = {}, []
    for path in args.runs:
        with open(path) as f:
            record = json.load(f)
        for row in record["rows"]:
            merged[(row["n_groups"], row["mode"])] = row
        sources.append(f"{record['device']} {record['date'][:10]}, source digest {record['also_fused_source'][:7]}")
    batches = sorted({row["batch"] for row in merged.values()})
    title = f"weighted_loss + step, batch {'/'.join(map(str, batches))}\n" + "; ".join(sorted(set(sources)))
    plot_rows(list(merged.values()), title, args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
