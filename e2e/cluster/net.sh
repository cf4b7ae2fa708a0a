# shellcheck shell=bash
# The test bed's private network (sourced by up/down/status; needs lib.sh first).
#
#   root namespace (this machine)            NET_ROUTER_NS ("the data-centre router")
#   ROOT_VETH 10.77.255.1/30  <-- veth -->   uplink 10.77.255.2/30
#     routes: 10.77.0.0/24,                  NODE_BRIDGE 10.77.0.1/24 --- veth --- real-1 10.77.0.11
#             10.244.0.0/16 (pods),                                   --- veth --- real-2 10.77.0.12
#             10.96.0.0/16 (Services)                                 --- veth --- ...
#     via 10.77.255.2                        routes: 10.244.i.0/24 via 10.77.0.(10+i)
#                                            kube-proxy (iptables): Service ClusterIPs
#
# Everything lives in namespaces the bed creates; the root namespace gains one veth and three
# routes and nothing is bridged to a physical interface, so no server the bed starts is reachable
# from outside this machine. Forwarding is switched on only inside the router and node
# namespaces (net.ipv4.ip_forward is per namespace), never in the root namespace.

in_router() { ip netns exec "$NET_ROUTER_NS" "$@"; }

net_is_up() {
  [[ -e "/run/netns/$NET_ROUTER_NS" ]] && ip -br addr show dev "$ROOT_VETH" 2>/dev/null | grep -q "$ROOT_IP/"
}

net_up() {
  command -v ip >/dev/null || die "ip (iproute2) is needed"
  if net_is_up; then return 0; fi
  log "creating the bed network (router namespace $NET_ROUTER_NS, $ROOT_VETH $ROOT_IP)"
  ip netns list | grep -qw "$NET_ROUTER_NS" || ip netns add "$NET_ROUTER_NS"
  ip link del "$ROOT_VETH" 2>/dev/null || true
  ip link add "$ROOT_VETH" type veth peer name uplink netns "$NET_ROUTER_NS"
  ip addr add "$ROOT_IP/30" dev "$ROOT_VETH"
  ip link set "$ROOT_VETH" up
  in_router ip link set lo up
  in_router ip addr add "$ROUTER_UPLINK_IP/30" dev uplink
  in_router ip link set uplink up
  in_router ip link add "$NODE_BRIDGE" type bridge
  in_router ip addr add "$NODE_GW/24" dev "$NODE_BRIDGE"
  in_router ip link set "$NODE_BRIDGE" up
  in_router sysctl -qw net.ipv4.ip_forward=1
  in_router ip route add default via "$ROOT_IP"
  local r
  for r in "$NODE_NET" "$CLUSTER_POD_CIDR" "$SERVICE_CIDR"; do
    ip route replace "$r" via "$ROUTER_UPLINK_IP" dev "$ROOT_VETH"
  done
}

net_down() {
  ip link del "$ROOT_VETH" 2>/dev/null || true # takes the routes through it along
  if [[ -e "/run/netns/$NET_ROUTER_NS" ]]; then
    ip netns del "$NET_ROUTER_NS" && log "removed the bed network ($NET_ROUTER_NS)"
  fi
}

# node_index NAME: real-3 -> 3
node_index() { local n=${1#"$REAL_NODE_PREFIX"}; [[ $n =~ ^[0-9]+$ ]] || die "not a real node name: $1"; echo "$n"; }
node_ip() { echo "$NODE_NET_PREFIX.$((10 + $(node_index "$1")))"; }
node_pod_cidr() { echo "10.244.$(node_index "$1").0/24"; }
node_veth() { echo "veth-$1"; } # the router's end of a node's link
# The router's end of a node's second link, the one layer-2 VMs use (docs/network.md, "On the test
# bed"). It joins the same bridge: the VMs live on the nodes' own segment, NODE_NET.
node_l2_veth() { echo "l2-$1"; }

# The router's route to a node's pods (the nodes themselves add theirs at start).
net_route_node() { in_router ip route replace "$(node_pod_cidr "$1")" via "$(node_ip "$1")"; }
