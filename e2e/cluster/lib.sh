# shellcheck shell=bash disable=SC2034
# Common settings for the Lockstep test-bed scripts (sourced, not executed).
# Everything that is a path or a port is defined here, overridable by environment variables.

set -euo pipefail

CLUSTER_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$CLUSTER_DIR/../.." && pwd)
# shellcheck source=versions.env
. "$CLUSTER_DIR/versions.env"

# Cache for the built tools and Go's module/build caches: outside the work tree.
LOCKSTEP_CACHE=${LOCKSTEP_CACHE:-${HOME:-/root}/.cache/lockstep}
K8S_ROOT="$LOCKSTEP_CACHE/k8s-$K8S_VERSION"
BIN_DIR=${LOCKSTEP_BIN_DIR:-$K8S_ROOT/bin}
SRC_DIR="$K8S_ROOT/src"
# Running cluster state (certificates, etcd data, logs, pids): an ignored folder of this checkout.
WORK_DIR=${LOCKSTEP_CLUSTER_WORK:-$REPO_ROOT/e2e/.work/cluster}

# Loopback, and the bed's own private network (below). Non-default ports so that a stray
# default-port service does not collide.
HOST=127.0.0.1
ETCD_CLIENT_PORT=${LOCKSTEP_ETCD_PORT:-23790}
ETCD_PEER_PORT=${LOCKSTEP_ETCD_PEER_PORT:-23800}
APISERVER_PORT=${LOCKSTEP_APISERVER_PORT:-16443}
KCM_PORT=${LOCKSTEP_KCM_PORT:-10357}
SCHEDULER_PORT=${LOCKSTEP_SCHEDULER_PORT:-10359}
KWOK_PORT=${LOCKSTEP_KWOK_PORT:-10347}

KUBECONFIG_PATH="$WORK_DIR/kubeconfig"

# ---- The bed's private network (e2e/cluster/net.sh) -------------------------------------------
# Host-only: a network namespace NET_ROUTER_NS plays the data-centre router (the nodes' bridge,
# routes to every pod CIDR, a kube-proxy for Service ClusterIPs); this machine's root namespace
# reaches it over one veth pair and owns only ROOT_IP. Nothing is bridged to a physical interface.
NET_ROUTER_NS=${LOCKSTEP_ROUTER_NS:-lockstep-router}
ROOT_VETH=lst-router0           # root-namespace end of the veth pair to the router
ROOT_IP=10.77.255.1             # this machine, as the nodes see it: the apiserver binds here
ROUTER_UPLINK_IP=10.77.255.2    # the router's end of that pair
NODE_NET_PREFIX=10.77.0         # the nodes' shared layer-2 segment (bridge NODE_BRIDGE in the router)
NODE_NET=$NODE_NET_PREFIX.0/24
NODE_GW=$NODE_NET_PREFIX.1      # the router on that segment
NODE_BRIDGE=br-nodes
# Layer-2 VMs (docs/network.md, "On the test bed") take free addresses on NODE_NET, from
# $NODE_NET_PREFIX.200 up, with NODE_GW as their gateway. Their pods join through the bed's
# lockstep-l2 CNI plugin, which stands in for Multus: it acts on pods annotated with the network
# L2_NETWORK (the name an FTVM's spec.network.layer2.networkAttachment gives).
L2_NETWORK=testbed-l2
L2_BRIDGE=lsl2                  # each node's bridge for its second link (l2up)
L2_TAP_UID=65532                # the agent's uid: it opens its TAP with no capability
CLUSTER_POD_CIDR=10.244.0.0/16  # real nodes' pods: node i gets 10.244.i.0/24
SERVICE_CIDR=10.96.0.0/16
# The apiserver: on the bed network so that real nodes and their pods reach it (kube-proxy maps
# the kubernetes Service 10.96.0.1:443 to it), and this machine too.
APISERVER_HOST=$ROOT_IP

# ---- Real nodes (e2e/cluster/realnode.sh): kubelet + containerd + kube-proxy each ---------------
REAL_NODE_PREFIX=real-
# Label on every real node (kwok nodes carry type=kwok and the KWOK_TAINT taint instead).
REAL_NODE_LABEL=testbed.lockstep.dev/real
# kwok nodes run nothing; this taint keeps ordinary workloads (and users' FTVMs) off them. Tests
# that want kwok nodes tolerate it and select type=kwok.
KWOK_TAINT_KEY=testbed.lockstep.dev/kwok
# Every real node's processes live below this cgroup, in every v1 hierarchy.
CGROUP_PARENT=lockstep-testbed
CGROUP_CONTROLLERS=(cpu cpuacct cpuset memory pids blkio devices freezer systemd)
# Container images for real nodes: built here (e2e/cluster/images), imported into each node.
IMAGES_DIR="$WORK_DIR/images"
PAUSE_IMAGE=registry.k8s.io/pause:3.10.1
NODES=(node-a node-b node-c)
# The extended resource that the FT VM pods request, and how many each fake node offers.
KVM_RESOURCE=devices.lockstep.dev/kvm
KVM_PER_NODE=8
# kwok manages (heartbeats) exactly the nodes with this label set to "on"; node-fail removes it.
HEARTBEAT_LABEL=testbed.lockstep.dev/heartbeat
# Node loss detection: kwok renews each node's Lease every NODE_LEASE_SECONDS/4; the
# controller-manager marks a node Unknown (NotReady) NODE_GRACE after its last renewal.
NODE_LEASE_SECONDS=${LOCKSTEP_NODE_LEASE_SECONDS:-8}
NODE_GRACE=${LOCKSTEP_NODE_GRACE:-10s}
NODE_MONITOR_PERIOD=${LOCKSTEP_NODE_MONITOR_PERIOD:-1s}
# tolerationSeconds that the DefaultTolerationSeconds admission plugin gives pods for the
# not-ready/unreachable NoExecute taints (Kubernetes' default: 300): eviction after this long.
TOLERATION_SECONDS=${LOCKSTEP_TOLERATION_SECONDS:-30}
# Fake pod IPs that kwok assigns: loopback, so that nothing ever sends traffic off this machine,
# and a local agent process can bind its pod's IP. (EndpointSlices refuse loopback addresses.)
POD_CIDR=${LOCKSTEP_POD_CIDR:-127.10.0.1/16}

GO=${GO:-}
if [[ -z "$GO" ]]; then
  if command -v go >/dev/null 2>&1; then GO=$(command -v go)
  elif [[ -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go
  else GO=go
  fi
fi

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The Go environment for builds: caches under LOCKSTEP_CACHE, the local toolchain, frugal parallelism.
go_env() {
  export GOMODCACHE="$LOCKSTEP_CACHE/go/mod"
  export GOCACHE="$LOCKSTEP_CACHE/go/build"
  export GOTOOLCHAIN=local
  export GOFLAGS="-mod=mod -buildvcs=false"
  export CGO_ENABLED=0
  export GOMAXPROCS=${LOCKSTEP_BUILD_JOBS:-2}
}

# Show the last lines of a log file to stderr.
show_tail() {
  local f=$1 n=${2:-30}
  if [[ -f "$f" ]]; then
    printf -- '--- last %s lines of %s ---\n' "$n" "$f" >&2
    tail -n "$n" "$f" >&2
    printf -- '---\n' >&2
  fi
}

# ours NAME PID: is PID a test-bed process NAME (its command line starts with the path …/NAME)?
ours() {
  tr '\0' ' ' <"/proc/$2/cmdline" 2>/dev/null | grep -q -- "^[^ ]*/$1 "
}

# lock_bed: serialize up/down of one bed (several people share a checkout); waits up to 5 min.
lock_bed() {
  mkdir -p "$(dirname "$WORK_DIR")"
  exec 9>"$WORK_DIR.lock"
  if ! flock -w 300 9; then
    die "another e2e/cluster/up or down holds $WORK_DIR.lock for over 5 minutes"
  fi
}

# write_kubeconfig FILE CERT USER: a kubeconfig for the bed's apiserver with an embedded client
# certificate (pki/CERT.crt and .key).
write_kubeconfig() {
  local file=$1 cert=$2 user=$3
  local tmp="$file.tmp"
  cat >"$tmp" <<KC
apiVersion: v1
kind: Config
clusters:
- name: lockstep-testbed
  cluster:
    server: https://$APISERVER_HOST:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 <"$WORK_DIR/pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$WORK_DIR/pki/$cert.crt")
    client-key-data: $(base64 -w0 <"$WORK_DIR/pki/$cert.key")
contexts:
- name: lockstep-testbed
  context:
    cluster: lockstep-testbed
    user: $user
current-context: lockstep-testbed
KC
  chmod 600 "$tmp"
  mv -f "$tmp" "$file"
}
tools_present() {
  local t
  for t in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy kwok helm kubeconform; do
    [[ -x "$BIN_DIR/$t" ]] || return 1
  done
}

# The allocatable resources of every fake node.
resources() {
  cat <<RES
    cpu: "8"
    memory: 16Gi
    pods: "110"
    ephemeral-storage: 100Gi
    $KVM_RESOURCE: "$KVM_PER_NODE"
RES
}
# node_manifest NAME IP [TAINT_KEY]: a kwok fake node labelled like a real one. Every kwok node is
# tainted KWOK_TAINT_KEY=true:NoSchedule (it runs no containers, so nothing should land there by
# accident); TAINT_KEY adds a second NoSchedule taint (keeps other tests off a private node).
node_manifest() {
  local name=$1 ip=$2 taint=${3:-}
  local spec=$'spec:\n  taints:\n  - key: '"$KWOK_TAINT_KEY"$'\n    value: "true"\n    effect: NoSchedule'
  [[ -z "$taint" ]] || spec+=$'\n  - key: '"$taint"$'\n    value: "true"\n    effect: NoSchedule'
  cat <<NODE
---
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations:
    node.alpha.kubernetes.io/ttl: "0"
    kwok.x-k8s.io/node: fake
  labels:
    beta.kubernetes.io/arch: amd64
    beta.kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: $name
    kubernetes.io/role: agent
    node-role.kubernetes.io/agent: ""
    type: kwok
    $HEARTBEAT_LABEL: "on"
$spec
status:
  addresses:
  - type: InternalIP
    address: $ip
  - type: Hostname
    address: $name
  allocatable:
$(resources)
  capacity:
$(resources)
  nodeInfo:
    architecture: amd64
    operatingSystem: linux
    osImage: kwok fake node (Lockstep test bed)
    kubeletVersion: $K8S_VERSION
    kubeProxyVersion: $K8S_VERSION
NODE
}
