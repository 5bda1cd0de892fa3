#!/usr/bin/env bash
# Runs the test suite while a `wattmesh up` stack runs beside it on the same machine: proves
# that the tests pick free ports and temporary folders (issue 13, "the first hour"). Starts
# `wattmesh up` on the community example (`wattmesh init`) with its state in a temporary
# folder and free ports, runs pytest with the given arguments, stops the stack with SIGINT
# (as Ctrl-C) and exits with pytest's status (1 also when the stack failed or did not stop
# cleanly). Usage: ./scripts/suite-beside-up.sh [pytest arguments]; PYTHON names the
# interpreter (default .venv/bin/python, as scripts/test.sh makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
work="$(mktemp -d "${TMPDIR:-/tmp}/wattmesh-beside-up-XXXXXX")"
chmod 755 "$work"  # Mosquitto's own user enters it when this runs as root
up_pid=""

stop_up() {
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
    kill -INT "$up_pid"
    for _ in $(seq 120); do
      kill -0 "$up_pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$up_pid" 2>/dev/null; then
      echo "== wattmesh up did not stop on SIGINT within 60 s: killed" >&2
      kill -KILL "$up_pid"
    fi
  fi
}
trap 'stop_up; rm -rf "$work"' EXIT

"$python" -m wattmesh init "$work/mesh" >/dev/null
"$python" -m wattmesh up "$work/mesh" --state "$work/state" --summary-every 60 \
  >"$work/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 240); do
  [ -f "$work/state/ports.json" ] && break
  if ! kill -0 "$up_pid" 2>/dev/null; then
    echo "== wattmesh up failed to start:" >&2
    cat "$work/up.log" >&2
    exit 1
  fi
  sleep 0.5
done
[ -f "$work/state/ports.json" ] || { echo "== wattmesh up did not start within 120 s" >&2; exit 1; }
echo "== wattmesh up runs beside the tests (pid $up_pid, $work/state/ports.json):"
"$python" -c 'import json, sys; p = json.load(open(sys.argv[1]))
print("   broker", p["broker"]["port"], "devices", " ".join(d["url"] for d in p["devices"].values()))' \
  "$work/state/ports.json"

set +e
"$python" -m pytest "$@"
status=$?
set -e

alive=1
kill -0 "$up_pid" 2>/dev/null || alive=0
stop_up
up_status=0
wait "$up_pid" || up_status=$?
up_pid=""
if [ "$alive" -eq 0 ] || [ "$up_status" -ne 0 ] || ! grep -qx "stopped" "$work/up.log"; then
  echo "== wattmesh up did not run through the suite and stop cleanly (exit $up_status):" >&2
  tail -n 30 "$work/up.log" >&2
  [ "$status" -ne 0 ] || status=1
else
  echo "== wattmesh up ran beside the whole run and stopped cleanly"
fi
exit "$status"
