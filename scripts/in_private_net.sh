#!/usr/bin/env bash
# Run a command inside a private network namespace with only loopback up, so DDS
# discovery cannot reach any other machine (and parallel runs cannot see each other).
# Falls back to running the command as it is (still with LOCALHOST discovery, set by
# test/conftest.py) when the machine does not allow namespaces, and says so.
set -euo pipefail
if [[ "${END2REG_IN_NETNS:-}" == 1 ]]; then exec "$@"; fi
inner='ip link set lo up && export END2REG_IN_NETNS=1 && exec "$@"'
if [[ $(id -u) -eq 0 ]] && unshare -n true 2>/dev/null; then
  exec unshare -n -- bash -c "$inner" bash "$@"
elif unshare -rn true 2>/dev/null; then
  exec unshare -rn -- bash -c "$inner" bash "$@"
fi
echo "[in_private_net] network namespaces not available here: running without one" >&2
exec "$@"
