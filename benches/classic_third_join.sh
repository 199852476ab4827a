#!/usr/bin/env bash
# Time from the third classic page's `joined` to media on all three (issue
# 12's figure): runs tests/browser/classic_call.mjs `third` RUNS times, each
# against a fresh `switchboard serve --socketio-relay auto` in a fresh
# network namespace with only `lo` (needs root, chromium, node and
# `npm ci --prefix tests/browser`). "Media on all three" means every page is
# connected to the server, decodes the loudest other's picture and hears the
# two others' tones in the mix and not its own (polled every 200 ms). Prints
# every run and the p50.
#
#   benches/classic_third_join.sh [BINARY] [RUNS]
#   benches/classic_third_join.sh target/release/switchboard 10
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/switchboard}"
runs="${2:-10}"
[ -x "$bin" ] || { echo "no $bin: cargo build --release -p switchboard --bin switchboard" >&2; exit 1; }
figures=()
for i in $(seq 1 "$runs"); do
  ns="sbbench-$$-$i"
  tmp="$(mktemp -d /tmp/sbb-XXXX)"
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  NO_COLOR=1 SWITCHBOARD_SOCKETIO_RELAY=auto ip netns exec "$ns" "$bin" serve --listen 127.0.0.1:18080 --log warn >"$tmp/server.log" 2>&1 &
  server=$!
  disown "$server"
  rc=0
  TMPDIR="$tmp" timeout 150 ip netns exec "$ns" node tests/browser/classic_call.mjs http://127.0.0.1:18080 third >"$tmp/out" 2>"$tmp/err" || rc=$?
  kill "$server" 2>/dev/null || true
  for p in $(ip netns pids "$ns"); do kill -9 "$p" 2>/dev/null || true; done
  ip netns delete "$ns"
  if [ "$rc" -ne 0 ]; then
    echo "run $i: FAILED (logs in $tmp): $(cat "$tmp/out")"
    continue
  fi
  ms="$(python3 -c 'import json,sys; r=json.loads(sys.stdin.readline()); print(r["third_join_to_media_ms"], r["speaker_switch_ms"])' <"$tmp/out")"
  echo "run $i: third join to media on all three ${ms% *} ms, speaker switch followed in ${ms#* } ms"
  figures+=("${ms% *}")
  rm -rf "$tmp"
done
printf '%s\n' "${figures[@]}" | python3 -c '
import statistics, sys
v = sorted(int(x) for x in sys.stdin.read().split())
print(f"{len(v)} runs: p50 {statistics.median(v):.0f} ms, min {v[0]} ms, max {v[-1]} ms" if v else "no successful run")'
