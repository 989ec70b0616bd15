"""Regenerate tests/golden/kyung_paper.json: every cell of the Kyung et al. reproduction (`tierflow paper`
without the beyond-the-paper variants) and its headline figures.

    python scripts/regen_kyung_golden.py

Rerun after a deliberate change to the simulator or the kyung2025 profiles, and say in the commit why the
numbers moved.
"""

import json
from pathlib import Path

from tierflow import paper

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden" / "kyung_paper.json"
KEYS = ("step_latency_ms", "total_j", *(f"{name}_j" for name in paper.SHOWN))


def main() -> None:
    rows = paper.run_cells(paper.paper_cells())
    cells = [{"model": r["model"], "placement": r["placement"], "batch_size": r["batch_size"],
              **{k: r[k] for k in KEYS}} for r in rows]
    document = {"cells": cells, "headline": paper.headline(rows), "regenerate": "python scripts/regen_kyung_golden.py"}
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({len(cells)} cells)")


if __name__ == "__main__":
    main()
