#!/usr/bin/env bash
# Docker deployment check (called by .ci/run): lint and validate the deployment files, build the
# CPU image, run it with docker compose and exercise it through the published loopback port:
#   hadolint on every Dockerfile, `docker compose config -q`, promtool on docker/prometheus.yml,
#   build, `compose up -d --wait`, predict a shipped task (SST-2), upload a bundle, /metrics,
#   non-root user, token not in `docker inspect`, restart and check the upload survived on the volume.
# Always tears down (compose down -v, then the private engine).
#
# Prints "docker-check: skipped: <reason>" and exits 0 when no Docker engine can be started here.
# Exits non-zero on a real failure.
#
# Environment:
#   DOCKER_TOOLS          folder with docker-up.sh / docker-down.sh (default: ../shared/tools)
#   TORCH_WHEEL_DIR       where a CPU torch wheel for cp311 may be found (default: /opt/wheels)
#   DOCKER_CHECK_PORT     host port to publish on 127.0.0.1 (default: a free one)
#   DOCKER_CHECK_NO_CACHE=1  build without the layer cache (cold build timing)
#   DOCKER_CHECK_KEEP=1   leave the containers, volume and engine running afterwards (debugging)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$SECONDS
log() { echo "docker-check: $*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

TOOLS=${DOCKER_TOOLS:-$ROOT/../shared/tools}
if [[ ! -x "$TOOLS/docker-up.sh" && ! -f "$TOOLS/docker-up.sh" ]]; then
  echo "docker-check: skipped: $TOOLS/docker-up.sh not found (no way to start a Docker engine here)"
  exit 0
fi
if ! up_env=$(bash "$TOOLS/docker-up.sh"); then
  echo "docker-check: skipped: the Docker engine could not be started (docker-up.sh failed)"
  bash "$TOOLS/docker-down.sh" >/dev/null 2>&1 || true
  exit 0
fi
eval "$up_env"
if ! docker info >/dev/null 2>&1; then
  echo "docker-check: skipped: docker-up.sh ran but the engine does not answer"
  bash "$TOOLS/docker-down.sh" >/dev/null 2>&1 || true
  exit 0
fi

PROJECT=supermask-ci
WORK=$(mktemp -d)
COPIED_WHEEL=""
compose() { docker compose -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }
teardown() {
  local rc=$?
  if [[ "${DOCKER_CHECK_KEEP:-0}" == 1 ]]; then
    log "DOCKER_CHECK_KEEP=1: leaving project $PROJECT and the engine running"
  else
    if ((rc != 0)); then
      log "server logs (last 60 lines):"
      compose logs --no-color --tail 60 server >&2 2>/dev/null || true
    fi
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    bash "$TOOLS/docker-down.sh" >/dev/null 2>&1 || true
  fi
  [[ -n "$COPIED_WHEEL" ]] && rm -f "$COPIED_WHEEL"
  rm -rf "$WORK"
  log "total $((SECONDS - T0)) s, exit $rc"
}
trap teardown EXIT

# ------------------------------------------------------------------ static checks
command -v hadolint >/dev/null || fail "hadolint not on PATH (docker-up.sh installs it)"
log "hadolint docker/Dockerfile docker/Dockerfile.cuda"
hadolint docker/Dockerfile docker/Dockerfile.cuda
log "docker compose config -q (default, and with the gpu and monitoring profiles)"
compose config -q
compose --profile gpu --profile monitoring config -q

PROMTOOL=$(command -v promtool || true)
if [[ -z "$PROMTOOL" ]]; then
  # promtool comes with Debian's prometheus package; unpack it without installing the daemon.
  deb_dir=${DOCKER_WORK:-/tmp/ci-docker}/prometheus-deb
  if [[ ! -x "$deb_dir/usr/bin/promtool" ]]; then
    mkdir -p "$deb_dir"
    (cd "$deb_dir" && { apt-get download prometheus >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } \
        && dpkg-deb -x prometheus_*.deb . && rm -f prometheus_*.deb) || true
  fi
  [[ -x "$deb_dir/usr/bin/promtool" ]] && PROMTOOL=$deb_dir/usr/bin/promtool
fi
if [[ -n "$PROMTOOL" ]]; then
  log "promtool check config docker/prometheus.yml"
  "$PROMTOOL" check config docker/prometheus.yml >&2
else
  log "promtool unavailable (no prometheus package); docker/prometheus.yml is checked by tests/unit/test_deploy_config.py only"
fi

# ------------------------------------------------------------------ build
ls examples/masks/SST-2.smask >/dev/null 2>&1 || fail "examples/masks/SST-2.smask is missing (the shipped task to predict)"
if ! ls docker/wheels/torch-*.whl >/dev/null 2>&1; then
  wheel=$(ls "${TORCH_WHEEL_DIR:-/opt/wheels}"/torch-*+cpu-cp311-*.whl 2>/dev/null | sort | tail -n 1 || true)
  if [[ -n "$wheel" ]]; then
    cp "$wheel" docker/wheels/ && COPIED_WHEEL=$ROOT/docker/wheels/$(basename "$wheel")
    log "using the local torch wheel $(basename "$wheel")"
  else
    log "no local CPU torch wheel: the build takes torch from the CPU index (TORCH_INDEX_URL)"
  fi
fi
build_args=()
[[ "${DOCKER_CHECK_NO_CACHE:-0}" == 1 ]] && build_args+=(--no-cache)
log "building the CPU image"
t=$SECONDS
compose build "${build_args[@]}" server >&2
BUILD_S=$((SECONDS - t))
[[ -n "$COPIED_WHEEL" ]] && rm -f "$COPIED_WHEEL" && COPIED_WHEEL=""
IMAGE=$(compose config --images server | head -n 1)
IMAGE_SIZE=$(docker image ls --format '{{.Size}}' "$IMAGE" | head -n 1)
log "built $IMAGE in ${BUILD_S}s, size $IMAGE_SIZE"

# ------------------------------------------------------------------ run
PORT=${DOCKER_CHECK_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
printf '%s\n' "$TOKEN" > "$WORK/admin_token"
chmod 644 "$WORK/admin_token"
export SUPERMASK_PUBLISH_PORT=$PORT SUPERMASK_BIND=127.0.0.1 SUPERMASK_ADMIN_TOKEN_FILE=$WORK/admin_token
unset SUPERMASK_ADMIN_TOKEN
BASE=http://127.0.0.1:$PORT
compose down -v --remove-orphans >/dev/null 2>&1 || true

log "docker compose up -d --wait server (127.0.0.1:$PORT)"
t=$SECONDS
compose up -d --wait --wait-timeout 300 server >&2
READY_S=$((SECONDS - t))
log "server healthy ${READY_S}s after up"

# http METHOD PATH [curl args...]: body to $WORK/body, prints the status code
http() {
  local method=$1 path=$2; shift 2
  curl -sS -o "$WORK/body" -w '%{http_code}' -X "$method" "$BASE$path" "$@"
}
expect() {  # expect STATUS WHAT: compares with the last http status in $code
  [[ "$code" == "$1" ]] || { log "response body: $(head -c 2000 "$WORK/body")"; fail "$2: HTTP $code, expected $1"; }
}
jq_py() { python3 -c "import json, sys; d = json.load(open('$WORK/body')); $1"; }

code=$(http GET /healthz); expect 200 "GET /healthz"
jq_py 'assert d["status"] == "ok" and d["tasks"] >= 1, d'

code=$(http POST /v1/tasks/SST-2/predict -H 'content-type: application/json' \
  -d '{"inputs": ["a charming and often affecting journey"]}')
expect 200 "predict SST-2"
jq_py 'p = d["predictions"]; assert d["task"] == "SST-2" and len(p) == 1 and p[0]["label"] in ("positive", "negative"), d; print("docker-check: SST-2 ->", p[0]["label"], round(p[0]["score"], 3), file=sys.stderr)'

# A new task for the upload: the shipped SST-2 bundle re-encoded under another name, made with the
# image's own mask_store (no host Python packages needed).
log "making SST-2-copy.smask from the shipped SST-2 bundle"
compose exec -T server python - > "$WORK/SST-2-copy.smask" <<'PY'
import sys
from mask_store.format import decode_bundle, encode_bundle
b = decode_bundle(open("/app/examples/masks/SST-2.smask", "rb").read())
h = b.header
sys.stdout.buffer.write(encode_bundle(
    task="SST-2-copy", problem_type=h.problem_type, labels=h.labels, max_seq_length=h.max_seq_length,
    backbone_fingerprint=h.backbone_fingerprint, backbone_name=h.backbone_name, text_pairs=h.text_pairs,
    masks={m.name: b.mask_array(m.name) for m in h.masks}, head=b.head,
    training=h.training, metrics=h.metrics, created_at=h.created_at, library_version=h.library_version))
PY
[[ -s "$WORK/SST-2-copy.smask" ]] || fail "could not make the upload bundle"

code=$(http PUT /v1/tasks/SST-2-copy --data-binary "@$WORK/SST-2-copy.smask")
expect 401 "upload without a token"
code=$(http PUT /v1/tasks/SST-2-copy -H "Authorization: Bearer $TOKEN" \
  -H 'content-type: application/octet-stream' --data-binary "@$WORK/SST-2-copy.smask")
expect 201 "upload SST-2-copy"
code=$(http POST /v1/tasks/SST-2-copy/predict -H 'content-type: application/json' \
  -d '{"inputs": ["a charming and often affecting journey"]}')
expect 200 "predict the uploaded SST-2-copy"

code=$(http GET /metrics); expect 200 "GET /metrics"
for series in 'supermask_request_duration_seconds_count{task="SST-2"}' 'supermask_cache_misses_total{task="SST-2"}' \
              'supermask_task_load_duration_seconds_count{task="SST-2-copy"}' supermask_resident_tasks \
              supermask_backbone_bytes supermask_process_resident_memory_bytes; do
  grep -qF "$series" "$WORK/body" || fail "/metrics lacks $series"
done
log "/metrics has the request, cache, swap-in and memory series"

# the container runs as a non-root user and the token is nowhere in its configuration
cid=$(compose ps -q server)
uid=$(compose exec -T server id -u | tr -d '\r')
[[ "$uid" != 0 ]] || fail "the server runs as root"
if docker inspect "$cid" "$IMAGE" | grep -qF "$TOKEN"; then fail "the admin token appears in docker inspect"; fi
log "runs as uid $uid; admin token not in docker inspect"

log "restarting the server"
t=$SECONDS
compose restart server >&2
compose up -d --wait --wait-timeout 300 server >&2
RESTART_S=$((SECONDS - t))
code=$(http GET /v1/tasks/SST-2-copy); expect 200 "GET /v1/tasks/SST-2-copy after the restart"
code=$(http POST /v1/tasks/SST-2-copy/predict -H 'content-type: application/json' \
  -d '{"inputs": ["dull and lifeless"]}')
expect 200 "predict SST-2-copy after the restart"
log "SST-2-copy survived the restart on the named volume (ready again in ${RESTART_S}s)"

echo "docker-check: passed: image $IMAGE $IMAGE_SIZE, build ${BUILD_S}s, start-to-ready ${READY_S}s, restart-to-ready ${RESTART_S}s, total $((SECONDS - T0))s"
