# shellcheck shell=bash
# Real nodes of the test bed (sourced by up/down/node-fail/node-recover/status; needs lib.sh and
# net.sh first). A real node is a kubelet, a containerd (with runc and the CNI bridge plugin) and a
# kube-proxy, all upstream and unmodified, sharing:
#   - a network namespace of their own, with one veth to the router's node bridge (NODE_NET);
#   - a private mount namespace in which the node's own directories are bound over /var/lib and
#     /var/log (kubelet hard-codes /var/lib/kubelet/device-plugins and empties it at start) and a
#     tmpfs is mounted over /run/containerd;
#   - a cgroup CGROUP_PARENT/NAME in every v1 hierarchy (the kubelet's cgroupRoot; the daemons
#     themselves in .../system), so the whole node can be frozen or killed at once.
# Both namespaces belong to the node's init process (e2e/cluster/node-init) and its children:
# when every process of the node is gone, so are its network (the veth vanishes) and its mounts.
# That is what node-fail does, and why a failed node keeps nothing serving.

node_dir() { echo "$WORK_DIR/nodes/$1"; }
node_pidfile() { echo "$WORK_DIR/run/node-$1.pid"; }
node_pid() { local f; f=$(node_pidfile "$1"); [[ -s "$f" ]] && cat "$f"; }
node_cgroup() { echo "/sys/fs/cgroup/$2/$CGROUP_PARENT/$1"; } # NAME CONTROLLER

# Is the node's init process alive (frozen counts as alive)?
node_alive() {
  local pid
  pid=$(node_pid "$1") || return 1
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "node-init"
}

node_frozen() {
  [[ "$(cat "$(node_cgroup "$1" freezer)/freezer.state" 2>/dev/null)" == FROZEN ]]
}

# Run a command inside a live node's namespaces (network and mounts), e.g. ctr or crictl.
node_exec() { # NAME CMD...
  local name=$1 pid; shift
  pid=$(node_pid "$name") || die "node $name is not running"
  nsenter -t "$pid" --net --mount -- "$@"
}

# Every real node the bed has created (by its state directory), sorted.
real_nodes() {
  local d
  for d in "$WORK_DIR"/nodes/"$REAL_NODE_PREFIX"*; do
    if [[ -d "$d" ]]; then basename "$d"; fi
  done | sort -V
}

# cgroups: NAME and NAME/system in every hierarchy (cpusets must be filled before tasks join).
cgroups_create() {
  local name=$1 c d
  for c in "${CGROUP_CONTROLLERS[@]}"; do
    [[ -d /sys/fs/cgroup/$c ]] || continue
    for d in "$CGROUP_PARENT" "$CGROUP_PARENT/$name" "$CGROUP_PARENT/$name/system"; do
      mkdir -p "/sys/fs/cgroup/$c/$d"
      if [[ $c == cpuset ]]; then
        cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$d/cpuset.cpus"
        cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$d/cpuset.mems"
      fi
    done
  done
}

# Every PID in the node's cgroups (the freezer hierarchy sees them all: runc joins every one).
node_cgroup_pids() {
  local root
  root=$(node_cgroup "$1" freezer)
  [[ -d "$root" ]] || return 0
  find "$root" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u
}

# Remove the node's cgroups bottom-up in every hierarchy (only empty ones can go).
cgroups_remove() {
  local name=$1 c root
  for c in "${CGROUP_CONTROLLERS[@]}"; do
    root=$(node_cgroup "$name" "$c")
    [[ -d "$root" ]] || continue
    find "$root" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

# node_kill NAME: SIGKILL every process of the node at once, as a power cut would. Freezing first
# means nothing can fork or react in between; the kills land when the cgroup thaws.
node_kill() {
  local name=$1 fz pids i
  fz=$(node_cgroup "$name" freezer)
  if [[ -d "$fz" ]]; then
    echo FROZEN >"$fz/freezer.state"
    for i in $(seq 100); do [[ "$(cat "$fz/freezer.state")" == FROZEN ]] && break; sleep 0.02; done
    mapfile -t pids < <(node_cgroup_pids "$name")
    ((${#pids[@]} == 0)) || kill -KILL "${pids[@]}" 2>/dev/null || true
    echo THAWED >"$fz/freezer.state"
  fi
  local pid
  pid=$(node_pid "$name") && kill -KILL "$pid" 2>/dev/null || true
  for i in $(seq 200); do
    [[ -z "$(node_cgroup_pids "$name")" ]] && ! node_alive "$name" && break
    sleep 0.05
  done
  [[ -z "$(node_cgroup_pids "$name")" ]] || log "warning: node $name still has processes: $(node_cgroup_pids "$name" | tr '\n' ' ')"
  rm -f "$(node_pidfile "$name")"
  cgroups_remove "$name"
}

# The kernel tears a dead network namespace down asynchronously; the router's end of its veth must
# be gone before a node with the same name starts again.
node_wait_link_gone() {
  local veth i
  for veth in "$(node_veth "$1")" "$(node_l2_veth "$1")"; do
    for i in $(seq 100); do
      in_router ip link show "$veth" >/dev/null 2>&1 || break
      sleep 0.05
    done
    in_router ip link del "$veth" 2>/dev/null || true
  done
}

# node_freeze NAME [--cut-network]: stop every process of the node where it stands. The kernel
# still answers for its sockets (a frozen host's NIC would not), so --cut-network also takes the
# node's link down at the router: then nothing reaches it at all.
node_freeze() {
  local name=$1 cut=${2:-}
  echo FROZEN >"$(node_cgroup "$name" freezer)/freezer.state"
  if [[ $cut == --cut-network ]]; then
    in_router ip link set "$(node_veth "$name")" down
    in_router ip link set "$(node_l2_veth "$name")" down 2>/dev/null || true
  fi
}

# Write the node's configuration (certificates come from up's gen_cert; see up).
node_configure() {
  local name=$1 dir ip cidr
  dir=$(node_dir "$name")
  ip=$(node_ip "$name")
  cidr=$(node_pod_cidr "$name")
  mkdir -p "$dir"/{var-lib,var-log,cni,cni-bin,logs}
  # The CNI plugins: Debian's, and the bed's lockstep-l2 (containerd 1.6 takes one directory).
  local plugin
  for plugin in /usr/lib/cni/*; do ln -sfn "$plugin" "$dir/cni-bin/"; done
  ln -sfn "$CLUSTER_DIR/cni/lockstep-l2" "$dir/cni-bin/lockstep-l2"
  cat >"$dir/node.env" <<ENV
NODE_NAME=$name
NODE_IP=$ip
NODE_GW=$NODE_GW
NODE_VETH=$(node_veth "$name")
NODE_BRIDGE=$NODE_BRIDGE
NODE_L2_VETH=$(node_l2_veth "$name")
L2_BRIDGE=$L2_BRIDGE
ROUTER_NS=$NET_ROUTER_NS
BIN_DIR=$BIN_DIR
IMAGES_DIR=$IMAGES_DIR
NODE_LABELS=$REAL_NODE_LABEL=true
ENV
  cat >"$dir/containerd.toml" <<TOML
# containerd for test-bed node $name (Debian's containerd 1.6 + runc; CRI v1 for kubelet $K8S_VERSION).
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
# runc cannot lower oom_score_adj here (root lacks CAP_SYS_RESOURCE in this sandbox).
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  # No AppArmor on these machines; seccomp RuntimeDefault is containerd's built-in profile.
  disable_apparmor = true
  # Never ask runc for an oom_score_adj below containerd's own (it would fail, see above).
  restrict_oom_score_adj = true
  # A device from a device plugin (/dev/kvm) is owned by the container's runAsUser/runAsGroup,
  # so a non-root agent can open a 0600 device node. See docs/device-plugin.md.
  device_ownership_from_security_context = true
  # Pod network namespaces under the (per-node tmpfs) state dir, not the machine's /run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$dir/cni-bin"
    conf_dir = "$dir/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
TOML
  cat >"$dir/cni/10-lockstep-bridge.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "lockstep-testbed",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$cidr"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {
      "type": "lockstep-l2",
      "network": "$L2_NETWORK",
      "bridge": "$L2_BRIDGE",
      "tapUser": $L2_TAP_UID,
      "kubeconfig": "$dir/kubelet.kubeconfig",
      "kubectl": "$BIN_DIR/kubectl"
    }
  ]
}
JSON
  cat >"$dir/kubelet.yaml" <<YAML
# kubelet for test-bed node $name. The settings that differ from a stock node are the ones these
# machines need (docs/testbed.md, "Real nodes").
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $WORK_DIR/pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $WORK_DIR/pki/kubelet-$name.crt
tlsPrivateKeyFile: $WORK_DIR/pki/kubelet-$name.key
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
# cgroup v1 (hybrid) without systemd: cgroupfs under a root of this node's own.
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupRoot: /$CGROUP_PARENT/$name
cgroupsPerQOS: true
failSwapOn: false
# Root here lacks CAP_SYS_RESOURCE: negative OOM scores cannot be set.
oomScoreAdj: 0
# Shorter than the controller-manager's grace ($NODE_GRACE) or the node flaps; renewed every 2 s.
nodeLeaseDurationSeconds: $NODE_LEASE_SECONDS
nodeStatusUpdateFrequency: 4s
# Three nodes share one disk and 24 GiB: evict only when really short.
evictionHard: {memory.available: 200Mi, nodefs.available: 2%, imagefs.available: 2%, nodefs.inodesFree: 2%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# Images are imported, never pulled; keep them (kubelet must not garbage-collect them either).
serializeImagePulls: false
maxPods: 40
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
protectKernelDefaults: false
shutdownGracePeriod: 0s
YAML
  cat >"$dir/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $WORK_DIR/kube-proxy.kubeconfig}
hostnameOverride: $name
bindAddress: $ip
mode: iptables
clusterCIDR: $CLUSTER_POD_CIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# 0 = leave the machine-wide conntrack settings alone (a namespace cannot change them anyway).
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
}

# node_start NAME: create the cgroups and start the node's init in new namespaces. Returns once
# the init wrote its PID; up then waits for the node to be Ready.
node_start() {
  local name=$1 dir pidf logf
  dir=$(node_dir "$name")
  pidf=$(node_pidfile "$name")
  logf="$dir/logs/node-init.log"
  if node_alive "$name"; then log "node $name already running (pid $(node_pid "$name"))"; return; fi
  node_wait_link_gone "$name"
  cgroups_create "$name"
  node_configure "$name"
  net_route_node "$name"
  [[ -f "$logf" ]] && mv -f "$logf" "$logf.prev"
  rm -f "$pidf"
  log "starting real node $name ($(node_ip "$name"), pods $(node_pod_cidr "$name"); log: $logf)"
  # Join the node's cgroups first: every process the node starts inherits them.
  # shellcheck disable=SC2016
  setsid bash -c '
    for c in "${@:4}"; do
      [[ -d /sys/fs/cgroup/$c ]] && echo $$ >"/sys/fs/cgroup/$c/$2/system/cgroup.procs"
    done
    echo $$ >"$0"
    exec unshare --net --mount --propagation private -- "$1" "$3"
  ' "$pidf" "$CLUSTER_DIR/node-init" "$CGROUP_PARENT/$name" "$dir" "${CGROUP_CONTROLLERS[@]}" \
    </dev/null >"$logf" 2>&1 9>&- &
  local i
  for i in $(seq 100); do [[ -s "$pidf" ]] && return; sleep 0.05; done
  die "real node $name did not start (no PID in $pidf within 5 s; see $logf)"
}

# node_wipe NAME: forget everything the node had (containers, images, kubelet state, logs).
node_wipe() {
  local dir
  dir=$(node_dir "$1")
  [[ -d "$dir" ]] || return 0
  node_alive "$1" && die "node $1 is running; kill it before wiping it"
  rm -rf "$dir"
}
