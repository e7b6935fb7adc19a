"""Markdown tables from the JSON files the benchmark scripts write (for doc/benchmarks.md).

    python benchmarks/report.py benchmarks/results/h100
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(rows: list[dict]) -> str:
    lines = ["| variant | median ms | min ms | × baseline | baseline | peak GiB | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"**{r['ratio']:.3f}×**" if r["ratio"] == r["ratio"] else "—"
        lines.append(
            f"| `{r['variant']}` | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {ratio} | {r['baseline'] or '—'} | "
            f"{r['peak_gib']:.2f} | {r['note']} |"
        )
    return "\n".join(lines)


def is_timing_table(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) and "median_ms" in r for r in value)


def main() -> None:
    for path in sorted(Path(sys.argv[1]).glob("*.json")):
        data = json.loads(path.read_text())
        env = data.pop("env")
        print(f"#### `{path.stem}` — {env['card']}, torch {env['torch']}, transformers {env['transformers']}\n")
        for key, value in data.items():  # timing tables as tables, everything else (parity, results) as written
            print(f"{key}:\n\n{table(value)}\n" if is_timing_table(value) else f"{key}: {value}\n")


if __name__ == "__main__":
    main()
