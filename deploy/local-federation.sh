#!/usr/bin/env bash
# A whole FedNano federation on this machine, the way it runs on several:
# a Flower SuperLink and SuperNodes as separate processes over TLS with
# SuperNode authentication, and the split channel over TLS with the same CA.
# Runs one experiment with `fednano deploy-run` (`flwr run`, followed to its end:
# the script fails when the ServerApp does), checks that an unregistered SuperNode
# is refused, and stops everything it started (by process group) on exit.
# Only the server prepares the backbone: it packs the client bundle (`fednano bundle
# pack`), and each node gets its own cache (WORK_DIR/node<i>/cache) holding only that
# bundle, unpacked and verified (`fednano bundle unpack`); nodes never fetch or prepare.
#
#   deploy/local-federation.sh WORK_DIR [RUN_CONFIG.toml] [NUM_NODES]
#
# RUN_CONFIG defaults to configs/tiny.toml. Results land in WORK_DIR/out; logs
# of every process in WORK_DIR/logs. ROUND_TIMEOUT (seconds, default 600) sets
# federation.round_timeout. CLIENTAPP=package.module:app runs another ClientApp
# (e.g. one that wraps FedNano's; the tests' makes a client hang): its top-level
# package is packed into the app next to fednano.
# Each node hands its messages to a warm worker (fednano/federation/node_worker.py), which keeps
# the NanoEdge and the split channel between messages and logs to WORK_DIR/node<i>/state/node-worker.log;
# WARM_WORKER=0 makes every message do its work in Flower's fresh ClientApp process instead.
# Nodes with their own data: ON_NODES=1 sets data.on_nodes, and NODE_CONFIG_<i> is
# added to SuperNode i's node config, e.g.
#   ON_NODES=1 NODE_CONFIG_0="dataset='llava-json' data-path='/srv/a/data.json'" \
#   NODE_CONFIG_1="dataset='scienceqa' data-path='/srv/b/ScienceQA'" deploy/local-federation.sh WORK
# The run config's own data is then only the server's global test set. PARTITION_ID_<i> gives SuperNode i
# another partition-id than i (the tests make two nodes claim one).
# IDLE_CPU_SECONDS=60 starts everything, measures the CPU the idle Flower processes use over 60 s, and stops.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$(mkdir -p "$1" && cd "$1" && pwd)
BASE_CONFIG=${2:-$REPO/configs/tiny.toml}
NODES=${3:-2}
VENV=${VENV:-$REPO/.venv}
export PATH="$VENV/bin:$PATH"
export FLWR_HOME="$ROOT/flwr-home" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Flower's SuperExecs poll for tasks every FLWR_SUPEREXEC_TASK_POLL_INTERVAL seconds (Flower's default, 1 s, unless set):
# 0.1 s starts each ClientApp up to 0.9 s sooner, but the idle Flower processes of 5 nodes then burn 38 % of a core
# (3-7 % at 1 s; IDLE_CPU_SECONDS=60 measures it, BENCHMARKS.md)
export FEDNANO_CACHE="${FEDNANO_CACHE:-$ROOT/cache}"
mkdir -p "$ROOT"/{logs,app,flwr-home}
cd "$ROOT"

PGIDS=()
# Every process below ours, detached ones included (flower-superlink starts its SuperExec in a new session).
descendants() { local p kids; for p in "$@"; do kids=$(pgrep -P "$p" | tr '\n' ' '); [ -n "$kids" ] && { echo "$kids"; descendants $kids; }; done; return 0; }
cleanup() {
  local pids
  pids=$(descendants $(for g in "${PGIDS[@]}"; do pgrep -g "$g" || true; done)) || true
  # the nodes' warm workers (in sessions of their own; they would also leave within a second of their SuperNode)
  pids="$pids $(pgrep -f "fednano.federation.node_worker .*--log $ROOT/" | tr '\n' ' ')" || true
  for g in "${PGIDS[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
  for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 20); do
    alive=0
    for g in "${PGIDS[@]}"; do kill -0 -- "-$g" 2>/dev/null && alive=1; done
    for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return
    sleep 0.5
  done
  for g in "${PGIDS[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
  for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
start() { local log=$1; shift; setsid "$@" >"$log" 2>&1 & PGIDS+=($!); }  # each daemon in its own process group
node_config() { local v="NODE_CONFIG_$1"; echo "${!v:-}"; }  # what node $1 sets for itself (its own data, ...)
partition() { local v="PARTITION_ID_$1"; echo "${!v:-$1}"; }  # node $1's partition-id ($1 unless PARTITION_ID_<i> says otherwise)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

bash "$REPO/deploy/make-certs.sh" "$ROOT" "$((NODES + 1))"   # the last key stays unregistered
LINK_PORT=$(free_port)
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fednano"

[superlink.fednano]
address = "127.0.0.1:$LINK_PORT"
root-certificates = "$ROOT/certs/ca.crt"
TOML

# The app as Flower packs it, and the run config: the split channel over TLS too.
cp "$REPO/pyproject.toml" app/ && cp -r "$REPO/fednano" "$REPO/configs" app/
if [ -n "${CLIENTAPP:-}" ]; then
  cp -r "$REPO/${CLIENTAPP%%.*}" app/
  sed -i "s|^clientapp = .*|clientapp = \"$CLIENTAPP\"|" app/pyproject.toml
fi
find app -name __pycache__ -prune -exec rm -rf {} +
python3 - "$BASE_CONFIG" "$ROOT/run.toml" "$ROOT" "$NODES" "${ROUND_TIMEOUT:-600}" "${ON_NODES:-0}" <<'PY'
import sys, tomllib
src, dst, root, nodes, timeout = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
cfg = tomllib.loads(open(src).read())
cfg.setdefault("model", {})["cache_dir"] = f"{root}/cache"
cfg.setdefault("data", {})["num_clients"] = nodes
if sys.argv[6] == "1":
    cfg["data"]["on_nodes"] = True
fed = cfg.setdefault("federation", {})
fed["round_timeout"] = timeout
cfg.setdefault("split", {}).update(tls_cert=f"{root}/certs/server.pem", tls_key=f"{root}/certs/server.key", tls_ca=f"{root}/certs/ca.crt")
def value(v):
    return ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, (int, float)) else '"' + str(v) + '"'
with open(dst, "w") as f:
    for section, values in cfg.items():
        f.write(f"[{section}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in values.items()) + "\n")
PY
# the server prepares (it holds the LLM) and packs the client bundle; each node unpacks it into a cache of its own
fednano bundle pack "$ROOT/nanoedge.tar" --config "$ROOT/run.toml" >logs/prepare.log 2>&1
for ((i = 0; i < NODES; i++)); do
  fednano bundle unpack "$ROOT/nanoedge.tar" --cache-dir "$ROOT/node$i/cache" >>logs/unpack.log 2>&1
done

start logs/superlink.log flower-superlink --ssl-ca-certfile "$ROOT/certs/ca.crt" --ssl-certfile "$ROOT/certs/server.pem" \
  --ssl-keyfile "$ROOT/certs/server.key" --enable-supernode-auth --disable-runtime-dependency-installation \
  --host 127.0.0.1 --port "$LINK_PORT"
for _ in $(seq 120); do grep -q "Uvicorn running on https://127.0.0.1:$LINK_PORT" logs/superlink.log && break; sleep 0.5; done
grep -q "Uvicorn running" logs/superlink.log || { echo "SuperLink did not start (logs/superlink.log)"; exit 1; }

for ((i = 0; i < NODES; i++)); do
  flwr supernode register "keys/node$i.pub" fednano >>logs/register.log 2>&1
  start "logs/supernode$i.log" env FEDNANO_CACHE="$ROOT/node$i/cache" flower-supernode --root-certificates "$ROOT/certs/ca.crt" \
    --superlink "127.0.0.1:$LINK_PORT" --auth-supernode-private-key "$ROOT/keys/node$i" \
    --node-config "partition-id=$(partition "$i") num-partitions=$NODES cache-dir='$ROOT/node$i/cache' state-dir='$ROOT/node$i/state' fetch-bundle=0 warm-worker=${WARM_WORKER:-1} $(node_config "$i")" \
    --port "$(free_port)"
done
for _ in $(seq 120); do [ "$(flwr supernode list 2>/dev/null | grep -c online)" -ge "$NODES" ] && break; sleep 1; done
echo "SuperLink on 127.0.0.1:$LINK_PORT (TLS, SuperNode auth), $NODES SuperNodes online"

if [ -n "${IDLE_CPU_SECONDS:-}" ]; then  # what the idle Flower processes cost (the task poll), then stop: no run
  flower_pids() { local p; p=$(for g in "${PGIDS[@]}"; do pgrep -g "$g" || true; done); echo $p $(descendants $p); }
  ticks() { local t=0 p; for p in $(flower_pids); do [ -r "/proc/$p/stat" ] && t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
  a=$(ticks); sleep "$IDLE_CPU_SECONDS"; b=$(ticks)
  echo "idle: $(flower_pids | wc -w) Flower processes used $(python3 -c "print(f'{($b - $a) / $(getconf CLK_TCK) / $IDLE_CPU_SECONDS:.1%}')") \
of a core over $IDLE_CPU_SECONDS s (FLWR_SUPEREXEC_TASK_POLL_INTERVAL=${FLWR_SUPEREXEC_TASK_POLL_INTERVAL:-1 (Flower default)})"
  exit 0
fi

set +e  # an unregistered SuperNode must be refused
timeout 60 flower-supernode --root-certificates "$ROOT/certs/ca.crt" --superlink "127.0.0.1:$LINK_PORT" \
  --auth-supernode-private-key "$ROOT/keys/node$NODES" --node-config "partition-id=0 num-partitions=$NODES" \
  --port "$(free_port)" >logs/unregistered.log 2>&1
code=$?
set -e
if [ $code -ne 0 ] && grep -q "Failed to activate SuperNode" logs/unregistered.log; then
  echo "unregistered SuperNode refused (exit $code)"
else
  echo "an unregistered SuperNode was NOT refused (exit $code; logs/unregistered.log)"; exit 1
fi

# `flwr run` exits 0 even when the ServerApp fails: deploy-run follows the run and exits 1 unless it completed
fednano deploy-run --app app --config "$ROOT/run.toml" --output "$ROOT/out" >logs/flwr-run.log 2>&1 || {
  echo "the run failed: $(grep '^error:' logs/flwr-run.log | tail -1) (logs/flwr-run.log)"; exit 1; }
python3 - "$ROOT/out/results.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except FileNotFoundError:
    sys.exit(f"no results: {sys.argv[1]} (see logs/flwr-run.log and logs/superlink.log)")
if not d.get("final"):
    sys.exit(f"the run did not finish: {sys.argv[1]}")
r = d["rounds"][-1]
print(f"federated run finished: {len(d['rounds'])} round(s), {r['clients_accepted']} clients merged in the last, "
      f"global accuracy {d['final']['global_accuracy']:.4f}; results in {sys.argv[1]}")
PY
