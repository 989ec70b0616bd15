"""A sweep's report: PNG figures (matplotlib, no display needed) and a ``report.md`` that embeds them.

Figures, each drawn when the sweep has what it needs:

* ``energy_per_token.png``: stacked bars of energy per token by component, one bar per point, ordered by
  placement and batch size;
* ``hit_rate_vs_capacity.png``: HBM hit rate against cache capacity, one curve per policy (Belady dashed, the
  offline optimum, as the bound); only when ``cache.capacity_experts`` varies;
* ``stall_vs_energy.png``: stall per token against energy per token with the Pareto front (the points no
  other point beats on both);
* ``latency_cdf.png``: the distribution of per-step latency, from each point's per-step output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tierflow.energy import COMPONENTS
from tierflow.errors import TierflowError
from tierflow.atomic import atomic_write, output_dir
from tierflow.sweep import STATUS_OK, _write_text, points_dir, read_table

FIGURE_SIZE_IN = (10.0, 6.0)
FIGURE_DPI = 100  # so every PNG is 1000 x 600 pixels
_SHORT_NAMES = {
    "placement": "placement", "workload.batch_size": "batch", "cache.policy": "cache",
    "cache.capacity_experts": "capacity", "prefetch.policy": "prefetch", "prefetch.lookahead": "lookahead", "prefetch.budget_experts": "budget",
    "energy.ssd_read_pj_per_bit": "SSD pJ/bit", "hardware": "hw", "model": "model", "gpus": "GPUs",
}
_MAX_LEGEND = 12
# Values that name themselves ("ssd", not "placement ssd").
_VALUE_ONLY = {"placement"}
_MARKERS = "osD^vPX*"


def _short(key: str) -> str:
    return _SHORT_NAMES.get(key, key)


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:g}"
    return str(value)


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class SweepTable:
    """The ok rows of a sweep's table, with the axes that vary among them."""

    def __init__(self, sweep_dir: Path):
        self.sweep_dir = Path(sweep_dir)
        table_path = self.sweep_dir / "results.h5"
        meta_path = self.sweep_dir / "sweep.json"
        if not table_path.is_file() or not meta_path.is_file():
            raise TierflowError(f"{self.sweep_dir}: not a sweep folder (no results.h5 / sweep.json); "
                                "run `tierflow sweep SWEEP.toml --out DIR` first")
        try:
            self.meta = json.loads(meta_path.read_text())
            if not isinstance(self.meta, dict) or not isinstance(self.meta.get("axes"), list):
                raise ValueError("no list of axes")
            if not all(isinstance(axis, str) for axis in self.meta["axes"]):
                raise ValueError("an axis is not a scenario key")
            if not isinstance(self.meta.get("points"), list) or not all(
                    isinstance(point, str) for point in self.meta["points"]):
                raise ValueError("no list of point ids")
            for label in ("name", "description"):
                if not isinstance(self.meta.get(label, ""), str):
                    raise ValueError(f"its {label} is not text")
            self.meta.setdefault("name", self.sweep_dir.name)
        except (OSError, ValueError) as error:
            raise TierflowError(f"{meta_path}: not a sweep description ({_reason(error)}); rerun `tierflow sweep "
                                f"SWEEP.toml --out {self.sweep_dir}` to rebuild it") from None
        rebuild = f"rerun `tierflow sweep SWEEP.toml --out {self.sweep_dir}` to rebuild it"
        try:
            self.all = read_table(table_path)
            for column in ("point_id", "status", "error"):
                if column not in self.all:
                    raise KeyError(f"no {column} column")
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise TierflowError(f"{table_path}: not a readable results table ({_reason(error)}); {rebuild}") from None
        listed = self.meta["points"]
        if not set(self.all["point_id"].tolist()) <= set(listed):
            raise TierflowError(f"{table_path} holds points that {meta_path} does not list (an interrupted run of "
                                f"another sweep?); {rebuild}")
        ok = np.array([s == STATUS_OK for s in self.all["status"]], dtype=bool)
        axes = [k for k in self.meta["axes"] if k in self.all]
        self.axes = axes
        self.errors = [(self.all["point_id"][i], ", ".join(f"{_short(k)} {_cell(self.all[k][i])}" for k in axes),
                        self.all["error"][i]) for i in np.flatnonzero(~ok)]
        self.rows = {column: values[ok] for column, values in self.all.items()}
        self.count = int(ok.sum())
        self.varying = [k for k in self.meta["axes"] if k in self.rows and len(set(self.rows[k].tolist())) > 1]

    def column(self, name: str) -> np.ndarray:
        """A figure as floats, NaN where it is null. A figure null at every point of the table (the HBM hit rate
        of a sweep without an HBM cache) is stored as text, an empty string for each null."""
        if name not in self.rows:
            return np.full(self.count, np.nan)
        values = self.rows[name]
        if values.dtype == object:
            values = [np.nan if value == "" else value for value in values]
        return np.asarray(values, dtype=float)

    def label(self, i: int, keys: list[str] | None = None) -> str:
        """A row's values on ``keys``, "" when there are none. By default on the axes that vary among the ok rows,
        else (a single ok point) on every axis, and the point id when that names nothing."""
        parts = [_cell(self.rows[k][i]) if k in _VALUE_ONLY else f"{_short(k)} {_cell(self.rows[k][i])}"
                 for k in ((self.varying or self.axes) if keys is None else keys)]
        return ", ".join(parts) or ("" if keys is not None else str(self.rows["point_id"][i]))

    def order(self, first: tuple[str, ...]) -> list[int]:
        """Row indices sorted by the given keys (when present) and then the other varying axes."""
        keys = [k for k in first if k in self.rows] + [k for k in self.varying if k not in first]
        return sorted(range(self.count), key=lambda i: tuple(self._rank(k, i) for k in keys))

    def _rank(self, key: str, i: int):
        """Numbers by value; words (placements, policies) in the order the sweep file lists them."""
        value = self.rows[key][i]
        if isinstance(value, (int, float, np.number)):
            return float(value)
        return list(dict.fromkeys(self.rows[key].tolist())).index(value)


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def save_png(figure, path: Path) -> Path:
    """Lay out ``figure`` and write it as a PNG at the reports' resolution, atomically."""
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=FIGURE_DPI))
    return path


def energy_bars(table: SweepTable, path: Path) -> Path:
    order = table.order(("placement", "workload.batch_size"))
    figure, axes = _figure(f"{table.meta['name']}: energy per token by component",
                           "point (placement, batch size and other swept settings)", "energy per token (J)")
    x = np.arange(len(order))
    bottom = np.zeros(len(order))
    for component in COMPONENTS:
        values = np.nan_to_num(table.column(f"energy_j_per_token.{component}")[order])
        axes.bar(x, values, bottom=bottom, label=component, width=0.8)
        bottom += values
    stacked = len(order) <= 12  # few bars: one line per setting under each bar; many: one rotated line
    axes.set_xticks(x, [table.label(i).replace(", ", "\n") if stacked else table.label(i) for i in order],
                    rotation=0 if stacked else 90, fontsize=7 if len(order) <= 24 else 6)
    axes.legend(title="component", loc="upper left", fontsize=8)
    return save_png(figure, path)


def _groups(table: SweepTable, exclude: tuple[str, ...]) -> dict[str, list[int]]:
    keys = [k for k in table.varying if k not in exclude]
    groups: dict[str, list[int]] = {}
    for i in table.order(exclude):
        groups.setdefault(table.label(i, keys) or "all points", []).append(i)
    return groups


def hit_rate_curves(table: SweepTable, path: Path) -> Path:
    capacity = table.column("cache.capacity_experts")
    hit_rate = 100 * table.column("hit_rate.hbm")
    figure, axes = _figure(f"{table.meta['name']}: HBM expert-cache hit rate vs capacity",
                           "HBM cache capacity (experts, all GPUs)", "HBM hit rate (%)")
    for label, rows in _groups(table, ("cache.capacity_experts",)).items():
        rows = sorted(rows, key=lambda i: capacity[i])
        belady = "belady" in label
        axes.plot(capacity[rows], hit_rate[rows], marker="o", label=label + (" (offline optimum)" if belady else ""),
                  linestyle="--" if belady else "-", color="black" if belady else None, linewidth=2 if belady else 1.5)
    axes.set_ylim(0, 100)
    axes.legend(fontsize=8)
    return save_png(figure, path)


def pareto_front(stall: np.ndarray, energy: np.ndarray) -> list[int]:
    """Indices of the points no other point beats on both stall and energy (lower is better), by stall."""
    front, best_energy = [], np.inf
    for i in sorted(range(len(stall)), key=lambda i: (stall[i], energy[i])):
        if energy[i] < best_energy:
            front.append(i)
            best_energy = energy[i]
    return front


def stall_energy(table: SweepTable, path: Path) -> Path:
    stall_ms = 1e3 * table.column("stall_s_per_token")
    energy = table.column("energy_j_per_token.total")
    figure, axes = _figure(f"{table.meta['name']}: stall vs energy per token (lower left is better)",
                           "stall per token (ms)", "energy per token (J)")
    colour_key = next((k for k in ("prefetch.policy", *table.varying) if k in table.varying), None)
    groups = _groups(table, ()) if colour_key is None else {}
    if colour_key is not None:
        for i in table.order((colour_key,)):
            groups.setdefault(f"{_short(colour_key)} {_cell(table.rows[colour_key][i])}", []).append(i)
    for number, (label, rows) in enumerate(groups.items()):
        # Earlier groups drawn larger, so points that coincide stay visible behind later ones.
        axes.scatter(stall_ms[rows], energy[rows], label=label, s=max(130 - 30 * number, 25),
                     marker=_MARKERS[number % len(_MARKERS)], alpha=0.85, zorder=3 + number)
    front = pareto_front(stall_ms, energy)
    axes.plot(stall_ms[front], energy[front], color="black", linewidth=1, drawstyle="steps-post",
              label="Pareto front", zorder=2)
    annotated: list[tuple[float, float]] = []
    span = (np.ptp(stall_ms) or 1.0, np.ptp(energy) or 1.0)
    for i in front:
        if any(abs(stall_ms[i] - x) < 0.03 * span[0] and abs(energy[i] - y) < 0.03 * span[1] for x, y in annotated):
            continue  # a coinciding point is already named
        annotated.append((stall_ms[i], energy[i]))
        axes.annotate(table.label(i), (stall_ms[i], energy[i]), fontsize=7, xytext=(6, 6 + 10 * (len(annotated) % 2)),
                      textcoords="offset points")
    axes.legend(fontsize=8)
    return save_png(figure, path)


def latency_cdf(table: SweepTable, path: Path) -> Path:
    import h5py

    figure, axes = _figure(f"{table.meta['name']}: per-step latency distribution",
                           "latency per token = per decode step (ms, log scale)", "share of decode steps (CDF)")
    from matplotlib import colormaps

    palette = colormaps["tab20" if table.count > 10 else "tab10"]
    for number, i in enumerate(table.order(tuple(table.varying))):
        point_path = points_dir(table.sweep_dir) / f"{table.rows['point_id'][i]}.h5"
        try:
            with h5py.File(point_path, "r") as f:
                latency_ms = np.sort(1e3 * f["steps/latency_s"][()])
        except (OSError, KeyError, ValueError) as error:
            raise TierflowError(f"{point_path}: not a readable point output ({_reason(error)}); rerunning "
                                f"`tierflow sweep SWEEP.toml --out {table.sweep_dir}` redoes the point") from None
        share = np.arange(1, len(latency_ms) + 1) / max(len(latency_ms), 1)
        axes.step(latency_ms, share, where="post", linewidth=1.2, color=palette(number % palette.N),
                  label=table.label(i) if number < _MAX_LEGEND else None)
    axes.set_xscale("log")
    axes.set_ylim(0, 1)
    if table.count > _MAX_LEGEND:
        axes.set_title(f"{table.meta['name']}: per-step latency distribution "
                       f"({table.count} points, first {_MAX_LEGEND} in the legend)")
    axes.legend(fontsize=7)
    return save_png(figure, path)


_TITLES = {
    "energy_per_token.png": "Energy per token by component",
    "hit_rate_vs_capacity.png": "Hit rate vs cache capacity",
    "stall_vs_energy.png": "Stall vs energy (Pareto front)",
    "latency_cdf.png": "Latency per token (CDF)",
}


def _markdown(table: SweepTable, figures: list[Path]) -> str:
    meta = table.meta
    lines = [f"# Sweep `{meta['name']}`", ""]
    if meta.get("description"):
        lines += [meta["description"], ""]
    points = len(table.all["point_id"])
    lines += [f"{points} point{'s' * (points != 1)}: {table.count} ok, {len(table.errors)} failed. "
              f"Swept: {', '.join(f'`{k}`' for k in meta['axes'])}.", ""]
    for figure in figures:
        lines += [f"## {_TITLES[figure.name]}", "", f"![{_TITLES[figure.name]}]({figure.name})", ""]
    lines += ["## Main figures", "",
              "| point | energy J/token | latency ms/token (mean) | p99 ms | stall ms/token | HBM hit rate | tokens/s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    columns = {name: table.column(name) for name in ("energy_j_per_token.total", "latency_s_per_token.mean",
                                                      "latency_s_per_token.p99", "stall_s_per_token",
                                                      "hit_rate.hbm", "tokens_per_s")}
    for i in table.order(("placement", "workload.batch_size")):
        hit = columns["hit_rate.hbm"][i]
        lines.append(
            f"| {table.label(i)} | {columns['energy_j_per_token.total'][i]:.3f} "
            f"| {1e3 * columns['latency_s_per_token.mean'][i]:.3f} | {1e3 * columns['latency_s_per_token.p99'][i]:.3f} "
            f"| {1e3 * columns['stall_s_per_token'][i]:.3f} | {'n/a' if np.isnan(hit) else f'{100 * hit:.1f}%'} "
            f"| {columns['tokens_per_s'][i]:.1f} |")
    if table.errors:
        lines += ["", "## Failed points", "", "| point id | settings | error |", "|---|---|---|"]
        lines += [f"| `{pid}` | {label} | {error.replace('|', '/')} |" for pid, label, error in table.errors]
    return "\n".join(lines) + "\n"


def build_report(sweep_dir, out) -> list[Path]:
    """Write the figures and ``report.md`` into ``out``; returns the paths written."""
    table = SweepTable(Path(sweep_dir))
    if table.count == 0:
        raise TierflowError(f"{sweep_dir}: no point finished without error; nothing to plot")
    out = output_dir(out)
    figures = [energy_bars(table, out / "energy_per_token.png")]
    if "cache.capacity_experts" in table.varying:
        figures.append(hit_rate_curves(table, out / "hit_rate_vs_capacity.png"))
    figures.append(stall_energy(table, out / "stall_vs_energy.png"))
    figures.append(latency_cdf(table, out / "latency_cdf.png"))
    report = out / "report.md"
    _write_text(report, _markdown(table, figures))
    return [*figures, report]
