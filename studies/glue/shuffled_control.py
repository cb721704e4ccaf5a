"""Shuffled-weights control (paper Section 4.4): are good supermasks a property of pre-training?

For each task and seed, two supermask runs with the same recipe (``s0 = 0``,
int8): one on the pre-trained backbone, one on the backbone whose masked
matrices each had their entries randomly permuted (norm-preserving;
``training.controls.shuffle_masked_weights``, permutation seeded by the run's
seed). The paper: MRPC F1 91.3 → 81.2 with shuffled weights.

    .venv/bin/python studies/glue/shuffled_control.py                 # MRPC and SST-2
    .venv/bin/python studies/glue/shuffled_control.py --tasks MRPC --seeds 0 1 2

Resumable: finished runs (``<out-dir>/runs/*.json``) are read back, not retrained.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from studies.glue import common  # noqa: E402

STEM = "shuffled_control"


def build_parser():
    p = common.base_parser(
        "shuffled_control.py",
        "Paper §4.4 control: supermask training on the pre-trained int8 backbone vs on the same backbone with "
        "each masked matrix's entries randomly permuted. Writes shuffled_control.json / .md under --out-dir.",
        ("MRPC", "SST-2"), "seeds of every run (default: 0 1 2 for MRPC, 0 for SST-2, as in Table A)")
    return p


def plan_runs(args) -> list[tuple[str, dict]]:
    plan = []
    for task in common.check_tasks(args.tasks):
        for seed in args.seeds or list(common.RECIPES[task].seeds):
            for shuffled in (False, True):
                plan.append(("supermask", common.supermask_config(task, seed, args, shuffle_weights=shuffled)))
    return plan


def summarize(records: list[dict], args) -> tuple[list[dict], str]:
    rows = []
    lines = ["| task | metric | majority class | pre-trained weights | shuffled weights | drop (points) "
             "| sparsity % pre-trained / shuffled | seeds |", "|---|---|---|---|---|---|---|---|"]
    by_task = common.group(records, lambda r: r["config"]["task"])
    for task in common.check_tasks(args.tasks):
        recs = by_task.get(task, [])
        metric = common.main_metric(task)
        real = [r for r in recs if not r["config"]["shuffle_weights"]]
        shuf = [r for r in recs if r["config"]["shuffle_weights"]]
        a = [common.metric_of(r, metric) for r in real]
        b = [common.metric_of(r, metric) for r in shuf]
        drop = 100 * (sum(a) / len(a) - sum(b) / len(b)) if a and b else None
        maj = common.majority_baseline(task, args.data_dir, args.dev_limit)
        rows.append({"task": task, "metric": metric, "pretrained": a, "shuffled": b, "drop_points": drop,
                     "sparsity_pretrained": [r["result"]["sparsity"] for r in real],
                     "sparsity_shuffled": [r["result"]["sparsity"] for r in shuf], "majority": maj,
                     "bernoulli_pretrained": [r["result"].get("bernoulli", {}).get(metric) for r in real],
                     "bernoulli_shuffled": [r["result"].get("bernoulli", {}).get(metric) for r in shuf]})
        lines.append(
            f"| {task} | {common.METRIC_LABEL[metric]} | {common.pct(maj.get(metric)) if maj else '–'} "
            f"| {common.mean_sd(a)} | {common.mean_sd(b)} | {'–' if drop is None else f'{drop:.1f}'} "
            f"| {common.mean_sd(rows[-1]['sparsity_pretrained'], 2)} / "
            f"{common.mean_sd(rows[-1]['sparsity_shuffled'], 2)} "
            f"| {', '.join(str(s) for s in sorted({r['seed'] for r in recs}))} |")
    lines += ["", "Figures in %, GLUE dev, deterministic mask, mean ± s.d. over seeds. Paper (BERT-base): MRPC F1 "
              "91.3 → 81.2.", ""]
    return rows, "\n".join(lines)


def run(args, command: str) -> dict:
    records = common.run_all(plan_runs(args), args, command, "shuffled-control runs")
    rows, body = summarize(records, args)
    body = common.smoke_note(args) + body
    json_path, md_path = common.write_report(args.out_dir, STEM, "Shuffled pre-trained weights (paper §4.4 control)",
                                             command, body, {"rows": rows, "missing_runs": args.missing_runs}, records)
    return {"records": records, "rows": rows, "json": str(json_path), "md": str(md_path)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup(args)
    out = run(args, common.command_line("shuffled_control.py", argv))
    print(Path(out["md"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
