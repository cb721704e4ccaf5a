"""Figure 3 analogue: supermask dev metric vs final sparsity, the sparsity set by the initialization.

For each task, seed and initial sparsity ``s0`` (the fraction of each matrix's
smallest-magnitude weights that start pruned, ``ν = -5``), one supermask run on
the int8 backbone with the task's recipe. Plots the deterministic-mask metric
(error bars: s.d. over Bernoulli samples) against the final sparsity, and
writes the table. The paper finds little loss between 1 % and 40 % sparsity.

    .venv/bin/python studies/glue/sparsity_sweep.py                       # SST-2 and MRPC, s0 in 0..0.9
    .venv/bin/python studies/glue/sparsity_sweep.py --tasks MRPC --init-sparsities 0 0.5 0.9

Resumable: finished runs (``<out-dir>/runs/*.json``) are read back, not retrained.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from studies.glue import common  # noqa: E402

STEM = "sparsity_sweep"
DEFAULT_INIT_SPARSITIES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)


def build_parser():
    p = common.base_parser(
        "sparsity_sweep.py",
        "Figure 3 analogue: supermask metric vs final sparsity, sweeping the initial sparsity s0 on the int8 "
        "backbone. Writes sparsity_sweep.json / .md / .png under --out-dir.",
        ("SST-2", "MRPC"), "seeds of every run")
    p.set_defaults(seeds=[0])
    p.add_argument("--init-sparsities", nargs="+", type=float, default=list(DEFAULT_INIT_SPARSITIES),
                   metavar="S0", help="initial sparsities s0 in [0, 1)")
    return p


def plan_runs(args) -> list[tuple[str, dict]]:
    for s0 in args.init_sparsities:
        if not 0.0 <= s0 < 1.0:
            raise SystemExit(f"--init-sparsities: {s0} is outside [0, 1)")
    return [("supermask", common.supermask_config(task, seed, args, init_sparsity=float(s0)))
            for task in common.check_tasks(args.tasks) for s0 in args.init_sparsities for seed in args.seeds]


def summarize(records: list[dict], args) -> tuple[list[dict], str]:
    rows = []
    lines = ["| task | metric | init sparsity s0 | final sparsity % | deterministic mask | Bernoulli samples | seeds |",
             "|---|---|---|---|---|---|---|"]
    cells = common.group(records, lambda r: (r["config"]["task"], r["config"]["init_sparsity"]))
    for (task, s0), recs in cells.items():
        metric = common.main_metric(task)
        det = [common.metric_of(r, metric) for r in recs]
        sp = [r["result"]["sparsity"] for r in recs]
        bern = [r["result"].get("bernoulli", {}).get(metric) for r in recs]
        rows.append({"task": task, "metric": metric, "init_sparsity": s0, "final_sparsity": sp, "deterministic": det,
                     "bernoulli": bern, "seeds": [r["seed"] for r in recs]})
        lines.append(f"| {task} | {common.METRIC_LABEL[metric]} | {s0:g} | {common.mean_sd(sp, 2)} | "
                     f"{common.mean_sd(det)} | {common.bernoulli_cell(recs, metric)} | "
                     f"{', '.join(str(r['seed']) for r in recs)} |")
    lines += ["", "Figures in %, GLUE dev. Deterministic mask: mean ± s.d. over seeds.", ""]
    return rows, "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for task, trs in common.group(rows, lambda r: r["task"]).items():
        trs = sorted(trs, key=lambda r: r["init_sparsity"])
        x = [100 * float(np.mean(r["final_sparsity"])) for r in trs]
        y = [100 * float(np.mean(r["deterministic"])) for r in trs]
        err = [100 * float(np.mean([b["std"] for b in r["bernoulli"] if b])) if any(r["bernoulli"]) else 0.0
               for r in trs]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3,
                    label=f"{task} ({common.METRIC_LABEL[trs[0]['metric']]})")
        for xi, yi, r in zip(x, y, trs):
            ax.annotate(f"s0={r['init_sparsity']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("final sparsity of the deterministic mask (%)")
    ax.set_ylabel("GLUE dev metric (%)")
    ax.set_title("Supermask metric vs sparsity (int8 backbone)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(args, command: str) -> dict:
    records = common.run_all(plan_runs(args), args, command, "sparsity sweep runs")
    rows, body = summarize(records, args)
    png = Path(args.out_dir) / f"{STEM}.png"
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    if plot(rows, png):
        body = f"![metric vs sparsity]({png.name})\n\n{body}"
    body = common.smoke_note(args) + body
    json_path, md_path = common.write_report(args.out_dir, STEM, "Sparsity sweep (paper Figure 3 analogue)", command,
                                             body, {"rows": rows, "missing_runs": args.missing_runs}, records)
    return {"records": records, "rows": rows, "json": str(json_path), "md": str(md_path)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup(args)
    out = run(args, common.command_line("sparsity_sweep.py", argv))
    print(Path(out["md"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
