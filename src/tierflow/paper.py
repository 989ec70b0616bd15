"""The reproduction of Kyung, Yun, Ahn, "SSD Offloading for LLM MoE Weights Considered Harmful in Energy
Efficiency" (IEEE CAL 2025), and what it leaves open.

Every cell is one run of a shipped scenario with ``--set`` overrides (``kyung_mixtral`` and
``kyung_deepseek_r1`` hold the paper's conditions as settings), so any row can be rerun on its own with
``tierflow simulate``. Outputs, written atomically into one folder:

* ``paper_table.csv`` / ``.md``: J/token by component and step latency for each model, placement and batch
  size, with the SSD/HBM and DDR/HBM ratios;
* ``ssd_scaling.csv`` / ``.md``: energy per token as the SSD read energy scales from 1.0 down to 0.1, and the
  scale at which SSD offloading matches DDR (and HBM);
* ``beyond_paper.csv`` / ``.md``: the realistic version of each assumption, one at a time and together;
* ``paper_energy.png`` (stacked bars like the paper's), ``ssd_scaling.png`` and ``beyond_paper.png``.

Each finished cell is saved (atomically) under ``DIR/cells/``, keyed by its settings and a fingerprint of
tierflow's own files, so an interrupted run resumes where it stopped and a changed simulator reruns
everything.

SSD read energy only prices bytes; it changes no timing. The scaling study therefore prices each SSD cell's
ledger again at every scale, which is what rerunning the cell with ``energy.ssd_read_pj_per_bit`` gives
(a test checks this against a rerun).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs

from tierflow.atomic import atomic_write, output_dir
from tierflow.config import load_scenario
from tierflow.energy import ledger_energy_j
from tierflow.errors import TierflowError
from tierflow.resources import code_fingerprint
from tierflow.workers import WorkerDied, run_parallel

MODELS = {  # scenario -> (label, batch sizes the paper runs)
    "kyung_mixtral": ("Mixtral-8x7B", (1, 4, 16, 64, 256, 1024)),
    "kyung_deepseek_r1": ("DeepSeek-R1", (4, 16, 64, 256, 1024)),
}
PLACEMENTS = ("hbm", "ddr", "ssd")
SSD_SCALES = tuple(round(1.0 - 0.1 * i, 1) for i in range(10))  # 1.0, 0.9, ..., 0.1
SHOWN = ("compute", "hbm", "ddr", "ssd", "link", "static")  # energy components in the tables

# Beyond the paper: each variant replaces one of the paper's conditions with its realistic version. Cached
# and prefetching variants decode several steps so that reuse can show (energy per token then includes the
# cache's warm-up). The HBM-only baseline of a variant runs with the same routing and steps.
STEPS = 16
_ON_DEMAND = ("timing.expert_copies=on_demand", f"workload.decode_tokens={STEPS}")
_PREFETCH = ("prefetch.policy=transition", "prefetch.lookahead=2")


def _cache(policy: str, fraction: float | None) -> Callable[[int], tuple[str, ...]]:
    def overrides(total_experts: int) -> tuple[str, ...]:
        size = () if fraction is None else (f"cache.capacity_experts={int(total_experts * fraction)}",)
        return ("cache.enabled=true", f"cache.policy={policy}", *size, *_ON_DEMAND)

    return overrides


@attrs.frozen
class Variant:
    name: str
    description: str
    overrides: Callable[[int], tuple[str, ...]]  # total experts of the model -> --set strings


VARIANTS = (  # the paper's own cells (variant "paper") are the reference rows of the beyond table
    Variant("c2c450", "the paper's 450 GB/s NVLink-C2C variant", lambda total: ("hardware=kyung2025-c2c450",)),
    Variant("on_demand", "no prefetch: each layer copies its experts when it reaches them",
            lambda total: ("timing.expert_copies=on_demand",)),
    Variant("nvme_ssd", "a real NVMe SSD per GPU (PM1743, 13 GB/s) instead of one that keeps up with the link",
            lambda total: ("hardware=kyung2025-nvme",)),
    Variant("pcie5", "a PCIe Gen5 x16 offload link (35.2 GB/s, 11.4 pJ/bit) instead of 900 GB/s NVLink-C2C",
            lambda total: ("hardware=kyung2025-pcie5",)),
    Variant("trace_routing", f"routing from the calibrated synthetic traces (skew, reuse) over {STEPS} steps",
            lambda total: ("workload.routing=trace", f"workload.decode_tokens={STEPS}")),
    Variant("cache_free_hbm", "an LRU expert cache in all the HBM left free (the experts fit)",
            _cache("lru", None)),
    Variant("lru_25", "an LRU expert cache of 25% of the experts", _cache("lru", 0.25)),
    Variant("lfu_25", "an LFU expert cache of 25% of the experts", _cache("lfu", 0.25)),
    Variant("learned_25", "the learned expert cache of 25% of the experts", _cache("learned", 0.25)),
    Variant("lru_25_prefetch", "LRU of 25% of the experts with the transition prefetcher",
            lambda total: (*_cache("lru", 0.25)(total), *_PREFETCH)),
    Variant("together", "all at once: real NVMe SSD, PCIe Gen5, traced routing, LRU 25% and prefetching",
            lambda total: ("hardware=kyung2025-pcie5-nvme", "workload.routing=trace",
                           *_cache("lru", 0.25)(total), *_PREFETCH)),
)
BEYOND_BATCHES = {"kyung_mixtral": (1, 16, 256), "kyung_deepseek_r1": (4, 64, 1024)}


def _beyond_batches(model_label: str) -> tuple[int, ...]:
    return next(BEYOND_BATCHES[s] for s, (label, _) in MODELS.items() if label == model_label)


@attrs.frozen
class Cell:
    scenario: str
    variant: str
    placement: str
    batch: int
    overrides: tuple[str, ...]

    @property
    def model(self) -> str:
        return MODELS[self.scenario][0]

    def settings(self) -> tuple[str, ...]:
        return (f"placement={self.placement}", f"workload.batch_size={self.batch}", *self.overrides)

    def command(self) -> str:
        return " ".join(["tierflow simulate", f"--scenario {self.scenario}",
                         *(f"--set {item}" for item in self.settings())])


def paper_cells() -> list[Cell]:
    return [Cell(scenario, "paper", placement, batch, ())
            for scenario, (_, batches) in MODELS.items() for batch in batches for placement in PLACEMENTS]


def _total_experts(scenario: str) -> int:
    from tierflow.catalog import get_model

    spec = get_model(load_scenario(scenario).model)
    return spec.num_moe_layers * spec.num_routed_experts


def beyond_cells() -> list[Cell]:
    cells = []
    for scenario, batches in BEYOND_BATCHES.items():
        total = _total_experts(scenario)
        for variant in VARIANTS:
            overrides = variant.overrides(total)
            for batch in batches:
                # The HBM-only baseline ignores links, SSDs and caches: it depends only on routing and steps.
                baseline = tuple(o for o in overrides if o.startswith("workload."))
                cells.append(Cell(scenario, variant.name, "hbm", batch, baseline))
                cells.append(Cell(scenario, variant.name, "ssd", batch, overrides))
    return cells


def run_cell(cell: Cell) -> dict:
    """One cell's row: step latency, J/token by component, and the total at every SSD read-energy scale."""
    from tierflow.sim.engine import Simulation, energy_model

    scenario = load_scenario(cell.scenario, cell.settings())
    sim = Simulation(scenario)
    summary = sim.run().summary
    tokens = summary["tokens"]
    row = {"model": cell.model, "variant": cell.variant, "placement": cell.placement, "batch_size": cell.batch,
           "step_latency_ms": 1e3 * summary["latency_s_per_token"]["mean"],
           "stall_ms": 1e3 * summary["stall_s_per_token"]}
    row.update({f"{name}_j": summary["energy_j_per_token"][name] for name in SHOWN})
    row["total_j"] = summary["energy_j_per_token"]["total"]
    row["hit_rate_hbm"] = summary["hit_rate"]["hbm"]
    base_pj = sim.energy.read_pj_per_bit["ssd"]
    for scale in SSD_SCALES:
        scaled = attrs.evolve(scenario, energy=attrs.evolve(scenario.energy, ssd_read_pj_per_bit=base_pj * scale))
        joules = ledger_energy_j(energy_model(scaled, sim.hardware, sim.plan.gpus), sim.ledger, sim.elapsed_s)
        row[f"total_j_ssd_x{scale:.1f}"] = joules["total"] / tokens
    row["command"] = cell.command()
    return row


def cell_id(cell: Cell) -> str:
    identity = json.dumps([cell.scenario, cell.variant, cell.settings(), code_fingerprint()])
    return hashlib.sha256(identity.encode()).hexdigest()[:20]


def load_cached_row(path: Path) -> dict | None:
    """A cell's saved row, or None when there is none or it is unreadable (then the cell runs again)."""
    try:
        row = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and "model" in row and "total_j" in row else None


def run_cells(cells: list[Cell], workers: int | None = None, progress: Callable[[int], None] | None = None,
              cache_dir: Path | None = None) -> list[dict]:
    """Rows for ``cells`` in order; cells run in ``workers`` processes (default: the cores). With
    ``cache_dir``, cells already saved there are read back instead of run, and each new one is saved."""
    rows: list[dict | None] = [None] * len(cells)
    paths = [None if cache_dir is None else Path(cache_dir) / f"{cell_id(cell)}.json" for cell in cells]
    for i, path in enumerate(paths):
        if path is not None and (row := load_cached_row(path)) is not None:
            rows[i] = row
            if progress:
                progress(1)
    todo = [i for i, row in enumerate(rows) if row is None]
    if cache_dir is not None:
        output_dir(cache_dir)

    def finished(i: int, row: dict) -> None:
        rows[i] = row
        if paths[i] is not None:
            _write(paths[i], json.dumps(row))
        if progress:
            progress(1)

    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(todo) <= 1:
        for i in todo:
            finished(i, run_cell(cells[i]))
    else:  # saved as each finishes: an interruption loses only the cells running then
        for n, row, error in run_parallel(run_cell, [cells[i] for i in todo], workers):
            if error is not None:
                if isinstance(error, WorkerDied):
                    raise TierflowError(f"cell `{cells[todo[n]].command()}`: {error}")
                raise error
            finished(todo[n], row)
    return rows


# ----------------------------------------------------------------------------------------------- analysis


def _by_key(rows: Iterable[dict]) -> dict[tuple, dict]:
    return {(r["model"], r["variant"], r["batch_size"], r["placement"]): r for r in rows}


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row with its total over the HBM-only row of the same model, variant and batch."""
    index = _by_key(rows)
    out = []
    for row in rows:
        base = index.get((row["model"], row["variant"], row["batch_size"], "hbm"))
        ratio = row["total_j"] / base["total_j"] if base else float("nan")
        out.append({**row, "ratio_to_hbm": ratio})
    return out


def crossover_scale(ssd_row: dict, target_j: float) -> float | None:
    """The SSD read-energy scale at which the SSD cell's total equals ``target_j``; energy is linear in the
    scale, so this is exact. None if no scale in (0, 1] gets there."""
    full, zero = ssd_row["total_j"], ssd_row["total_j"] - ssd_row["ssd_j"]
    if ssd_row["ssd_j"] <= 0 or target_j <= zero:
        return None
    return min(1.0, (target_j - zero) / ssd_row["ssd_j"]) if target_j < full else 1.0


def scaling_rows(rows: list[dict]) -> list[dict]:
    index = _by_key(rows)
    out = []
    for row in rows:
        if row["placement"] != "ssd" or row["variant"] != "paper":
            continue
        key = (row["model"], row["variant"], row["batch_size"])
        ddr, hbm = index[(*key, "ddr")], index[(*key, "hbm")]
        entry = {"model": row["model"], "batch_size": row["batch_size"], "hbm_j": hbm["total_j"],
                 "ddr_j": ddr["total_j"]}
        entry.update({f"ssd_x{scale:.1f}_j": row[f"total_j_ssd_x{scale:.1f}"] for scale in SSD_SCALES})
        entry["scale_matching_ddr"] = crossover_scale(row, ddr["total_j"])
        entry["scale_matching_hbm"] = crossover_scale(row, hbm["total_j"])
        out.append(entry)
    return out


def headline(rows: list[dict]) -> dict:
    """Per model: the peak SSD/HBM and DDR/HBM ratios over batch sizes, and the SSD scales matching DDR."""
    rows = with_ratios([r for r in rows if r["variant"] == "paper"])
    scaling = scaling_rows(rows)
    figures = {}
    for label, _ in MODELS.values():
        mine = [r for r in rows if r["model"] == label]
        peak = {}
        for placement in ("ssd", "ddr"):
            best = max((r for r in mine if r["placement"] == placement), key=lambda r: r["ratio_to_hbm"])
            peak[placement] = {"ratio": best["ratio_to_hbm"], "batch_size": best["batch_size"]}
        scales = {s["batch_size"]: s["scale_matching_ddr"] for s in scaling if s["model"] == label}
        figures[label] = {"peak_ssd_over_hbm": peak["ssd"], "peak_ddr_over_hbm": peak["ddr"],
                          "ssd_scale_matching_ddr": scales,
                          "ssd_scale_matching_hbm": {s["batch_size"]: s["scale_matching_hbm"]
                                                     for s in scaling if s["model"] == label}}
    return figures


# ----------------------------------------------------------------------------------------------- writing


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _plain(row.get(k)) for k in columns})
    return buffer.getvalue()


def _plain(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body]) + "\n"


_ENERGY_COLUMNS = [(f"{name}_j", name) for name in SHOWN]
TABLE_COLUMNS = [("model", "model"), ("placement", "placement"), ("batch_size", "batch"),
                 ("step_latency_ms", "step ms"), *_ENERGY_COLUMNS, ("total_j", "total J/token"),
                 ("ratio_to_hbm", "x HBM")]
BEYOND_COLUMNS = [("model", "model"), ("variant", "variant"), ("placement", "placement"), ("batch_size", "batch"),
                  ("step_latency_ms", "step ms"), ("hit_rate_hbm", "hit rate"), *_ENERGY_COLUMNS,
                  ("total_j", "total J/token"), ("ratio_to_hbm", "x HBM")]


def _write(path: Path, text: str) -> Path:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def write_outputs(paper_rows: list[dict], beyond_rows: list[dict], out: Path) -> list[Path]:
    from tierflow import paper_figures

    output_dir(out)
    paper_rows = with_ratios(paper_rows)
    scaling = scaling_rows(paper_rows)
    written = []
    keys = [k for k, _ in TABLE_COLUMNS] + ["stall_ms", "command"]
    written.append(_write(out / "paper_table.csv", _csv_text(paper_rows, keys)))
    written.append(_write(out / "paper_table.md", _markdown(paper_rows, TABLE_COLUMNS)))
    scale_keys = ["model", "batch_size", "hbm_j", "ddr_j", *(f"ssd_x{s:.1f}_j" for s in SSD_SCALES),
                  "scale_matching_ddr", "scale_matching_hbm"]
    written.append(_write(out / "ssd_scaling.csv", _csv_text(scaling, scale_keys)))
    scale_md = [("model", "model"), ("batch_size", "batch"), ("hbm_j", "HBM J"), ("ddr_j", "DDR J"),
                *((f"ssd_x{s:.1f}_j", f"SSD x{s:.1f}") for s in SSD_SCALES),
                ("scale_matching_ddr", "scale = DDR"), ("scale_matching_hbm", "scale = HBM")]
    shown = [{**row, **{k: "never" for k in ("scale_matching_ddr", "scale_matching_hbm") if row[k] is None}}
             for row in scaling]
    written.append(_write(out / "ssd_scaling.md", _markdown(shown, scale_md)))
    if beyond_rows:
        # The paper's own cells at the same batch sizes lead the table, as the reference.
        reference = [r for r in paper_rows if r["batch_size"] in _beyond_batches(r["model"]) and r["placement"] != "ddr"]
        beyond = with_ratios(reference + beyond_rows)
        written.append(_write(out / "beyond_paper.csv",
                              _csv_text(beyond, [k for k, _ in BEYOND_COLUMNS] + ["stall_ms", "command"])))
        written.append(_write(out / "beyond_paper.md", _markdown(beyond, BEYOND_COLUMNS)))
        written.append(paper_figures.beyond_bars(beyond, out / "beyond_paper.png"))
    written.append(paper_figures.energy_bars(paper_rows, out / "paper_energy.png"))
    written.append(paper_figures.scaling_lines(scaling, out / "ssd_scaling.png"))
    return written
