#!/usr/bin/env bash
# Run the checks and the test suite inside the project's virtualenv (make test calls this).
# Starts a local Redis on 127.0.0.1:6379 when none answers (tests that need it use their own
# DB index and flush it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
if command -v redis-cli >/dev/null && ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  if command -v redis-server >/dev/null; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
  fi
fi
"$VENV/bin/ruff" check service tests benchmarks
"$VENV/bin/lint-imports"
# Two pytest-xdist workers, whole files each (module fixtures such as a served stack start
# once); each worker has its own Redis DB (tests/helpers.py). HASHAUDIT_TEST_WORKERS=0 runs
# in one process.
WORKERS="${HASHAUDIT_TEST_WORKERS:-2}"
if [ "$WORKERS" = "0" ]; then
  exec "$VENV/bin/python" -m pytest "$@"
fi
exec "$VENV/bin/python" -m pytest -n "$WORKERS" --dist loadfile "$@"
