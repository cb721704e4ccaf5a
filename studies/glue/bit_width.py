"""Essay Table 1 analogue (Wang 2020): supermasks over pre-trained weights quantized to fewer bits.

For each task, seed and bit width ``b``, one supermask run (``s0 = 0``, the
task's recipe) with the masked matrices quantized symmetrically per output
channel to ``b`` bits (``b = 1``: sign × the row's mean |W|), or left in fp32
(``b = 32``, "none"). The essay finds 8- and 4-bit weights fine-tune MRPC as
well as fp32, and 2- and 1-bit weights fail.

    .venv/bin/python studies/glue/bit_width.py                        # MRPC and SST-2, bits 32 8 4 2 1
    .venv/bin/python studies/glue/bit_width.py --tasks MRPC --seeds 0 1 2

Resumable: finished runs (``<out-dir>/runs/*.json``) are read back, not retrained.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from studies.glue import common  # noqa: E402

STEM = "bit_width"
DEFAULT_BITS = (32, 8, 4, 2, 1)


def bits_label(b: int) -> str:
    return "none (fp32)" if b == 32 else f"{b}-bit"


def build_parser():
    p = common.base_parser(
        "bit_width.py",
        "Essay Table 1 analogue: supermask metric per bit width of the backbone's masked weights "
        "(32 = fp32, 8, 4, 2, 1). Writes bit_width.json / .md under --out-dir.",
        ("MRPC", "SST-2"), "seeds of every run")
    p.set_defaults(seeds=[0])
    p.add_argument("--bits", nargs="+", type=int, default=list(DEFAULT_BITS), metavar="B",
                   help="bit widths: 1..8, or 32 for un-quantized fp32 weights")
    return p


def plan_runs(args) -> list[tuple[str, dict]]:
    for b in args.bits:
        if not (1 <= b <= 8 or b == 32):
            raise SystemExit(f"--bits: {b} is not in 1..8 or 32")
    return [("supermask", common.supermask_config(task, seed, args, bits=b))
            for task in common.check_tasks(args.tasks) for b in args.bits for seed in args.seeds]


def summarize(records: list[dict], args) -> tuple[list[dict], str]:
    tasks = common.check_tasks(args.tasks)
    cells = common.group(records, lambda r: (r["config"]["bits"], r["config"]["task"]))
    rows = []
    head = " | ".join(f"{t} {common.METRIC_LABEL[common.main_metric(t)]}: deterministic / Bernoulli / sparsity %"
                      for t in tasks)
    lines = [f"| weights | {head} |", "|---|" + "---|" * len(tasks)]
    for b in args.bits:
        parts = []
        for t in tasks:
            recs = cells.get((b, t), [])
            metric = common.main_metric(t)
            det = [common.metric_of(r, metric) for r in recs]
            sp = [r["result"]["sparsity"] for r in recs]
            rows.append({"bits": b, "task": t, "metric": metric, "deterministic": det, "sparsity": sp,
                         "bernoulli": [r["result"].get("bernoulli", {}).get(metric) for r in recs],
                         "seeds": [r["seed"] for r in recs]})
            parts.append(f"{common.mean_sd(det)} / {common.bernoulli_cell(recs, metric)} / {common.mean_sd(sp, 2)}")
        lines.append(f"| {bits_label(b)} | " + " | ".join(parts) + " |")
    maj = {t: common.majority_baseline(t, args.data_dir, args.dev_limit) for t in tasks}
    lines += ["", "Figures in %, GLUE dev, mean ± s.d. over seeds "
              f"({', '.join(map(str, args.seeds))}). Majority class: "
              + ", ".join(f"{t} {common.pct(m.get(common.main_metric(t)))}" for t, m in maj.items() if m) + ".",
              "Quantization: symmetric per output channel, scale = max|W| / (2^(b-1) − 1); 1-bit: sign × mean|W| "
              "per row. fp32 masks the checkpoint's weights (the bundle keeps the int8 fingerprint).", ""]
    return rows, "\n".join(lines)


def run(args, command: str) -> dict:
    records = common.run_all(plan_runs(args), args, command, "bit-width runs")
    rows, body = summarize(records, args)
    body = common.smoke_note(args) + body
    json_path, md_path = common.write_report(args.out_dir, STEM, "Bit width of the masked weights (Wang 2020, Table 1 "
                                             "analogue)", command, body,
                                             {"rows": rows, "missing_runs": args.missing_runs}, records)
    return {"records": records, "rows": rows, "json": str(json_path), "md": str(md_path)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup(args)
    out = run(args, common.command_line("bit_width.py", argv))
    print(Path(out["md"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
