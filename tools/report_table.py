"""Rendering evaluation results as a table (rich on a terminal, aligned text otherwise)."""
from __future__ import annotations

import math
import os
import statistics

from rich.console import Console
from rich.table import Table

COLUMNS = ("top1", "many", "medium", "few")


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def results_table(rows: dict[str, dict], title: str) -> Table:
    """rows: label -> evaluation dict (top1, many, medium, few)."""
    table = Table(title=title)
    table.add_column("")
    for c in COLUMNS:
        table.add_column("overall" if c == "top1" else c, justify="right")
    for label, r in rows.items():
        table.add_row(label, *(_fmt(r.get(c)) for c in COLUMNS))
    return table


def mean_std_table(runs: dict[str, list[dict]], title: str) -> Table:
    """runs: label -> evaluations of several seeds; cells are mean ± std (sample std)."""
    table = Table(title=title)
    table.add_column("")
    for c in COLUMNS:
        table.add_column("overall" if c == "top1" else c, justify="right")
    for label, results in runs.items():
        cells = []
        for c in COLUMNS:
            vals = [r[c] for r in results if r.get(c) is not None]
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(_fmt(vals[0]))
            else:
                cells.append(f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}")
        table.add_row(f"{label} (n={len(results)})", *cells)
    return table


def mean_std(results: list[dict]) -> dict:
    """Mean of each column over several seeds' evaluations, and its sample std as `<column>_std`
    (when there are two or more), rounded to 0.01 point."""
    out = {}
    for k in COLUMNS:
        vals = [r[k] for r in results if r.get(k) is not None]
        out[k] = round(statistics.mean(vals), 2) if vals else None
        if len(vals) > 1:
            out[k + "_std"] = round(statistics.stdev(vals), 2)
    return out


def out_console() -> Console:
    """The console for tables on stdout: rich's own width on a terminal or where COLUMNS is set;
    else (logs, pipes) 160 columns, where rich assumes 80 and would wrap labels and paths mid-word."""
    console = Console()
    return console if console.is_terminal or os.environ.get("COLUMNS") else Console(width=160)


def print_table(table: Table) -> None:
    out_console().print(table)
