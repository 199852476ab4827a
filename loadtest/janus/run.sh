#!/usr/bin/env bash
# Runs Janus (Debian package `janus` 1.1.2, configured by the files beside
# this script) inside a fresh network namespace, then runs the given command
# in the same namespace, then kills Janus and deletes the namespace, whatever
# happens (trap). Needs root (`ip netns`).
#
# The namespace holds `lo` and one interface `lt0` (a veth whose peer also stays inside) with 10.77.0.1/24:
# Janus offers host candidates on interface addresses only, never loopback,
# and its WebSocket API listens on ws://10.77.0.1:8188. Nothing in the
# namespace is reachable from outside it, and it reaches nothing outside.
#
#   loadtest/janus/run.sh target/release/loadtest janus --url ws://10.77.0.1:8188 \
#       --rooms 1 --participants 3 --duration 5s --server-pid '{janus}'
#
# A literal `{janus}` argument is replaced by Janus's pid. Janus's log goes
# to $JANUS_LOG (default: a temporary file, printed on failure).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
ns="lt-janus-$$"
addr=10.77.0.1
log="${JANUS_LOG:-$(mktemp /tmp/janus-XXXXXX.log)}"
janus_pid=""
cmd_pid=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$cmd_pid" ]; then kill -TERM "$cmd_pid" 2>/dev/null || true; fi
  if [ -n "$janus_pid" ]; then
    kill -TERM "$janus_pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 "$janus_pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$janus_pid" 2>/dev/null || true
  fi
  # Anything else left in the namespace goes too.
  for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  ip netns delete "$ns" 2>/dev/null || true
  if [ -z "${JANUS_LOG:-}" ]; then
    if [ "$rc" -ne 0 ]; then
      echo "run.sh: exit $rc; Janus log ($log):" >&2
      tail -n 40 "$log" >&2 || true
    else
      rm -f "$log"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT INT TERM

command -v janus >/dev/null || { echo "run.sh: janus is not installed (apt-get install -y janus)" >&2; exit 2; }
[ "$#" -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }

ip netns add "$ns"
ip -n "$ns" link set lo up
# A veth pair with both ends inside the namespace (the kernel here has no
# `dummy` driver); only lt0 carries an address.
ip -n "$ns" link add lt0 type veth peer name lt1
ip -n "$ns" addr add "$addr/24" dev lt0
ip -n "$ns" link set lt1 up
ip -n "$ns" link set lt0 up

ip netns exec "$ns" janus -C "$here/janus.jcfg" -F "$here" -o >"$log" 2>&1 &
janus_pid=$!
# Wait (at most 10 s) for the WebSocket API to listen.
listening=""
for _ in $(seq 1 50); do
  if ip netns exec "$ns" bash -c "exec 3<>/dev/tcp/$addr/8188" 2>/dev/null; then listening=1; break; fi
  kill -0 "$janus_pid" 2>/dev/null || { echo "run.sh: janus exited at start-up" >&2; exit 1; }
  sleep 0.2
done
[ -n "$listening" ] || { echo "run.sh: janus did not listen on $addr:8188 within 10 s" >&2; exit 1; }

args=()
for a in "$@"; do args+=("${a//\{janus\}/$janus_pid}"); done
# In the background and waited for, so a signal reaches the trap at once
# (bash runs traps only between foreground commands).
ip netns exec "$ns" "${args[@]}" &
cmd_pid=$!
wait "$cmd_pid"
