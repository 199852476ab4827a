#!/usr/bin/env bash
# Cluster mode (issue 13): what the Redis relay costs, how rooms spread, and
# how long a dead owner's rooms take to come back. Everything on 127.0.0.1:
# its own `redis-server` (no persistence) on a free port, release nodes with
# `--log warn`, each with its own HTTP and media port.
#
# 1. Signaling, relayed vs direct vs single node (`loadtest signaling`).
#    node-a and node-b share one Redis; before each run its rooms
#    (`bench-<run-id>-<n>`) are claimed for node-b in Redis, so "relayed"
#    (clients on node-a) has every join and ping relayed a -> b -> a over
#    pub/sub, "direct" (clients on node-b) has none; "single" is a third
#    process without --redis-url. The modes alternate, SIG_ROUNDS rounds;
#    each run has its own run id and waits for every node to be back at 0
#    participants. Reported per run: join and ping p50/p99, CPU of each
#    node and of redis-server over the whole run and over the ping phase
#    alone (sampled when loadtest says the joins and the pings are done),
#    frames relayed.
# 2. Media, two nodes vs one (`loadtest run`, the standard load: 4 rooms x
#    4 participants, Opus + 500 kbit/s VP8, 20 s window) against node-a of a
#    fresh two-node cluster, then a fresh single node, alternating,
#    MEDIA_ROUNDS rounds. Per node: rooms and participants (highest sample
#    of /metrics, once a second), where Redis put each room (sampled mid
#    run), forwarded RTP packets (delta of
#    switchboard_media_rtp_forwarded_total over the whole loadtest run) and
#    CPU seconds (utime+stime of /proc/PID/stat, same span); loadtest's own
#    loss, latency and received packets.
# 3. Owner death -> media back: `cargo test --release --test cluster
#    when_the_rooms_node_dies` FAILOVER_RUNS times, its printed figure.
#
# Prints every run and writes docs-ready tables to OUT_DIR/figures.md (the
# raw JSON reports and the node logs stay in OUT_DIR). Every process it
# starts is killed on exit. Bounded: each step runs under `timeout`.
#
#   benches/cluster.sh [OUT_DIR]
#   SIG_ROUNDS=2 MEDIA_ROUNDS=2 FAILOVER_RUNS=3 benches/cluster.sh target/bench-cluster
#   SKIP_BUILD=1 PARTS="1 2" benches/cluster.sh      # reuse the binaries; skip part 3
# Also: SIG_CONNECTIONS (400), SIG_ROOMS (40), SIG_PINGS (20), MEDIA_DURATION
# (20s), CARGO_TARGET_DIR, BENCH_COMMIT (the commit named in figures.md when
# run outside a git checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

out="${1:-target/bench-cluster}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
parts="${PARTS:-1 2 3}"
sig_rounds="${SIG_ROUNDS:-2}"
sig_connections="${SIG_CONNECTIONS:-400}"
sig_rooms="${SIG_ROOMS:-40}"
sig_pings="${SIG_PINGS:-20}"
media_rounds="${MEDIA_ROUNDS:-2}"
media_duration="${MEDIA_DURATION:-20s}"
failover_runs="${FAILOVER_RUNS:-3}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
bin="$target_dir/release/switchboard"
lt="$target_dir/release/loadtest"
tck="$(getconf CLK_TCK)"

# --- processes this script started: killed on exit -------------------------
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 1 30); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# A port free on 127.0.0.1 for both TCP and UDP right now.
free_port() {
  python3 - <<'EOF'
import socket
while True:
    t = socket.socket(); t.bind(("127.0.0.1", 0)); port = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", port)); print(port); break
    except OSError:
        pass
    finally:
        u.close(); t.close()
EOF
}

# utime+stime of a process, in seconds (bash builtins only: cheap enough to
# sample at a phase boundary without disturbing it).
cpu_of() {
  local line rest
  read -r line <"/proc/$1/stat"
  rest="${line##*) }"
  set -- $rest
  local t=$(( ${12} + ${13} ))
  printf '%d.%02d' $((t / tck)) $((t % tck * 100 / tck))
}

# One sample of a node's /metrics ("" when absent).
metric() {
  { curl -sf --max-time 2 "http://127.0.0.1:$1/metrics" || true; } | awk -v m="$2" '$1 == m { print $2; exit }'
}

loadavg() { cut -d' ' -f1 /proc/loadavg; }

# --- redis and nodes --------------------------------------------------------
redis_port=""
start_redis() {
  redis_port="$(free_port)"
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --protected-mode no >"$out/redis.log" 2>&1 &
  pids+=("$!")
  redis_pid="$!"
  for _ in $(seq 1 100); do
    [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] && return 0
    sleep 0.05
  done
  die "redis-server did not come up on $redis_port"
}
rcli() { redis-cli -p "$redis_port" "$@"; }

# start_node NAME ID|"" : sets NODE_PID[NAME], NODE_HTTP[NAME], NODE_MEDIA[NAME].
declare -A NODE_PID NODE_HTTP NODE_MEDIA
start_node() {
  local name="$1" id="$2" http media cluster=()
  http="$(free_port)"
  media="$(free_port)"
  [ -n "$id" ] && cluster=(--redis-url "redis://127.0.0.1:$redis_port" --node-id "$id")
  # Every client is 127.0.0.1: lift the per-address caps (64 sockets, 32 rooms).
  NO_COLOR=1 "$bin" serve --listen "127.0.0.1:$http" --rtc-ip 127.0.0.1 --rtc-port "$media" \
    --max-conns-per-ip 100000 --max-rooms-per-ip 100000 --log warn "${cluster[@]}" \
    >>"$out/$name.log" 2>&1 &
  pids+=("$!")
  NODE_PID[$name]="$!"
  NODE_HTTP[$name]="$http"
  NODE_MEDIA[$name]="$media"
  for _ in $(seq 1 200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$http/readyz")" = 200 ] && return 0
    kill -0 "${NODE_PID[$name]}" 2>/dev/null || die "$name exited; log: $(tail -5 "$out/$name.log")"
    sleep 0.05
  done
  die "$name not ready on $http; log: $(tail -5 "$out/$name.log")"
}

# Keeps a node's cluster and signaling metrics (relay drops, Redis errors and
# latencies, placements) before it stops.
keep_metrics() {
  { curl -sf --max-time 2 "http://127.0.0.1:${NODE_HTTP[$1]}/metrics" || true; } \
    | grep -E '^switchboard_(cluster_|signaling_errors|room_joins_refused|limited)' >"$out/metrics-$2-$1.txt" || true
}

stop_node() {
  local p="${NODE_PID[$1]}"
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  log "$1 still up 5 s after SIGTERM: SIGKILL"
  kill -KILL "$p" 2>/dev/null || true
}

# Waits until every named node sees N live nodes.
until_sees() {
  local n="$1" name; shift
  for name in "$@"; do
    for _ in $(seq 1 100); do
      [ "$(metric "${NODE_HTTP[$name]}" switchboard_cluster_nodes_live)" = "$n" ] && continue 2
      sleep 0.1
    done
    die "$name never saw $n live nodes"
  done
}

# Waits until every named node has 0 participants and 0 rooms.
until_empty() {
  local name p r
  for name in "$@"; do
    for _ in $(seq 1 300); do
      p="$(metric "${NODE_HTTP[$name]}" switchboard_participants)"
      r="$(metric "${NODE_HTTP[$name]}" switchboard_rooms)"
      [ "$p" = 0 ] && [ "$r" = 0 ] && continue 2
      sleep 0.1
    done
    die "$name still has $p participants, $r rooms 30 s after the run"
  done
}

# Reads `loadtest signaling`'s stderr (then "exit N"): keeps it in PREFIX.err
# and writes to PREFIX.cpu the CPU seconds of node-a, node-b, single and
# redis-server when the joins are done and when the pings are done.
sig_watch() {
  local line
  : >"$1.err"
  : >"$1.cpu"
  while IFS= read -r line; do
    case "$line" in
      *"joins done"*) echo "joined $(sig_cpus)" >>"$1.cpu" ;;
      *"pings done"*) echo "pinged $(sig_cpus)" >>"$1.cpu" ;;
      "exit "*) echo "$line" >>"$1.cpu"; continue ;;
    esac
    printf '%s\n' "$line" >>"$1.err"
  done
}
sig_cpus() {
  echo "$(cpu_of "${NODE_PID[node-a]}") $(cpu_of "${NODE_PID[node-b]}") $(cpu_of "${NODE_PID[single]}") $(cpu_of "$redis_pid")"
}

# ---------------------------------------------------------------------------
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building release binaries"
  timeout 3600 cargo build --release -p switchboard -p loadtest >"$out/build.log" 2>&1 \
    || die "cargo build (see $out/build.log)"
fi
[ -x "$bin" ] && [ -x "$lt" ] || die "no $bin or $lt"
machine="$(nproc) vCPU $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(. /etc/os-release && echo "$PRETTY_NAME")"
commit="${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
dirty="$(git status --porcelain -- src loadtest client proto 2>/dev/null | head -1 || true)"
{
  echo "date=$(date -u +%FT%TZ)"
  echo "machine=$machine"
  echo "commit=$commit${dirty:+ (src dirty)}"
} >"$out/meta"
log "results in $out ($machine, $commit${dirty:+, src dirty})"
start_redis

relay_to_owner='switchboard_cluster_relayed_messages_total{direction="to-owner"}'
relay_to_client='switchboard_cluster_relayed_messages_total{direction="to-client"}'
: >"$out/signaling.jsonl"
: >"$out/media.jsonl"
: >"$out/failover.txt"

# --- 1. signaling -----------------------------------------------------------
if [[ " $parts " == *" 1 "* ]]; then
  log "part 1: signaling, $sig_connections connections in $sig_rooms rooms, $sig_pings pings each"
  start_node node-a node-a
  start_node node-b node-b
  start_node single ""
  until_sees 2 node-a node-b
  for round in $(seq 1 "$sig_rounds"); do
    for mode in relayed direct single; do
      rid="c$$r${round}${mode}"
      case "$mode" in
        relayed) target=node-a ;;
        direct) target=node-b ;;
        single) target=single ;;
      esac
      if [ "$mode" != single ]; then
        for n in $(seq 0 $((sig_rooms - 1))); do
          echo "SET sb:room:bench-$rid-$n node-b PX 600000"
        done | rcli >/dev/null
      fi
      until_empty node-a node-b single
      la="$(loadavg)"
      cpu0=("$(cpu_of "${NODE_PID[node-a]}")" "$(cpu_of "${NODE_PID[node-b]}")" "$(cpu_of "${NODE_PID[single]}")" "$(cpu_of "$redis_pid")")
      to_owner0="$(metric "${NODE_HTTP[node-a]}" "$relay_to_owner")"
      to_client0="$(metric "${NODE_HTTP[node-a]}" "$relay_to_client")"
      # loadtest's progress lines go through sig_watch, which samples every
      # process's CPU the moment the ping phase starts and ends.
      { rc=0
        timeout 200 "$lt" signaling --url "ws://127.0.0.1:${NODE_HTTP[$target]}/ws" \
          --connections "$sig_connections" --rooms "$sig_rooms" --pings "$sig_pings" \
          --timeout 150s --run-id "$rid" --server-pid "${NODE_PID[$target]}" \
          --json "$out/sig-$round-$mode.json" 2>&1 >"$out/sig-$round-$mode.txt" || rc=$?
        echo "exit $rc"; } | sig_watch "$out/sig-$round-$mode"
      rc="$(sed -n 's/^exit //p' "$out/sig-$round-$mode.cpu")"
      cpuj="$(sed -n 's/^joined //p' "$out/sig-$round-$mode.cpu")"
      cpup="$(sed -n 's/^pinged //p' "$out/sig-$round-$mode.cpu")"
      cpu1=("$(cpu_of "${NODE_PID[node-a]}")" "$(cpu_of "${NODE_PID[node-b]}")" "$(cpu_of "${NODE_PID[single]}")" "$(cpu_of "$redis_pid")")
      to_owner1="$(metric "${NODE_HTTP[node-a]}" "$relay_to_owner")"
      to_client1="$(metric "${NODE_HTTP[node-a]}" "$relay_to_client")"
      [ "$rc" = 0 ] || log "signaling $mode round $round: loadtest exit $rc (see $out/sig-$round-$mode.*)"
      python3 - "$out/sig-$round-$mode.json" "$mode" "$round" "${rc:-255}" "$la" \
        "${cpu0[*]}" "${cpu1[*]}" "$cpuj" "$cpup" "$to_owner0" "$to_owner1" "$to_client0" "$to_client1" \
        >>"$out/signaling.jsonl" <<'EOF'
import json, sys
path, mode, rnd, rc, la, c0, c1, cj, cp, o0, o1, t0, t1 = sys.argv[1:]
try:
    r = json.load(open(path))
except (OSError, ValueError):
    r = None
names = ["node_a", "node_b", "single", "redis"]
delta = lambda x, y: dict(zip(names, [round(float(b) - float(a), 2) for a, b in zip(x.split(), y.split())])) if x and y else None
cpu = delta(c0, c1)
rec = {"mode": mode, "round": int(rnd), "exit": int(rc), "load": float(la), "cpu_s": cpu,
       "relayed_to_owner": float(o1) - float(o0), "relayed_to_client": float(t1) - float(t0)}
if r:
    ms = lambda s, k: s[k] / 1000.0
    rec["cpu_ping_phase_s"] = delta(cj, cp)
    rec.update({
        "run_id": r["run_id"], "joined": r["connections"]["joined"],
        "requested": r["connections"]["requested"],
        "pings_ok": r["pings"]["ok"], "pings_expected": r["pings"]["expected"],
        "join_p50": ms(r["join_latency"], "p50_us"), "join_p99": ms(r["join_latency"], "p99_us"),
        "join_max": ms(r["join_latency"], "max_us"),
        "ping_p50": ms(r["ping_latency"], "p50_us"), "ping_p99": ms(r["ping_latency"], "p99_us"),
        "ping_max": ms(r["ping_latency"], "max_us"),
        "connect_s": r["phases"]["connect_s"], "ping_s": r["phases"]["ping_s"],
        "errors": r["connection_errors"], "server_errors": r["server_errors"],
    })
print(json.dumps(rec))
g = rec.get
print(f"signaling round {rnd} {mode:7}: joined {g('joined')}/{g('requested')}, join p50/p99 "
      f"{g('join_p50')}/{g('join_p99')} ms, ping p50/p99 {g('ping_p50')}/{g('ping_p99')} ms, "
      f"cpu {cpu}, relayed {rec['relayed_to_owner']:.0f}+{rec['relayed_to_client']:.0f}", file=sys.stderr)
EOF
    done
  done
  until_empty node-a node-b single
  for n in node-a node-b single; do keep_metrics "$n" signaling; stop_node "$n"; done
fi

# --- 2. media ---------------------------------------------------------------
# media_run MODE ROUND: the standard load against node-a (cluster) or single.
media_run() {
  local mode="$1" round="$2" nodes target rid rc=0 n
  if [ "$mode" = cluster ]; then
    rcli FLUSHALL >/dev/null
    start_node node-a node-a
    start_node node-b node-b
    until_sees 2 node-a node-b
    nodes=(node-a node-b)
  else
    start_node single ""
    nodes=(single)
  fi
  target="${nodes[0]}"
  rid="m$$r${round}${mode}"
  local la cpu0=() fwd0=() cpu1=() fwd1=()
  la="$(loadavg)"
  for n in "${nodes[@]}"; do
    cpu0+=("$(cpu_of "${NODE_PID[$n]}")")
    fwd0+=("$(metric "${NODE_HTTP[$n]}" switchboard_media_rtp_forwarded_total)")
  done
  timeout 200 "$lt" run --url "ws://127.0.0.1:${NODE_HTTP[$target]}/ws" --rooms 4 --participants 4 \
    --audio --duration "$media_duration" --timeout 150s --run-id "$rid" \
    --server-pid "${NODE_PID[$target]}" --json "$out/media-$round-$mode.json" \
    >"$out/media-$round-$mode.txt" 2>"$out/media-$round-$mode.err" &
  local ltpid=$!
  pids+=("$ltpid")
  # Once a second: rooms and participants per node (highest kept); the
  # rooms' owners from Redis once, mid run.
  local t=0 owners="" samples="$out/media-$round-$mode.samples"
  : >"$samples"
  while kill -0 "$ltpid" 2>/dev/null; do
    for n in "${nodes[@]}"; do
      echo "$n $(metric "${NODE_HTTP[$n]}" switchboard_rooms) $(metric "${NODE_HTTP[$n]}" switchboard_participants)" >>"$samples"
    done
    if [ "$mode" = cluster ] && [ "$t" = 12 ]; then
      owners="$(for r in 0 1 2 3; do printf '%s ' "$(rcli GET "sb:room:lt-$rid-$r")"; done)"
    fi
    sleep 1
    t=$((t + 1))
  done
  wait "$ltpid" || rc=$?
  for n in "${nodes[@]}"; do
    cpu1+=("$(cpu_of "${NODE_PID[$n]}")")
    fwd1+=("$(metric "${NODE_HTTP[$n]}" switchboard_media_rtp_forwarded_total)")
  done
  [ "$rc" = 0 ] || log "media $mode round $round: loadtest exit $rc (see $out/media-$round-$mode.*)"
  python3 - "$out/media-$round-$mode.json" "$mode" "$round" "$rc" "$la" "${nodes[*]}" \
    "${cpu0[*]}" "${cpu1[*]}" "${fwd0[*]}" "${fwd1[*]}" "$samples" "$owners" \
    >>"$out/media.jsonl" <<'EOF'
import json, sys
path, mode, rnd, rc, la, nodes, c0, c1, f0, f1, samples, owners = sys.argv[1:]
nodes = nodes.split()
fl = lambda s: [float(x) for x in s.split()]
c0, c1, f0, f1 = fl(c0), fl(c1), fl(f0), fl(f1)
peak = {n: [0, 0] for n in nodes}
for line in open(samples):
    f = line.split()
    if len(f) == 3:
        peak[f[0]][0] = max(peak[f[0]][0], int(float(f[1])))
        peak[f[0]][1] = max(peak[f[0]][1], int(float(f[2])))
per = {n: {"rooms_max": peak[n][0], "participants_max": peak[n][1],
           "forwarded": int(f1[i] - f0[i]), "cpu_s": round(c1[i] - c0[i], 2)} for i, n in enumerate(nodes)}
rec = {"mode": mode, "round": int(rnd), "exit": int(rc), "load": float(la), "nodes": per,
       "room_owners_mid_run": owners.split()}
try:
    r = json.load(open(path))
except (OSError, ValueError):
    r = None
if r:
    kinds = {k["kind"]: k for k in r["media"]}
    rec.update({
        "run_id": r["run_id"],
        "connected": r["participants"]["connected"], "requested": r["participants"]["requested"],
        "received": sum(k["received"] for k in r["media"]),
        "expected": sum(k["expected"] for k in r["media"]),
        "lost": sum(k["lost"] for k in r["media"]),
        "loss": {k: v["loss_percent"] for k, v in kinds.items()},
        "latency_ms": {k: [v["latency"]["p50_us"] / 1000, v["latency"]["p99_us"] / 1000,
                           v["latency"]["max_us"] / 1000] for k, v in kinds.items()},
        "join_p50_ms": r["join_latency"]["p50_us"] / 1000,
        "window_forwarded_target": (r.get("server_metrics") or {}).get("forwarded"),
        "expected_forwarded": (r.get("server_metrics") or {}).get("expected_forwarded"),
        "errors": r["errors"], "server_errors": r["server_errors"],
    })
print(json.dumps(rec))
g = rec.get
print(f"media round {rnd} {mode:7}: connected {g('connected')}/{g('requested')}, received "
      f"{g('received')}/{g('expected')}, loss {g('loss')}, nodes {per}, owners {rec['room_owners_mid_run']}",
      file=sys.stderr)
EOF
  until_empty "${nodes[@]}"
  for n in "${nodes[@]}"; do keep_metrics "$n" "media-$round-$mode"; stop_node "$n"; done
}

if [[ " $parts " == *" 2 "* ]]; then
  log "part 2: media, loadtest run 4 rooms x 4, $media_duration"
  for round in $(seq 1 "$media_rounds"); do
    media_run cluster "$round"
    media_run single "$round"
  done
fi

# --- 3. owner death -> media back -------------------------------------------
if [[ " $parts " == *" 3 "* ]]; then
  log "part 3: owner killed -> media back (tests/cluster.rs), $failover_runs runs"
  timeout 3600 cargo test --release --test cluster --no-run >"$out/test-build.log" 2>&1 \
    || die "cargo test --no-run (see $out/test-build.log)"
  for i in $(seq 1 "$failover_runs"); do
    rc=0
    timeout 300 cargo test --release --test cluster -- --nocapture --exact \
      when_the_rooms_node_dies_its_participants_rejoin_on_a_live_node \
      >"$out/failover-$i.txt" 2>&1 || rc=$?
    fig="$(grep -o 'owner killed -> media back at both clients: .*' "$out/failover-$i.txt" | sed 's/.*: //' || true)"
    echo "$i $rc ${fig:-none} $(loadavg)" >>"$out/failover.txt"
    log "failover run $i: exit $rc, ${fig:-no figure}"
  done
fi

# --- the tables ---------------------------------------------------------------
python3 - "$out" <<'EOF' | tee "$out/figures.md"
import json, os, sys
out = sys.argv[1]
meta = dict(l.rstrip("\n").split("=", 1) for l in open(os.path.join(out, "meta")))
print(f"{meta['date']}, {meta['machine']}, commit {meta['commit']}\n")
load = lambda f: [json.loads(l) for l in open(os.path.join(out, f)) if l.strip()]
sig = load("signaling.jsonl")
if sig:
    r0 = sig[0]
    print("### Signaling: relayed vs direct vs single node\n")
    print("| round | mode | clients on | load | joined | join p50 / p99 / max (ms) | ping p50 / p99 / max (ms) "
          "| pings ok | relayed frames a→b / b→a | CPU whole run: node-a / node-b / single / redis (s) "
          "| CPU ping phase: node-a / node-b / single / redis (s) | CPU per ping, all processes (µs) |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    on = {"relayed": "node-a (rooms on node-b)", "direct": "node-b (owner)", "single": "single"}
    for r in sig:
        c = r["cpu_s"]
        f = lambda k: f"{r.get(k, float('nan')):.2f}"
        cp = r.get("cpu_ping_phase_s")
        cps = f"{cp['node_a']:.2f} / {cp['node_b']:.2f} / {cp['single']:.2f} / {cp['redis']:.2f}" if cp else "—"
        per = f"{1e6 * sum(cp.values()) / r['pings_ok']:.0f}" if cp and r.get("pings_ok") else "—"
        print(f"| {r['round']} | {r['mode']} | {on[r['mode']]} | {r['load']:.2f} | {r.get('joined')}/{r.get('requested')} "
              f"| {f('join_p50')} / {f('join_p99')} / {f('join_max')} | {f('ping_p50')} / {f('ping_p99')} / {f('ping_max')} "
              f"| {r.get('pings_ok')}/{r.get('pings_expected')} | {r['relayed_to_owner']:.0f} / {r['relayed_to_client']:.0f} "
              f"| {c['node_a']:.2f} / {c['node_b']:.2f} / {c['single']:.2f} / {c['redis']:.2f} | {cps} | {per} |")
    bad = [r for r in sig if r["exit"] != 0 or r.get("errors") or r.get("server_errors")]
    for r in bad:
        print(f"\nround {r['round']} {r['mode']}: exit {r['exit']}, errors {r.get('errors')}, server errors {r.get('server_errors')}")
    print()
med = load("media.jsonl")
if med:
    print("### Media: loadtest run 4 rooms × 4 (Opus + 500 kbit/s VP8) against node-a of two nodes vs one node\n")
    print("| round | mode | load | node | rooms (max) | participants (max) | forwarded RTP | CPU (s) |")
    print("| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for r in med:
        for n, v in r["nodes"].items():
            print(f"| {r['round']} | {r['mode']} | {r['load']:.2f} | {n} | {v['rooms_max']} | {v['participants_max']} "
                  f"| {v['forwarded']:,} | {v['cpu_s']:.2f} |")
        if len(r["nodes"]) > 1:
            tot = lambda k: sum(v[k] for v in r["nodes"].values())
            print(f"| {r['round']} | {r['mode']} | | **both** | {tot('rooms_max')} | {tot('participants_max')} "
                  f"| **{tot('forwarded'):,}** | **{tot('cpu_s'):.2f}** |")
    print()
    print("| round | mode | room owners (Redis, mid run) | connected | received / expected (window) | loss audio / video | latency audio p50 / p99 / max (ms) | latency video p50 / p99 / max (ms) | join p50 (ms) |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in med:
        lat = r.get("latency_ms", {}); loss = r.get("loss", {})
        l3 = lambda k: " / ".join(f"{x:.2f}" for x in lat[k]) if k in lat else "—"
        lp = lambda k: f"{loss[k]:.3f} %" if k in loss else "—"
        owners = ", ".join(r["room_owners_mid_run"]) or "—"
        print(f"| {r['round']} | {r['mode']} | {owners} | {r.get('connected')}/{r.get('requested')} "
              f"| {r.get('received', 0):,} / {r.get('expected', 0):,} | {lp('audio')} / {lp('video')} "
              f"| {l3('audio')} | {l3('video')} | {r.get('join_p50_ms', float('nan')):.0f} |")
    for r in med:
        if r["exit"] != 0 or r.get("errors") or r.get("server_errors"):
            print(f"\nround {r['round']} {r['mode']}: exit {r['exit']}, errors {r.get('errors')}, server errors {r.get('server_errors')}")
    print()
fo = [l.split() for l in open(os.path.join(out, "failover.txt")) if l.strip()]
if fo:
    print("### Owner killed (SIGKILL) → media back at both clients\n")
    print("| run | exit | owner killed → media back | load |")
    print("| ---: | ---: | ---: | ---: |")
    def secs(d):
        try:
            return f"{float(d[:-2]) / 1000:.2f} s" if d.endswith("ms") else f"{float(d[:-1]):.2f} s"
        except ValueError:
            return d
    for f in fo:
        print(f"| {f[0]} | {f[1]} | {secs(f[2])} | {f[3]} |")
EOF
