"""Outputs of `powerd bench`: the JSON document, the console table, Markdown and the plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from powerd.bench.results import BenchResult, PolicyResult

PLOT_MISSING = (
    "--plot needs matplotlib, which is not installed; install it with "
    "`pip install matplotlib` (or the `powerd[plot]` extra)"
)


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else 0.0


def policy_json(result: PolicyResult) -> dict[str, Any]:
    return {
        "energy_j": _finite(result.energy_j),
        "generated_tokens": int(result.generated_tokens),
        "tokens_per_joule": _finite(result.tokens_per_joule),
        "slo_attainment": _finite(result.slo_attainment),
        "ttft_p95_s": _finite(result.ttft_p95_s),
        "itl_p95_s": _finite(result.itl_p95_s),
        "mean_power_w": _finite(result.mean_power_w),
    }


def to_json(result: BenchResult) -> dict[str, Any]:
    """The documented JSON document. `powerd_share_of_oracle_saving` is null when the run
    lacks default, powerd or oracle, or when the oracle saves nothing."""
    info = result.info
    share = result.share_of_oracle_saving()
    return {
        "trace": info.trace,
        "gpu_model": info.gpu_model,
        "model": info.model,
        "gpus": int(info.gpus),
        "duration_s": float(info.duration_s),
        "slo": {"ttft_p95_s": float(info.ttft_slo_s), "itl_p95_s": float(info.itl_slo_s)},
        "policies": {name: policy_json(p) for name, p in result.policies.items()},
        "powerd_share_of_oracle_saving": share,
    }


def prepare_output(path: str | Path) -> None:
    """Create the folder `path` will be written to, and check that a file can be made there,
    so a long run does not end in an error that loses it; OSError otherwise."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a folder")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {target.parent}")


def write_json(result: BenchResult, path: str | Path) -> None:
    prepare_output(path)
    Path(path).write_text(json.dumps(to_json(result), indent=2) + "\n", encoding="utf-8")


_COLUMNS = (
    ("policy", "<"),
    ("energy kJ", ">"),
    ("tokens", ">"),
    ("tok/J", ">"),
    ("vs default", ">"),
    ("SLO met", ">"),
    ("TTFT p95 s", ">"),
    ("ITL p95 ms", ">"),
    ("mean W", ">"),
    ("wall s", ">"),
    ("setting", "<"),
)


def _rows(result: BenchResult) -> list[list[str]]:
    base = result.policies.get("default")
    rows = []
    for name, p in result.policies.items():
        if base is not None and base.tokens_per_joule > 0:
            gain = f"{(p.tokens_per_joule / base.tokens_per_joule - 1) * 100:+.1f}%"
        else:
            gain = "-"
        rows.append(
            [
                name,
                f"{p.energy_j / 1e3:.1f}",
                f"{p.generated_tokens}",
                f"{p.tokens_per_joule:.3f}",
                gain,
                f"{p.slo_attainment * 100:.2f}%",
                f"{p.ttft_p95_s:.3f}",
                f"{p.itl_p95_s * 1e3:.1f}",
                f"{p.mean_power_w:.0f}",
                f"{p.wall_s:.1f}",
                p.notes,
            ]
        )
    return rows


def _headline(result: BenchResult) -> str:
    info = result.info
    tick = f", {info.interval_s:g}-s ticks" if info.interval_s != 1.0 else ""
    return (
        f"{info.trace}, {info.duration_s:.0f} s, {info.gpus} x {info.gpu_model}, "
        f"{info.model} TP={info.tp} ({info.server_kind}), {info.load}, seed {info.seed}{tick}; "
        f"SLO: TTFT <= {info.ttft_slo_s:g} s and mean ITL <= {info.itl_slo_s * 1e3:g} ms"
    )


def _share_line(result: BenchResult) -> str:
    share = result.share_of_oracle_saving()
    if share is None:
        return "powerd's share of the oracle's saving: n/a"
    return f"powerd's share of the oracle's saving: {share:.2f}"


def decisions_line(result: BenchResult) -> str:
    """powerd's share of group-ticks by decision reason, one line; "" when it did not run."""
    powerd = result.policies.get("powerd")
    if powerd is None or not powerd.decisions:
        return ""
    shares = ", ".join(
        f"{reason} {100 * share:.1f} %"
        for reason, share in powerd.decisions.items()
        if share >= 0.001
    )
    return f"powerd's decisions by reason (share of group-ticks): {shares}"


def format_table(result: BenchResult) -> str:
    """The console table, with the headline, the share of the oracle's saving and wall time."""
    header = [name for name, _ in _COLUMNS]
    rows = _rows(result)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        out = []
        for cell, width, (_, align) in zip(cells, widths, _COLUMNS, strict=True):
            out.append(cell.ljust(width) if align == "<" else cell.rjust(width))
        return "  ".join(out).rstrip()

    lines = [_headline(result), "", line(header), line(["-" * w for w in widths])]
    lines += [line(r) for r in rows]
    lines += ["", _share_line(result)]
    by_load_text = format_by_load(result)
    if by_load_text:
        lines += ["", "Mean SM clock and tokens per joule by load quartile (default's load):"]
        lines += ["", by_load_text]
    decisions = decisions_line(result)
    if decisions:
        lines += ["", decisions]
    lines += ["", f"wall time: {result.wall_s:.1f} s"]
    return "\n".join(lines)


def by_load(
    result: BenchResult, bins: int = 4
) -> tuple[list[str], dict[str, list[tuple[float, float]]]]:
    """Mean SM clock and tokens/J per policy over the intervals of each load quantile.

    Intervals are binned by the reference run's load (default's when it ran): every policy
    replays the same arrivals, so a bin holds the same moments of the trace for all of them.
    Returns the bin labels and, per policy, (mean clock MHz, tokens per joule) per bin.
    """
    if not result.policies:
        return [], {}
    reference = result.policies.get("default") or next(iter(result.policies.values()))
    load = reference.series.load
    n = len(load)
    if n == 0:
        return [], {}
    order = np.argsort(load, kind="stable")
    edges = [order[(n * k) // bins : (n * (k + 1)) // bins] for k in range(bins)]
    labels = []
    for idx in edges:
        lo, hi = (float(load[idx].min()), float(load[idx].max())) if len(idx) else (0.0, 0.0)
        labels.append(f"{lo:.0f}-{hi:.0f} req")
    table: dict[str, list[tuple[float, float]]] = {}
    for name, p in result.policies.items():
        s = p.series
        if len(s.time_s) != n:
            continue
        cells = []
        for idx in edges:
            energy = float(s.energy_j[idx].sum())
            cells.append(
                (
                    float(s.clock_mhz[idx].mean()) if len(idx) else 0.0,
                    float(s.tokens[idx].sum()) / energy if energy > 0 else 0.0,
                )
            )
        table[name] = cells
    return labels, table


def format_by_load(result: BenchResult) -> str:
    """by_load as text: `clock MHz / tokens per J` per policy and load quartile."""
    labels, table = by_load(result)
    if not labels:
        return ""
    header = ["MHz / tok/J by load", *labels]
    rows = [[name] + [f"{c:.0f} / {t:.2f}" for c, t in cells] for name, cells in table.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def format_markdown(result: BenchResult) -> str:
    """The same table as GitHub-flavoured Markdown."""
    header = [name for name, _ in _COLUMNS]
    sep = [":--" if align == "<" else "--:" for _, align in _COLUMNS]
    lines = [
        "# powerd bench",
        "",
        _headline(result),
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(sep) + " |",
    ]
    for row in _rows(result):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    lines += ["", _share_line(result) + "."]
    labels, table = by_load(result)
    if labels:
        lines += [
            "",
            "Mean SM clock (MHz) / tokens per joule by load quartile (of default's run):",
            "",
            "| policy | " + " | ".join(labels) + " |",
            "| :-- | " + " | ".join("--:" for _ in labels) + " |",
        ]
        for name, cells in table.items():
            lines.append(f"| {name} | " + " | ".join(f"{c:.0f} / {t:.2f}" for c, t in cells) + " |")
    decisions = decisions_line(result)
    if decisions:
        lines += ["", decisions + "."]
    lines += ["", f"Wall time: {result.wall_s:.1f} s.", ""]
    return "\n".join(lines)


def write_markdown(result: BenchResult, path: str | Path) -> None:
    prepare_output(path)
    Path(path).write_text(format_markdown(result), encoding="utf-8")


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(result: BenchResult, path: str | Path, bucket_s: float = 30.0) -> None:
    """Load, clock, power and tokens/J over time, one line per policy, as an image (the
    format from the path's suffix, PNG by default).

    Raises RuntimeError (PLOT_MISSING) when matplotlib is not installed.
    """
    fig = plot_figure(result, bucket_s)
    import matplotlib.pyplot as plt

    prepare_output(path)
    try:
        fig.savefig(str(path), dpi=110)
    finally:
        plt.close(fig)


def plot_figure(result: BenchResult, bucket_s: float = 30.0) -> Any:
    """The matplotlib Figure of write_plot: four panels sharing the time axis, each series
    averaged over `bucket_s` (shorter for a run of under 20 buckets, so it still shows a
    line). Raises RuntimeError (PLOT_MISSING) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(PLOT_MISSING) from exc
    fig, axes = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    titles = ("requests in the node", "mean SM clock (MHz)", "node GPU power (W)", "tokens / J")
    for name, p in result.policies.items():
        s = p.series
        if len(s.time_s) == 0:
            continue
        interval = float(s.time_s[1] - s.time_s[0]) if len(s.time_s) > 1 else 1.0
        bucket = max(1, min(round(bucket_s / interval), len(s.time_s) // 20))
        n = len(s.time_s) // bucket

        def mean(values: np.ndarray, b: int = bucket, k: int = n) -> np.ndarray:
            return values[: k * b].reshape(k, b).mean(axis=1)

        t_min = s.time_s[bucket - 1 : n * bucket : bucket] / 60.0
        axes[0].plot(t_min, mean(s.load), label=name, lw=1)
        axes[1].plot(t_min, mean(s.clock_mhz), label=name, lw=1)
        axes[2].plot(t_min, mean(s.power_w), label=name, lw=1)
        _, tpj = s.tokens_per_joule(bucket)
        axes[3].plot(t_min, tpj, label=name, lw=1)
    for ax, title in zip(axes, titles, strict=True):
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("time (min)")
    axes[0].legend(loc="upper right", fontsize=8, ncol=4)
    axes[0].set_title(_headline(result), fontsize=9)
    fig.tight_layout()
    return fig
