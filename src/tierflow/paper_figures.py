"""Figures of the Kyung et al. reproduction (:mod:`tierflow.paper`), drawn with matplotlib without a display.

* ``paper_energy.png``: for each model, energy per token by component for HBM, DDR and SSD placement at each
  batch size, stacked and normalised to the HBM-only total of the same batch (as the paper's figure);
* ``ssd_scaling.png``: SSD offload's energy per token over DDR's as the SSD read energy scales down;
* ``beyond_paper.png``: SSD/HBM energy ratio of each beyond-the-paper variant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tierflow.report import FIGURE_DPI, save_png

SIZE_IN = (12.0, 5.5)
COLORS = {"compute": "tab:green", "hbm": "tab:blue", "ddr": "tab:orange", "ssd": "tab:red", "link": "tab:purple",
          "static": "tab:gray"}
COMPONENTS = tuple(COLORS)
PLACEMENTS = ("hbm", "ddr", "ssd")


def _figure(columns: int):
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE_IN, dpi=FIGURE_DPI)
    return figure, [figure.add_subplot(1, columns, i + 1) for i in range(columns)]


def _models(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def energy_bars(rows: list[dict], path: Path) -> Path:
    models = _models(rows)
    figure, axes_list = _figure(len(models))
    for axes, model in zip(axes_list, models, strict=True):
        mine = {(r["batch_size"], r["placement"]): r for r in rows if r["model"] == model}
        batches = sorted({b for b, _ in mine})
        width = 0.27
        for p, placement in enumerate(PLACEMENTS):
            x = np.arange(len(batches)) + (p - 1) * width
            bottom = np.zeros(len(batches))
            for component in COMPONENTS:
                values = np.array([mine[(b, placement)][f"{component}_j"] / mine[(b, "hbm")]["total_j"]
                                   for b in batches])
                axes.bar(x, values, width, bottom=bottom, color=COLORS[component],
                         label=component if p == 0 else None, edgecolor="black", linewidth=0.3)
                bottom += values
            for xi, top in zip(x, bottom, strict=True):
                axes.text(xi, top, placement[0].upper(), ha="center", va="bottom", fontsize=6)
        axes.set_xticks(np.arange(len(batches)), [str(b) for b in batches])
        axes.set_xlabel("batch size (bars: H = HBM, D = DDR, S = SSD placement)")
        axes.set_ylabel("energy per token / HBM-only total")
        axes.set_title(f"{model}: decode energy per token")
        axes.grid(True, axis="y", alpha=0.3)
        axes.legend(fontsize=7, loc="upper right")
    return save_png(figure, path)


def scaling_lines(scaling: list[dict], path: Path) -> Path:
    models = _models(scaling)
    figure, axes_list = _figure(len(models))
    for axes, model in zip(axes_list, models, strict=True):
        for row in (r for r in scaling if r["model"] == model):
            keys = sorted((k for k in row if k.startswith("ssd_x")), reverse=True)
            scales = [float(k[5:-2]) for k in keys]
            axes.plot(scales, [row[k] / row["ddr_j"] for k in keys], marker="o", label=f"batch {row['batch_size']}")
        axes.axhline(1.0, color="black", linestyle="--", linewidth=1, label="DDR offload")
        axes.set_xlabel("SSD read energy scale (1.0 = 102.4 pJ/bit)")
        axes.set_ylabel("SSD offload energy per token / DDR offload")
        axes.set_title(f"{model}: SSD read-energy scaling")
        axes.invert_xaxis()
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7)
    return save_png(figure, path)


def beyond_bars(rows: list[dict], path: Path) -> Path:
    models = _models(rows)
    figure, axes_list = _figure(len(models))
    for axes, model in zip(axes_list, models, strict=True):
        mine = [r for r in rows if r["model"] == model and r["placement"] == "ssd"]
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        batches = sorted({r["batch_size"] for r in mine})
        width = 0.8 / len(batches)
        for i, batch in enumerate(batches):
            ratio = {r["variant"]: r["ratio_to_hbm"] for r in mine if r["batch_size"] == batch}
            x = np.arange(len(variants)) + (i - (len(batches) - 1) / 2) * width
            axes.bar(x, [ratio.get(v, np.nan) for v in variants], width, label=f"batch {batch}")
        axes.set_yscale("log")
        axes.axhline(1.0, color="black", linewidth=1)
        axes.set_xticks(np.arange(len(variants)), variants, rotation=35, ha="right", fontsize=7)
        axes.set_ylabel("SSD offload energy per token / HBM-only")
        axes.set_title(f"{model}: beyond the paper's assumptions")
        axes.grid(True, axis="y", alpha=0.3)
        axes.legend(fontsize=7)
    return save_png(figure, path)
