"""The acceptance table: the served supermask against the best-chosen fine-tuning baseline we have, per task.

Reads only what the study scripts wrote (no training, no evaluation):

- supermask, served: the configuration ``recipe_sweep.py`` chose on held-out data
  (``recipe_sweep-<TASK>.json``, mean ± s.d. of dev over its seeds); a task without such a sweep falls back
  to Table A's recipe (``table_a.json``: trained on every train row, not chosen on held-out data), and says so;
- the shipped bundle (``examples/masks/<TASK>.smask``): the dev figure its header records, which the server
  reproduces (``tests/integration/test_real_backbone.py``);
- fine-tuning: the learning rate and epoch ``baseline_sweep.py`` chose on held-out data
  (``baseline_sweep-*.json``), else Table A's single baseline (lr 5e-5, 3 epochs, seed 0, every train row),
  else (SST-2) the budget-matched baseline of ``sst2_baseline_2000steps.json``.

    .venv/bin/python studies/glue/acceptance.py

The targets are the issue's: within 2.0 points of fine-tuning on SST-2, MRPC and STS-B, within 4.0 on RTE
and CoLA, RTE above its majority class, CoLA MCC ≥ 30.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from studies.glue import common  # noqa: E402

STEM = "acceptance"
TASKS = ("SST-2", "MRPC", "STS-B", "RTE", "CoLA")
#: the largest gap (points, supermask served − fine-tuning) the issue accepts
TARGET_GAP = {"SST-2": 2.0, "MRPC": 2.0, "STS-B": 2.0, "RTE": 4.0, "CoLA": 4.0}
#: absolute floors (fractions) the issue sets
FLOORS = {"CoLA": ("MCC ≥ 30", 0.30)}
#: fine-tuning results written by ``python -m training.finetune -o`` where no sweep or Table A run exists
BUDGET_MATCHED = {"SST-2": "sst2_baseline_2000steps.json"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="acceptance.py", formatter_class=common.HelpFormatter,
                                description="Served supermask vs the recorded fine-tuning baseline (chosen on held-out where swept) per "
                                            "GLUE task, from the study scripts' JSON records (trains nothing). "
                                            "Writes acceptance.json / .md under --out-dir.")
    p.add_argument("--results-dir", default=str(common.DEFAULT_OUT_DIR),
                   help="where recipe_sweep-*.json, baseline_sweep-*.json and table_a.json are")
    p.add_argument("--masks-dir", default=str(common.REPO / "examples" / "masks"), help="the shipped bundles")
    p.add_argument("--data-dir", default=str(common.DEFAULT_DATA_DIR), help="GLUE data (for the majority class)")
    p.add_argument("--out-dir", default=str(common.DEFAULT_OUT_DIR), help="where acceptance.json / .md go")
    return p


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


_SHORTENED = ("train_limit", "dev_limit", "max_steps")


def _sweeps(results: Path, prefix: str, task: str) -> list[tuple[Path, dict]]:
    """The ``<prefix>-*.json`` reports that cover ``task``: ``<prefix>-<task>.json`` first, then multi-task
    ones by name. Smoke reports (a run with a train or dev limit, or a fine-tuning run cut short by
    ``--max-steps``) are skipped: their figures are not the task's."""
    named = [results / f"{prefix}-{task}.json"] + sorted(
        p for p in results.glob(f"{prefix}-*.json") if task in p.stem.split("-", 1)[1].split("-") and
        p.name != f"{prefix}-{task}.json")
    out = []
    for path in named:
        doc = _load(path)
        if doc is None:
            continue
        shortened = any(r["config"].get(k) for r in doc.get("runs", []) for k in _SHORTENED
                        if r["config"].get("task") == task and not (k == "max_steps" and r["kind"] == "supermask"))
        if not shortened:
            out.append((path, doc))
    return out


def supermask_row(task: str, results: Path) -> dict | None:
    """``{"dev", "bernoulli", "source", "config"}`` of the served supermask for ``task`` (fractions)."""
    chosen = [(path, r) for path, doc in _sweeps(results, "recipe_sweep", task) for r in doc.get("rows", [])
              if r.get("chosen") and r.get("task", task) == task]
    if chosen:
        path, r = chosen[0]
        return {"dev": r["dev"], "bernoulli": [b for b in r.get("bernoulli", []) if b is not None],
                "heldout": r["heldout"], "seeds": r["seeds"], "source": f"{path.name}, chosen on held-out",
                "config": f"ν lr {r['mask_lr']:g}, {r['length']}, max len {r['max_len']}, {r['mask_rule']} rule"
                          + (f", STE {r['ste']}" if r.get("ste", "identity") != "identity" else "")}
    table = _load(results / "table_a.json")
    for r in (table or {}).get("rows", []):
        if r["task"] == task and r["supermask"]:
            return {"dev": r["supermask"], "bernoulli": [b["mean"] for b in r["bernoulli"] if b],
                    "heldout": [], "seeds": r["seeds"], "source": "table_a.json (every train row; not chosen on held-out)",
                    "config": "Table A recipe"}
    return None


def finetune_row(task: str, results: Path) -> dict | None:
    """``{"dev", "source", "config"}`` of the fine-tuning baseline for ``task``, by precedence: the held-out
    choice of a sweep, Table A's single run, the budget-matched run (figures as fractions). Precedence, not
    the best dev figure: choosing the baseline on dev would be selection on dev."""
    for path, doc in _sweeps(results, "baseline_sweep", task):
        chosen = doc.get("chosen", {}).get(task)
        if chosen:
            return {"dev": chosen["dev"], "seeds": chosen["seeds"], "source": f"{path.name}, chosen on held-out",
                    "config": f"lr {chosen['lr']:g}, {chosen['epoch']} epochs (of the sweep's run length)"}
    table = _load(results / "table_a.json")
    for r in (table or {}).get("rows", []):
        if r["task"] == task and r["finetune"]:
            return {"dev": r["finetune"], "seeds": [0], "source": "table_a.json (one seed, not swept)",
                    "config": "lr 5e-5, 3 epochs"}
    budget = _load(results / BUDGET_MATCHED.get(task, "-"))
    if budget:  # SST-2: the 3-epoch baseline is hours on 2 cores; this one has the supermask's budget
        c = budget["config"]
        return {"dev": [budget["dev_metrics"][common.main_metric(task)]], "seeds": [c["seed"]],
                "source": f"{BUDGET_MATCHED[task]} (budget-matched: the supermask's steps and max length; one seed)",
                "config": f"lr {c['lr']:g}, {c['max_steps']} steps, max len {c['max_seq_length']}"}
    return None


def shipped_dev(task: str, masks: Path) -> tuple[float | None, str]:
    """The shipped bundle's recorded served dev figure and how it was chosen."""
    from mask_store.format import read_header_file

    path = masks / f"{task}.smask"
    if not path.is_file():
        return None, "none shipped"
    h = read_header_file(str(path))
    m = common.main_metric(task)
    how = ("chosen on held-out" if (h.training.get("config") or {}).get("heldout_fraction")
           else "mask trained on every train row")
    return h.metrics.get("deterministic", {}).get(m), how


def build(args: argparse.Namespace) -> tuple[list[dict], str]:
    results, masks = Path(args.results_dir), Path(args.masks_dir)
    rows, lines = [], [
        "| task | metric | supermask, served (dev) | Bernoulli mean (paper's measure) | shipped bundle (dev) | "
        "fine-tuning (dev) | gap, served − fine-tuning | target | met | other target |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for task in TASKS:
        m = common.main_metric(task)
        sm, ft = supermask_row(task, results), finetune_row(task, results)
        ship, how = shipped_dev(task, masks)
        # rounded as shown: a gap printed as -2.0 meets a 2.0-point target (100 * (0.83 - 0.85) is -2.0000000000000018)
        gap = round(100 * (float(np.mean(sm["dev"])) - float(np.mean(ft["dev"]))), 1) if sm and ft else None
        met = None if gap is None else gap >= -TARGET_GAP[task]
        other = ""
        if task == "RTE":
            maj = common.majority_baseline(task, args.data_dir)
            if maj and sm:
                above = float(np.mean(sm["dev"])) > maj[m]
                other = f"above majority class {common.pct(maj[m])}: **{'met' if above else 'not met'}**"
        if task in FLOORS and sm:
            label, floor = FLOORS[task]
            other = f"{label}: **{'met' if float(np.mean(sm['dev'])) >= floor else 'not met'}**"
        rows.append({"task": task, "metric": m, "supermask": sm, "finetune": ft, "shipped_dev": ship,
                     "shipped_how": how, "gap_points": gap, "target_points": TARGET_GAP[task], "met": met,
                     "other": other})
        lines.append(
            f"| {task} | {common.METRIC_LABEL[m]} | "
            + (f"{common.mean_sd(sm['dev'])} ({sm['config']}; seeds {' '.join(map(str, sm['seeds']))})" if sm else "–")
            + f" | {common.mean_sd(sm['bernoulli']) if sm else '–'} | {common.pct(ship)} ({how}) | "
            + (f"{common.mean_sd(ft['dev'])} ({ft['config']}; seeds {' '.join(map(str, ft['seeds']))})" if ft else "–")
            + f" | {'–' if gap is None else f'{gap:+.1f}'} | ≥ −{TARGET_GAP[task]:.1f} | "
            + ("–" if met is None else f"**{'met' if met else 'not met'}**") + f" | {other} |")
    lines += ["", "Sources:", ""] + [
        f"- {r['task']}: supermask from {r['supermask']['source'] if r['supermask'] else '–'}; fine-tuning from "
        f"{r['finetune']['source'] if r['finetune'] else '–'}" for r in rows]
    lines += ["", "GLUE dev, %, mean ± s.d. over seeds. Served: the deterministic mask the server runs over the "
              "int8 backbone, with its refitted head where the run has one. Fine-tuning: every weight from the "
              "fp32 checkpoint."]
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows, body = build(args)
    common.write_rows_report("acceptance.py", STEM, "Acceptance: served supermask vs fine-tuning (GLUE dev)", argv,
                             args.out_dir, body, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
