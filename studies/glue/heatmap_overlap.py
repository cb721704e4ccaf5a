"""Figure 4 and Figure 6 analogues: where trained supermasks prune, and whether tasks prune the same weights.

Reads task bundles (no training; nothing to resume):

* **Heat map** (paper Figure 4): sparsity of each masked matrix, per encoder
  layer (rows) × matrix kind (columns W_Q, W_K, W_V, W_D, W_I, W_O), per task.
  The paper finds W_Q, W_K, W_I sparser than W_V, W_D, W_O, and shallow layers
  sparser than deep ones.
* **Overlap** (paper Figure 6): for tasks i (row) and j (column), the fraction of
  the weights pruned by task j that task i prunes too,
  ``|P_i ∧ P_j| / |P_j|``, against the fraction expected by chance if the two
  masks were independent — task i's sparsity, ``|P_i| / n``. Computed on one
  matrix (default: layer 0 W_V, the paper's choice) and over all masked matrices,
  where chance is ``Σ_m |P_i,m|·|P_j,m| / n_m / Σ_m |P_j,m|`` (independence within
  each matrix, so the layer-wise sparsity pattern alone is not counted as overlap).

    .venv/bin/python studies/glue/heatmap_overlap.py                          # the shipped examples/masks
    .venv/bin/python studies/glue/heatmap_overlap.py --bundles A.smask B.smask --matrix <masked matrix name>
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from studies.glue import common  # noqa: E402

STEM = "heatmap_overlap"
DEFAULT_BUNDLES = common.REPO / "examples" / "masks"
DEFAULT_MATRIX = "encoder.layer.0.attention.self.value.weight"
#: BERT module path inside a layer -> the paper's name of the matrix (column order of the heat map)
MATRIX_LABELS = {"attention.self.query": "W_Q", "attention.self.key": "W_K", "attention.self.value": "W_V",
                 "attention.output.dense": "W_D", "intermediate.dense": "W_I", "output.dense": "W_O"}
_LAYER_RE = re.compile(r"(?:^|\.)layer\.(\d+)\.(.+?)(?:\.weight)?$")


def sparsity_grid(masks: list[tuple[str, float]]) -> tuple[np.ndarray, list[int], list[str]]:
    """Per-layer × per-matrix sparsity from ``(mask name, sparsity)`` pairs (a bundle header's masks).

    Returns:
        ``(grid, layers, columns)``: float ``[len(layers), len(columns)]`` (NaN where a layer lacks
        that matrix), the layer indices, and the column labels (``W_Q … W_O`` for BERT; unknown
        module paths keep their own name, in order of first appearance).
    Raises:
        ValueError: a mask name has no ``layer.<i>.`` part.
    """
    parsed = []
    for name, sparsity in masks:
        m = _LAYER_RE.search(name)
        if m is None:
            raise ValueError(f"mask {name!r} is not inside an encoder layer ('layer.<i>.' expected)")
        parsed.append((int(m.group(1)), MATRIX_LABELS.get(m.group(2), m.group(2)), float(sparsity)))
    layers = sorted({p[0] for p in parsed})
    known = [c for c in MATRIX_LABELS.values() if any(p[1] == c for p in parsed)]
    columns = known + [c for c in dict.fromkeys(p[1] for p in parsed) if c not in known]
    grid = np.full((len(layers), len(columns)), np.nan)
    for layer, col, s in parsed:
        grid[layers.index(layer), columns.index(col)] = s
    return grid, layers, columns


def pruned_overlap(pruned: dict[str, list[np.ndarray]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pairwise overlap of pruned positions across tasks, and what chance predicts.

    Args:
        pruned: task -> list of bool arrays (True = pruned), one per matrix, in the same
            order and with the same shapes for every task.
    Returns:
        ``(tasks, observed, chance)``, both ``[T, T]``: ``observed[i, j] = Σ_m |P_i,m ∧ P_j,m| / Σ_m |P_j,m|``
        (fraction of task j's pruned weights that task i prunes too) and
        ``chance[i, j] = Σ_m |P_i,m|·|P_j,m| / n_m / Σ_m |P_j,m|`` (task i's sparsity, for one matrix).
        NaN in column j when task j prunes nothing.
    Raises:
        ValueError: tasks with different numbers or shapes of matrices.
    """
    tasks = list(pruned)
    ref = [a.shape for a in pruned[tasks[0]]]
    for t in tasks:
        if [a.shape for a in pruned[t]] != ref:
            raise ValueError(f"task {t!r}: matrix shapes {[a.shape for a in pruned[t]]} differ from {ref}")
    count = np.array([[float(a.sum()) for a in pruned[t]] for t in tasks])  # [T, M]
    sizes = np.array([float(np.prod(s)) for s in ref])  # [M]
    both = np.zeros((len(tasks), len(tasks)))
    for i, ti in enumerate(tasks):
        for j, tj in enumerate(tasks):
            both[i, j] = sum(float(np.logical_and(a, b).sum()) for a, b in zip(pruned[ti], pruned[tj]))
    denom = count.sum(axis=1)  # [T], pruned weights of task j
    expected = (count / sizes) @ count.T  # [T, T]: Σ_m |P_i,m| |P_j,m| / n_m
    with np.errstate(divide="ignore", invalid="ignore"):
        observed = np.where(denom[None, :] > 0, both / denom[None, :], np.nan)
        chance = np.where(denom[None, :] > 0, expected / denom[None, :], np.nan)
    return tasks, observed, chance


def load_bundles(paths: list[str], tasks: list[str] | None) -> dict[str, object]:
    """Decoded bundles by task name, from files and folders of ``*.smask``; one per task, one backbone."""
    from mask_store.format import decode_bundle

    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.smask")) if p.is_dir() else [p]
    wanted = {t.lower() for t in tasks} if tasks else None
    out: dict[str, object] = {}
    for f in files:
        b = decode_bundle(f.read_bytes())
        task = b.header.task
        if wanted is not None and task.lower() not in wanted:
            continue
        if task in out:
            raise SystemExit(f"two bundles for task {task!r} ({f} and an earlier one); pass one bundle per task")
        out[task] = b
    if not out:
        raise SystemExit(f"no bundles found in {', '.join(paths)}" + (f" for tasks {tasks}" if tasks else ""))
    fps = {b.header.backbone_fingerprint for b in out.values()}
    if len(fps) > 1:
        raise SystemExit("the bundles were trained for different backbones (fingerprints "
                         f"{sorted(f[:12] for f in fps)}); masks are only comparable on one backbone")
    return out


def _pruned(bundle, names: list[str]) -> list[np.ndarray]:
    return [~bundle.mask_array(n) for n in names]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="heatmap_overlap.py",
        description="Figure 4 / Figure 6 analogues from trained bundles (no training, so no --seeds/--max-steps): "
        "per-layer × per-matrix sparsity heat map, and pairwise overlap of pruned positions across tasks vs "
        "chance. Writes heatmap_overlap.json / .md, sparsity_heatmap.png and mask_overlap.png under --out-dir.",
        formatter_class=common.HelpFormatter)
    p.add_argument("--bundles", nargs="+", default=[str(DEFAULT_BUNDLES)], metavar="PATH",
                   help="bundle files or folders of *.smask, one bundle per task, all for one backbone")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="only these tasks (default: every bundle found)")
    p.add_argument("--matrix", default=DEFAULT_MATRIX, help="the matrix of the single-matrix overlap")
    p.add_argument("--out-dir", default=str(common.DEFAULT_OUT_DIR), help="results folder")
    return p


def _fmt_grid(task: str, grid: np.ndarray, layers: list[int], columns: list[str], sparsity: float) -> list[str]:
    lines = [f"**{task}** (global sparsity {100 * sparsity:.2f} %)", "", "| layer | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for r, layer in enumerate(layers):
        lines.append(f"| {layer} | " + " | ".join(common.pct(v, 2) for v in grid[r]) + " |")
    return lines + [""]


def _fmt_overlap(tasks: list[str], observed: np.ndarray, chance: np.ndarray) -> list[str]:
    lines = ["| also pruned in ↓ / pruned by → | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for i, ti in enumerate(tasks):
        cells = ["—" if i == j else f"{common.pct(observed[i, j])} ({common.pct(chance[i, j])})"
                 for j in range(len(tasks))]
        lines.append(f"| {ti} | " + " | ".join(cells) + " |")
    return lines + ["", "Each cell: observed % (chance %).", ""]


def plot_heatmaps(grids: dict[str, tuple[np.ndarray, list[int], list[str]]], path: Path) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    n = len(grids)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n + 1.0, 3.6), squeeze=False)
    vals = np.concatenate([g[0].ravel() for g in grids.values()])
    vals = vals[np.isfinite(vals)]
    vmax = 100 * float(vals.max()) if vals.size and vals.max() > 0 else 1.0
    im = None
    for ax, (task, (grid, layers, columns)) in zip(axes[0], grids.items()):
        im = ax.imshow(100 * grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=8)
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
        ax.set_title(task, fontsize=10)
        for r in range(grid.shape[0]):
            for c in range(grid.shape[1]):
                if not np.isnan(grid[r, c]):
                    ax.text(c, r, f"{100 * grid[r, c]:.1f}", ha="center", va="center", fontsize=6, color="w")
    axes[0][0].set_ylabel("encoder layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="sparsity (%)", shrink=0.8)
    fig.suptitle("Supermask sparsity per layer and matrix")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_overlap(scopes: dict[str, tuple[list[str], np.ndarray, np.ndarray]], path: Path) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(len(scopes), 2, figsize=(9.5, 4.2 * len(scopes)), squeeze=False)
    for row, (scope, (tasks, observed, chance)) in zip(axes, scopes.items()):
        off = ~np.eye(len(tasks), dtype=bool)
        vals = np.concatenate([observed[off], chance[off]])
        vals = vals[np.isfinite(vals)]
        vmax = 100 * float(vals.max()) if vals.size and vals.max() > 0 else 1.0
        for ax, (label, mat) in zip(row, (("observed", observed), ("expected by chance", chance))):
            shown = np.where(np.eye(len(tasks), dtype=bool), np.nan, mat) * 100
            im = ax.imshow(shown, cmap="magma", vmin=0, vmax=vmax)
            ax.set_xticks(range(len(tasks)), tasks, rotation=45, fontsize=8)
            ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
            ax.set_xlabel("pruned by")
            ax.set_ylabel("also pruned in")
            ax.set_title(f"{scope}: {label}", fontsize=9)
            for i in range(len(tasks)):
                for j in range(len(tasks)):
                    if i != j and not np.isnan(shown[i, j]):
                        ax.text(j, i, f"{shown[i, j]:.1f}", ha="center", va="center", fontsize=7,
                                color="k" if shown[i, j] > 0.6 * vmax else "w")
            fig.colorbar(im, ax=ax, label="% of pruned weights", shrink=0.8)
    fig.suptitle("Overlap of pruned positions across tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(args, command: str) -> dict:
    bundles = load_bundles(args.bundles, args.tasks)
    order = [t for t in common.ALL_TASKS if t in bundles] + sorted(t for t in bundles if t not in common.ALL_TASKS)
    grids = {t: sparsity_grid([(m.name, m.sparsity) for m in bundles[t].header.masks]) for t in order}
    names = [m.name for m in bundles[order[0]].header.masks]
    if args.matrix not in names:
        raise SystemExit(f"--matrix {args.matrix!r} is not a masked matrix; e.g. {names[0]!r}")
    scopes = {}
    single = {t: _pruned(bundles[t], [args.matrix]) for t in order}
    scopes[args.matrix.removesuffix(".weight")] = pruned_overlap(single)
    if len(names) > 1:
        scopes["all masked matrices"] = pruned_overlap({t: _pruned(bundles[t], names) for t in order})

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = ["## Sparsity per layer and matrix (Figure 4 analogue)", ""]
    if plot_heatmaps(grids, out / "sparsity_heatmap.png"):
        body += ["![sparsity heat map](sparsity_heatmap.png)", ""]
    for t in order:
        body += _fmt_grid(t, *grids[t], bundles[t].header.sparsity)
    body += ["## Overlap of pruned positions across tasks (Figure 6 analogue)", ""]
    if len(order) > 1 and plot_overlap(scopes, out / "mask_overlap.png"):
        body += ["![mask overlap](mask_overlap.png)", ""]
    for scope, (tasks, observed, chance) in scopes.items():
        body += [f"**{scope}**", "", *_fmt_overlap(tasks, observed, chance)]
    body += ["Chance = the fraction expected if the row task pruned independently of the column task with its own "
             "sparsity (per matrix, summed over matrices for the all-matrices scope).", "",
             "Bundles: " + ", ".join(f"{t} (sparsity {100 * bundles[t].header.sparsity:.2f} %, trained "
                                     f"{bundles[t].header.created_at or '?'})" for t in order)]
    data = {"bundles": {t: {"sparsity": bundles[t].header.sparsity,
                            "training": bundles[t].header.training.get("config"),
                            "metrics": bundles[t].header.metrics} for t in order},
            "heatmap": {t: {"layers": g[1], "columns": g[2], "sparsity": g[0].tolist()} for t, g in grids.items()},
            "overlap": {s: {"tasks": v[0], "observed": v[1].tolist(), "chance": v[2].tolist()}
                        for s, v in scopes.items()}}
    json_path, md_path = common.write_report(out, STEM, "Layer-wise sparsity and task overlap of supermasks", command,
                                             "\n".join(body), data, [])
    return {"grids": grids, "scopes": scopes, "json": str(json_path), "md": str(md_path)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common.setup(args)
    out = run(args, common.command_line("heatmap_overlap.py", argv))
    print(Path(out["md"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
