#!/usr/bin/env bash
# One entry point for people and CI:
#   ./fluxbot.sh run     set up .venv (first time) and run the bot with the settings in .env
#   ./fluxbot.sh sync    set up, then sync the slash commands now and exit
#   ./fluxbot.sh test    set up .venv with the test extra, then lint, type-check and run the tests
#   ./fluxbot.sh bench   set up, then run the benchmarks (python -m bench)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${FLUXBOT_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

setup() {
  local extra="$1" stamp="$VENV/.fluxbot-installed$1"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  # Reinstall only when pyproject.toml changed since the last install.
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".$extra"
    touch "$stamp"
  fi
}

command="${1:-run}"
shift || true
case "$command" in
  run)
    setup ""
    exec "$VENV/bin/python" -m bot run "$@"
    ;;
  sync)
    setup ""
    exec "$VENV/bin/python" -m bot sync "$@"
    ;;
  test)
    setup "[test]"
    "$VENV/bin/ruff" check .
    "$VENV/bin/mypy" --strict
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  bench)
    setup "[test]"
    exec "$VENV/bin/python" -m bench "$@"
    ;;
  *)
    echo "usage: ./fluxbot.sh [run|sync|test|bench]" >&2
    exit 2
    ;;
esac
