"""Timing harness shared by the benchmark scripts: CUDA events, warm-up, interleaved rounds, median, peak memory."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Row:
    variant: str
    median_ms: float
    min_ms: float
    peak_gib: float
    ratio: float = float("nan")  # median / baseline median
    baseline: str = ""
    note: str = ""


def time_variants(
    variants: dict[str, Callable[[], object]],
    baselines: dict[str, str],
    rounds: int = 20,
    warmup: int = 3,
) -> list[Row]:
    """Time every variant ``rounds`` times, interleaved (variant order rotates each round), after ``warmup`` calls.

    ``baselines[variant]`` names the variant it is compared with (its ratio is median / baseline median).
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            variants[name]()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    peaks = {}
    for name, fn in variants.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30
    rows = [Row(n, statistics.median(t), min(t), peaks[n]) for n, t in times.items()]
    by_name = {row.variant: row for row in rows}
    for row in rows:
        base = baselines.get(row.variant)
        if base:
            row.baseline = base
            row.ratio = row.median_ms / by_name[base].median_ms
    return rows


def run_once(variants: dict[str, Callable[[], object]], baselines: dict[str, str], rounds: int = 1) -> list[Row]:
    """CPU smoke: every variant once, wall clock, no peak memory; checks that each runs, measures nothing."""
    rows = []
    for variant, fn in variants.items():
        start = time.perf_counter()
        fn()
        elapsed = (time.perf_counter() - start) * 1e3
        rows.append(Row(variant, elapsed, elapsed, float("nan")))
    by_name = {row.variant: row for row in rows}
    for row in rows:
        if row.variant in baselines:
            row.baseline = baselines[row.variant]
            row.ratio = row.median_ms / by_name[row.baseline].median_ms
    return rows


def add_peer_ratios(rows: list[Row], peer_rows: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Hooked median ÷ peer median for the same task (same rounds), into each hooked row's note and a dict for JSON.

    ``peer_rows`` maps a hooked row to the peer rows doing the same task; rows absent from this run are skipped.
    """
    by_name = {row.variant: row for row in rows}
    ratios: dict[str, dict[str, float]] = {}
    for hooked, peers in peer_rows.items():
        found = [p for p in peers if p in by_name and hooked in by_name]
        if not found:
            continue
        ratios[hooked] = {p: by_name[hooked].median_ms / by_name[p].median_ms for p in found}
        note = "; ".join(f"{ratios[hooked][p]:.3f}× of `{p}`" for p in found)
        by_name[hooked].note = f"{by_name[hooked].note}; {note}" if by_name[hooked].note else note
    return ratios


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of the peer packages a run used (absent ones left out)."""
    out = {}
    for package in packages:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def environment() -> dict[str, str]:
    import transformers

    return {
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def markdown(title: str, rows: list[Row], extra: str = "") -> str:
    lines = [f"### {title}", "", extra, "", "| variant | median ms | min ms | × baseline | baseline | peak GiB | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"**{r.ratio:.3f}×**" if r.ratio == r.ratio else "—"
        lines.append(f"| `{r.variant}` | {r.median_ms:.2f} | {r.min_ms:.2f} | {ratio} | {r.baseline or '—'} | {r.peak_gib:.2f} | {r.note} |")
    return "\n".join(lines) + "\n"


def save(name: str, payload: dict) -> None:
    out = os.environ.get("OUT", "out/benchmarks")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump({k: ([asdict(r) for r in v] if isinstance(v, list) else v) for k, v in payload.items()}, f, indent=1)
