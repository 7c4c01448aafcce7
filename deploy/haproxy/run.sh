#!/usr/bin/env bash
# HAProxy (TCP mode) in front of N beast nodes, health-checked on each
# node's /readyz (admin port). Usage:
#   deploy/haproxy/run.sh LISTEN_PORT STATS_PORT NODE_HOST:PORT:ADMIN_PORT...
# e.g. deploy/haproxy/run.sh 7000 7001 127.0.0.1:7878:9464 127.0.0.1:7879:9465
# Writes the config to $HAPROXY_CFG (default: a temp file), checks it with
# `haproxy -c`, then runs haproxy in the foreground (exec: its pid is this
# script's). With CHECK_ONLY=1 it stops after the check.
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n 2,9p "$0" >&2
    exit 2
fi
command -v haproxy >/dev/null || { echo "haproxy not found (apt-get install haproxy)" >&2; exit 3; }
listen=$1 stats=$2
shift 2
cfg=${HAPROXY_CFG:-$(mktemp /tmp/beast-haproxy-XXXXXX.cfg)}
here=$(cd "$(dirname "$0")" && pwd)
{
    sed -e "s/@LISTEN@/$listen/" -e "s/@STATS@/$stats/" "$here/haproxy.cfg.in"
    i=0
    for n in "$@"; do
        IFS=: read -r host port admin <<<"$n"
        echo "    server node$i $host:$port check port $admin"
        i=$((i + 1))
    done
} >"$cfg"
haproxy -c -q -f "$cfg"
echo "haproxy: config $cfg" >&2
[ "${CHECK_ONLY:-0}" = 1 ] && exit 0
exec haproxy -db -f "$cfg"
