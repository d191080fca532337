"""Prints benchmark records (JSON files written by `python -m pydeepep.bench --output`) side by side: one line per case
(name, N, SMs), one column per record. A time is the slowest rank's median in µs, as the bench prints a single record;
the SM-push ceiling is rank 0's GB/s. tests/time_variants.sh prints its variants this way.

Usage: python tests/compare_records.py [NAME=]RECORD.json ...   (a record without NAME= is named by its file name)
"""

import json
import os
import sys


def load(path: str) -> dict:
    """{(case, N, SMs): value} of one record, in the order the bench ran the cases."""
    with open(path) as f:
        per_rank = json.load(f)["results"]
    values = {}
    for rows in per_rank:
        for row in rows:
            key = (row["case"], row["num_tokens"], row["sms"])
            if "us" in row:
                values[key] = max(values.get(key, 0.0), row["us"])
            elif "gbps" in row:
                values.setdefault(key, row["gbps"])
    return values


def table(named: list) -> str:
    """The lines comparing [(name, values)], cases in the order they first appear."""
    keys = []
    for _, values in named:
        keys += [key for key in values if key not in keys]
    width = max([9] + [len(name) + 1 for name, _ in named])
    lines = [f"{'case':<25}{'N':>7}{'SMs':>5}" + "".join(f"{name:>{width}}" for name, _ in named)]
    for case, tokens, sms in keys:
        cells = []
        for _, values in named:
            value = values.get((case, tokens, sms))
            cells.append(f"{'-' if value is None else f'{value:.1f}':>{width}}")
        unit = " GB/s" if case == "ceiling_push" else ""
        lines.append(f"{case:<25}{tokens:>7}{sms or '':>5}" + "".join(cells) + unit)
    return "\n".join(lines)


def main(argv: list) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    named = []
    for spec in argv:
        name, path = spec.split("=", 1) if "=" in spec else (os.path.splitext(os.path.basename(spec))[0], spec)
        named.append((name, load(path)))
    print(table(named))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
