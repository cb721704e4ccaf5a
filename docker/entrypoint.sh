#!/bin/sh
# Container entry point of the supermask server image.
#
# - The admin token comes from the environment (SUPERMASK_ADMIN_TOKEN) or from a file
#   (SUPERMASK_ADMIN_TOKEN_FILE, default /run/secrets/admin_token: the compose secret).
#   Nothing secret is baked into the image.
# - With no arguments it runs uvicorn with SUPERMASK_WORKERS worker processes; any other
#   command is run as given (e.g. `docker run IMAGE supermask inspect /app/examples/masks/SST-2.smask`).
set -eu

token_file="${SUPERMASK_ADMIN_TOKEN_FILE:-/run/secrets/admin_token}"
if [ -z "${SUPERMASK_ADMIN_TOKEN:-}" ] && [ -f "$token_file" ] && [ -s "$token_file" ]; then
    if [ ! -r "$token_file" ]; then
        echo "entrypoint: $token_file is not readable by uid $(id -u); make it readable (chmod 644)" >&2
        exit 1
    fi
    SUPERMASK_ADMIN_TOKEN="$(tr -d '\r\n' < "$token_file")"
    export SUPERMASK_ADMIN_TOKEN
fi
if [ -z "${SUPERMASK_ADMIN_TOKEN:-}" ]; then
    unset SUPERMASK_ADMIN_TOKEN  # an empty token disables the admin routes, as an unset one does
fi

if [ "$#" -eq 0 ]; then
    log_level="$(printf '%s' "${SUPERMASK_LOG_LEVEL:-INFO}" | tr '[:upper:]' '[:lower:]')"
    log_config="$(python3 -c 'from service.api.server import LOG_CONFIG; print(LOG_CONFIG)')"  # request ids in every line
    exec uvicorn service.api.main:create_app --factory \
        --host "${SUPERMASK_HOST:-0.0.0.0}" --port "${SUPERMASK_PORT:-8000}" \
        --workers "${SUPERMASK_WORKERS:-1}" --log-level "$log_level" \
        --log-config "$log_config" --http service.api.server:HeadTimeoutProtocol --limit-concurrency "${SUPERMASK_LIMIT_CONCURRENCY:-512}" \
        --timeout-graceful-shutdown "${SUPERMASK_GRACEFUL_SHUTDOWN_S:-20}"
fi
exec "$@"
