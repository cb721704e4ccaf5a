#!/usr/bin/env bash
# Every check that needs a GPU, on a machine that may have no network: the test suite (CUDA kernels
# and the GPU task cache included), the kernel benchmark (benchmarks/gpu.py) and the end-to-end server
# benchmark on random-weight MiniLM- and BERT-base-shaped backbones (benchmarks/serve_cpu.py --synthetic).
#
#   bash scripts/gpu_check.sh OUT_DIR [STAGE ...]     STAGE: env tests bench serve (default: all four)
#
# Python: $PYTHON, else ./.venv/bin/python, else python3; it must hold a CUDA build of torch (and
# triton for the fused kernel). Without network, run scripts/gpu_pack.sh on a machine with it first
# and bring ./.gpu along: its wheels are installed to a temporary folder put on PYTHONPATH, its
# tokenizer replaces the backbone package's. Figures and logs go to OUT_DIR: pytest.log (tests),
# gpu-<time>.json/.md (bench), serve_cuda_minilm.json/.md and serve_cuda_bert-base.json/.md (serve). Every stage runs
# even if one before it failed; the exit code is nonzero if any failed. GPU_CHECK_WHEELS: another
# wheel folder than .gpu/wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
OUT_DIR=$1
shift
STAGES=("$@")
[[ ${#STAGES[@]} -eq 0 ]] && STAGES=(env tests bench serve)
for stage in "${STAGES[@]}"; do
  case $stage in
    env | tests | bench | serve) ;;
    *) echo "gpu_check: unknown stage $stage (env, tests, bench, serve)" >&2; exit 1 ;;
  esac
done
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WHEELS=${GPU_CHECK_WHEELS:-.gpu/wheels}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=$(mktemp -d /tmp/supermask-site.XXXX)
  echo "gpu_check: installing $(ls "$WHEELS" | wc -l) packed wheels into $SITE" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check: installing $WHEELS failed: packed for another Python? ($("$PY" --version);" \
              "scripts/gpu_pack.sh takes GPU_PYTHON_VERSION)" >&2; exit 1; }
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
TOKENIZER_ARGS=()
if [[ -d .gpu/tokenizer ]]; then
  export SUPERMASK_TEST_TOKENIZER_DIR=$PWD/.gpu/tokenizer
  TOKENIZER_ARGS=(--tokenizer-dir "$PWD/.gpu/tokenizer")
fi
DATA_DIR=../shared/data/glue
[[ -d .gpu/glue ]] && DATA_DIR=.gpu/glue

declare -A RC
run_stage() {
  local name=$1
  shift
  echo "=== gpu_check: $name: $*" >&2
  "$@"
  RC[$name]=$?
  echo "=== gpu_check: $name exited ${RC[$name]}" >&2
}

stage_env() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" - <<'EOF'
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}; torch {torch.__version__}; cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device {torch.cuda.get_device_name(0)}; capability {torch.cuda.get_device_capability(0)}")
missing = []
for mod in ("transformers", "tokenizers", "fastapi", "uvicorn", "pydantic", "pydantic_settings", "bitarray",
            "zstandard", "prometheus_client", "safetensors", "numpy", "tqdm", "httpx", "scipy", "pytest", "triton"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod} {getattr(m, '__version__', '?')}")
    except ImportError as exc:
        missing.append(f"{mod} ({exc})")
if missing:
    sys.exit("missing: " + "; ".join(missing) + " (scripts/gpu_pack.sh packs them)")
if not torch.cuda.is_available():
    sys.exit("torch.cuda.is_available() is False: not a GPU machine, or a CPU build of torch")
# compile and launch the fused kernel once: triton builds its launcher with a C compiler and Python.h
from service.kernels import triton_masked as tm
from service.kernels.packing import pack_bits
from service.kernels.reference import masked_linear_reference
g = torch.Generator(device="cuda").manual_seed(0)
w_q = torch.randint(-127, 128, (64, 96), dtype=torch.int8, device="cuda", generator=g)
scale = torch.rand(64, device="cuda", generator=g) * 0.01 + 1e-3
mask = torch.rand(64, 96, device="cuda", generator=g) >= 0.1
x = torch.randn(20, 96, device="cuda", generator=g).half()
got = tm.masked_linear_triton(x, w_q, scale, tm.relayout_mask(pack_bits(mask), 64, 96), None).float()
want = masked_linear_reference(x.float(), w_q, scale, mask, None)
err = float((got - want).abs().max() / want.abs().max())
print(f"fused kernel compiled and ran: max rel err {err:.2e}")
if err > 1e-2:
    sys.exit("the fused kernel's result is wrong")
EOF
}

for stage in "${STAGES[@]}"; do
  case $stage in
    env) run_stage env stage_env ;;
    tests) run_stage tests bash -c "set -o pipefail; '$PY' -m pytest -q -rs -p no:cacheprovider tests 2>&1 \
             | tee '$OUT_DIR/pytest.log' | tail -n 40" ;;
    bench) run_stage bench "$PY" benchmarks/gpu.py --out-dir "$OUT_DIR" ;;
    serve)
      run_stage serve-minilm "$PY" benchmarks/serve_cpu.py --device cuda --synthetic minilm --synthetic-tasks 8 \
        --data-dir "$DATA_DIR" "${TOKENIZER_ARGS[@]}" --out "$OUT_DIR/serve_cuda_minilm"
      run_stage serve-bert-base "$PY" benchmarks/serve_cpu.py --device cuda --synthetic bert-base \
        --synthetic-tasks 64 --mixed-requests 640 --concurrency 32 --data-dir "$DATA_DIR" "${TOKENIZER_ARGS[@]}" \
        --out "$OUT_DIR/serve_cuda_bert-base" ;;
  esac
done

status=0
for name in "${!RC[@]}"; do
  echo "gpu_check: $name rc=${RC[$name]}" >&2
  [[ ${RC[$name]} -ne 0 ]] && status=1
done
exit $status
