#!/usr/bin/env bash
# Prepares this machine to run the project's images and kind cluster, offline and
# contained. Idempotent: every step checks first and says when there is nothing to do.
#
#   - Debian's docker.io and debootstrap (pinned bookworm versions);
#   - runc-nosysres (hack/kind/runcwrap), dockerd's default runtime: this machine's
#     capability bounding set lacks CAP_SYS_RESOURCE, which privileged containers ask for;
#   - dockerd in the background with no default bridge, no IP forwarding, no NAT;
#   - the `kind` docker network (bridge kind0, masquerade off) and a FORWARD guard: traffic
#     entering kind0 may only leave through kind0, never be routed elsewhere;
#   - host routes `unreachable` for the pod and service ranges, so no pod or service
#     traffic can leave the machine.
#
# Needs root. EDGEAI_CACHE overrides the cache root (default ~/.cache/edgeai).
set -euo pipefail

DOCKER_DEB=20.10.24+dfsg1-1+deb12u1+b6
DEBOOTSTRAP_DEB=1.0.128+nmu2+deb12u2
KIND_SUBNET=172.18.0.0/16
KIND_GATEWAY=172.18.0.1
KIND_BRIDGE=kind0
POD_CIDR=10.244.0.0/16      # kind's default podSubnet
SERVICE_CIDR=10.96.0.0/12   # kind's default serviceSubnet

here=$(cd "$(dirname "$0")" && pwd)
cache=${EDGEAI_CACHE:-$HOME/.cache/edgeai}
log() { printf '[kind-host %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
[ "$(id -u)" = 0 ] || { echo "hack/kind/host.sh needs root (apt, dockerd, iptables, routes)" >&2; exit 1; }

installed() { [ "$(dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null)" = "install ok installed $2" ]; }
if installed docker.io "$DOCKER_DEB" && installed debootstrap "$DEBOOTSTRAP_DEB"; then
  log "docker.io $DOCKER_DEB and debootstrap $DEBOOTSTRAP_DEB installed"
else
  log "apt-get install docker.io=$DOCKER_DEB debootstrap=$DEBOOTSTRAP_DEB"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "docker.io=$DOCKER_DEB" "debootstrap=$DEBOOTSTRAP_DEB" >&2
fi
# hack/images/build.sh strips the images' shared libraries with binutils' strip
command -v strip >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q binutils >&2

wrap=$cache/runcwrap/runc-nosysres
wrap_stamp=$(cat "$here/runcwrap/go.mod" "$here/runcwrap/main.go" | sha256sum | cut -c1-16)
if [ -x "$wrap" ] && [ "$(cat "$wrap.stamp" 2>/dev/null)" = "$wrap_stamp" ]; then
  log "runc-nosysres cached"
else
  log "building runc-nosysres (hack/kind/runcwrap)"
  mkdir -p "$(dirname "$wrap")"
  (cd "$here/runcwrap" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$wrap" .)
  echo "$wrap_stamp" > "$wrap.stamp"
fi
cmp -s "$wrap" /usr/local/bin/runc-nosysres || install -m 0755 "$wrap" /usr/local/bin/runc-nosysres

daemon_json='{
  "runtimes": {"runc-nosysres": {"path": "/usr/local/bin/runc-nosysres"}},
  "default-runtime": "runc-nosysres"
}'
mkdir -p /etc/docker
if [ "$(cat /etc/docker/daemon.json 2>/dev/null)" != "$daemon_json" ]; then
  echo "$daemon_json" > /etc/docker/daemon.json
  log "wrote /etc/docker/daemon.json (default runtime runc-nosysres)"
  if pid=$(cat /var/run/docker.pid 2>/dev/null) && kill -0 "$pid" 2>/dev/null; then
    log "dockerd (pid $pid) is running with another daemon.json: reload it with kill -HUP $pid or restart it"
  fi
fi

if docker info >/dev/null 2>&1; then
  log "dockerd already running"
else
  log "starting dockerd (no default bridge, no forwarding, no NAT); log: $cache/dockerd.log"
  nohup /usr/sbin/dockerd --bridge=none --ip-forward=false --ip-masq=false >"$cache/dockerd.log" 2>&1 &
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not answer in 60 s; see $cache/dockerd.log" >&2; exit 1; }
  log "dockerd up (pid $(cat /var/run/docker.pid))"
fi

if docker network inspect kind >/dev/null 2>&1; then
  log "docker network kind exists"
else
  # Not --internal: Docker publishes no ports there and `kind create` fails to find the API port.
  docker network create --driver bridge --subnet "$KIND_SUBNET" --gateway "$KIND_GATEWAY" \
    -o com.docker.network.bridge.name="$KIND_BRIDGE" \
    -o com.docker.network.bridge.enable_ip_masquerade=false kind >/dev/null
  log "created docker network kind ($KIND_SUBNET on bridge $KIND_BRIDGE, no masquerade)"
fi
bridge=$(docker network inspect kind -f '{{index .Options "com.docker.network.bridge.name"}}')
[ -n "$bridge" ] || bridge=br-$(docker network inspect kind -f '{{.Id}}' | cut -c1-12)
# By interface, not by address: node-to-pod traffic between nodes crosses the bridge with pod addresses.
if iptables -C FORWARD -i "$bridge" ! -o "$bridge" -j DROP 2>/dev/null; then
  log "FORWARD guard for $bridge in place"
else
  iptables -I FORWARD 1 -i "$bridge" ! -o "$bridge" -j DROP
  log "added FORWARD guard: -i $bridge ! -o $bridge -j DROP"
fi

for cidr in "$POD_CIDR" "$SERVICE_CIDR"; do
  if ip route show type unreachable | grep -q "^unreachable $cidr"; then
    log "route unreachable $cidr in place"
  else
    ip route replace unreachable "$cidr"
    log "added route unreachable $cidr"
  fi
done
log "host ready: $(docker version -f 'docker {{.Server.Version}}') , ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)"
