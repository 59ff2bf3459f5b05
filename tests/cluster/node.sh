# The real node of the test cluster, sourced by tests/cluster/up and tests/cluster/down.
#
# Its network lives in a network namespace of its own (NODE_NETNS), joined to the host by one
# veth pair: the pod bridge, kube-proxy's iptables rules and IP forwarding exist only there, and
# that namespace has no route off this machine. kubelet, containerd, kube-proxy and CoreDNS run
# in it (nsenter --net: the host's mount namespace, so kubelet's volume mounts are the ones
# containerd sees). Everything they keep is under $state/node; what they insist on writing
# elsewhere (kubelet: /var/lib/kubelet/device-plugins, /var/log/containers; containerd:
# /run/containerd/s shim sockets; CNI: /var/lib/cni cache; cgroups k8s.io/<id> in every
# hierarchy) is recorded in $NODE_RECORD when up creates it and removed by down.
#
# Needs (set by the caller): state, bin, here.

NODE_NAME=real-0
NODE_NETNS=qmodel-node
NODE_HOST_VETH=qmodel-h0
NODE_VETH=qmodel-n0
NODE_BRIDGE=qmodel-cni0
NODE_HOST_IP=10.201.0.1
NODE_IP=10.201.0.2
NODE_POD_CIDR=10.244.0.0/24
NODE_SERVICE_CIDR=10.96.0.0/16
NODE_DNS_IP=10.96.0.10
NODE_TAINT_KEY=qmodel.dev/real-node
# Outlives a wiped state dir: which cluster owns the node, the kernel values to restore, and the
# global paths up created.
NODE_RECORD=/run/qmodel-cluster
# Kernel values kubelet requires (it refuses to start otherwise with protectKernelDefaults).
NODE_SYSCTLS=(vm.overcommit_memory=1 kernel.panic=10 kernel.panic_on_oops=1)
# Paths outside $state that kubelet, containerd or CNI write no matter their configuration.
NODE_GLOBAL_PATHS=(/var/lib/kubelet /var/log/containers /var/log/pods /var/lib/cni /run/containerd
	/var/lib/containerd /opt/containerd /etc/cni /usr/libexec/kubernetes /run/netns)
# Registry hosts the node's containerd is told about, all pointing at a closed loopback port.
NODE_REGISTRIES=(docker.io registry-1.docker.io index.docker.io ghcr.io registry.k8s.io k8s.gcr.io gcr.io
	quay.io mcr.microsoft.com public.ecr.aws nvcr.io registry.gitlab.com localhost qmodel.local)

node_dir=$state/node
innode() { nsenter --net="/run/netns/$NODE_NETNS" -- "$@"; }
node_ctr() { ctr --address "$node_dir/run/containerd.sock" --namespace k8s.io "$@"; }

# --- up ------------------------------------------------------------------------------------------

node_preflight() {
	local c
	for c in ip nsenter iptables-restore containerd containerd-shim-runc-v2 runc ctr busybox; do
		command -v $c >/dev/null || die "$c not found: the real node needs iproute2, util-linux, iptables, containerd, runc (.ci/run installs them)"
	done
	[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] ||
		die "CNI plugins missing in /usr/lib/cni (apt-get install containernetworking-plugins)"
	((EUID == 0)) || die "the real node needs root (network namespace, mounts, cgroups)"
	if [[ -f $NODE_RECORD/owner ]]; then
		local owner
		owner=$(cat "$NODE_RECORD/owner")
		[[ $owner == "$state" || ! -d $owner ]] ||
			die "the real node is in use by the cluster of $owner (tests/cluster/down with CLUSTER_STATE_DIR=$owner)"
		# A stale record (its state dir is gone): clean what it left.
		node_cleanup_global
	fi
	grep -qw "^$NODE_NETNS" <<<"$(ip netns list)" && die "network namespace $NODE_NETNS exists but no cluster owns it; remove it (ip netns del $NODE_NETNS)"
	ip link show "$NODE_HOST_VETH" >/dev/null 2>&1 && die "interface $NODE_HOST_VETH exists but no cluster owns it"
	return 0
}

# The node's network namespace and the veth to the host, before the apiserver binds the host end.
node_network_up() {
	mkdir -p "$NODE_RECORD" "$node_dir"
	echo "$state" >"$NODE_RECORD/owner"
	local p
	: >"$NODE_RECORD/created"
	for p in "${NODE_GLOBAL_PATHS[@]}"; do [[ -e $p ]] || echo "$p" >>"$NODE_RECORD/created"; done
	compgen -G '/sys/fs/cgroup/*/k8s.io' >/dev/null || echo k8s.io-cgroups >>"$NODE_RECORD/created"
	# `ip netns add` makes /run/netns a mount point (a shared bind mount of itself) if it is not one.
	mountpoint -q /run/netns 2>/dev/null || echo /run/netns >"$NODE_RECORD/netns-mount"
	ip netns add "$NODE_NETNS"
	ip link add "$NODE_HOST_VETH" type veth peer name "$NODE_VETH"
	ip link set "$NODE_VETH" netns "$NODE_NETNS"
	ip addr add "$NODE_HOST_IP/30" dev "$NODE_HOST_VETH"
	ip link set "$NODE_HOST_VETH" up
	# The host reaches Services and pods through the node (routes, not forwarding: the host only
	# sends and receives on them).
	ip route add "$NODE_SERVICE_CIDR" via "$NODE_IP" dev "$NODE_HOST_VETH"
	ip route add "$NODE_POD_CIDR" via "$NODE_IP" dev "$NODE_HOST_VETH"
	innode ip link set lo up
	innode ip addr add "$NODE_IP/30" dev "$NODE_VETH"
	innode ip link set "$NODE_VETH" up
	# Services from the node's own processes (hostNetwork pods, CoreDNS's checks): a route for
	# the ClusterIPs so kube-proxy's OUTPUT rules see them. It points at the host, which does
	# not forward: a ClusterIP with no Service goes nowhere.
	innode ip route add "$NODE_SERVICE_CIDR" via "$NODE_HOST_IP" dev "$NODE_VETH"
	# Forwarding between pods, the node and the veth: inside the node's namespace only. No default
	# route there: anything not on this machine is unreachable.
	innode sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.route_localnet=0
}

node_kernel_values() {
	local kv key
	: >"$NODE_RECORD/sysctl.orig.tmp"
	for kv in "${NODE_SYSCTLS[@]}"; do
		key=${kv%%=*}
		echo "$key=$(sysctl -n "$key")" >>"$NODE_RECORD/sysctl.orig.tmp"
	done
	# Keep the first record: a second up must not take the cluster's values as the machine's.
	[[ -f $NODE_RECORD/sysctl.orig ]] || mv "$NODE_RECORD/sysctl.orig.tmp" "$NODE_RECORD/sysctl.orig"
	rm -f "$NODE_RECORD/sysctl.orig.tmp"
	sysctl -qw "${NODE_SYSCTLS[@]}"
}

# PKI of the node (called inside up's pki subshell, with issue()).
node_pki() {
	issue kubelet "system:node:$NODE_NAME" $'extendedKeyUsage=serverAuth\nsubjectAltName=IP:'"$NODE_IP,DNS:$NODE_NAME"
	issue apiserver-kubelet-client kube-apiserver-kubelet-client extendedKeyUsage=clientAuth
}

# RBAC, the kube-dns Service and its endpoint (CoreDNS runs in the node netns, not as a pod).
node_objects() {
	"$KUBECTL" apply -f - >/dev/null <<EOF
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "qmodel:coredns"}
rules:
- {apiGroups: [""], resources: [services, pods, namespaces], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "qmodel:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "qmodel:coredns"}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: "qmodel:coredns"}]
---
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: kube-system
  labels: {k8s-app: kube-dns}
spec:
  clusterIP: $NODE_DNS_IP
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-$NODE_NAME
  namespace: kube-system
  labels:
    kubernetes.io/service-name: kube-dns
    endpointslice.kubernetes.io/managed-by: qmodel-test-cluster
addressType: IPv4
endpoints:
- addresses: ["$NODE_IP"]
  conditions: {ready: true}
  nodeName: $NODE_NAME
ports:
- {name: dns, port: 53, protocol: UDP}
- {name: dns-tcp, port: 53, protocol: TCP}
EOF
}

node_config_files() {
	local pki=$state/pki r
	mkdir -p "$node_dir"/{kubelet,containerd/certs.d,run,cni/net.d,cni/ipam,pod-logs,volume-plugins}
	# containerd 1.6 has no catch-all registry config: every host gets a hosts.toml pointing at a
	# port nothing listens on in the node's namespace, so a pull fails at once (connection refused).
	for r in "${NODE_REGISTRIES[@]}"; do
		mkdir -p "$node_dir/containerd/certs.d/$r"
		printf 'server = "http://127.0.0.1:1"\n[host."http://127.0.0.1:1"]\n  capabilities = ["pull", "resolve"]\n' \
			>"$node_dir/containerd/certs.d/$r/hosts.toml"
	done
	cat >"$node_dir/containerd.toml" <<EOF
version = 2
root = "$node_dir/containerd/root"
state = "$node_dir/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "$node_dir/run/containerd.sock"
[ttrpc]
  address = "$node_dir/run/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$node_dir/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "qmodel.local/pause:1"
  # root here lacks CAP_SYS_RESOURCE: never lower a score below containerd's own
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$node_dir/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node_dir/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$node_dir/containerd/certs.d"
EOF
	# The pod network: one bridge in the node netns, the node its gateway; no ipMasq (nothing to
	# masquerade to: there is no way out).
	cat >"$node_dir/cni/net.d/10-qmodel.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "qmodel-pods",
  "plugins": [{
    "type": "bridge", "bridge": "$NODE_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {"type": "host-local", "dataDir": "$node_dir/cni/ipam",
             "ranges": [[{"subnet": "$NODE_POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}]}
  }]
}
EOF
	# cgroup v1 host: failCgroupV1 false. The machine's cgroups are not the node's: no QoS
	# hierarchy (kubepods) and no allocatable enforcement, pods go to k8s.io/<id> beside them.
	# protectKernelDefaults: up has set the kernel values, kubelet must never write them.
	# Image GC and disk eviction off: loaded images have no registry to come back from.
	cat >"$node_dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
protectKernelDefaults: true
failSwapOn: false
containerRuntimeEndpoint: unix://$node_dir/run/containerd.sock
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
tlsCertFile: $pki/kubelet.crt
tlsPrivateKeyFile: $pki/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: AlwaysAllow}
clusterDNS: [$NODE_DNS_IP]
clusterDomain: cluster.local
resolvConf: ""
registerWithTaints:
- {key: $NODE_TAINT_KEY, value: "true", effect: NoSchedule}
podLogsDir: $node_dir/pod-logs
volumePluginDir: $node_dir/volume-plugins
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
serializeImagePulls: false
maxPods: 50
nodeStatusUpdateFrequency: 4s
EOF
	# masqueradeAll: Service traffic is SNATed to the node, so replies come back through it even
	# between pods on one bridge. No conntrack sysctl changes (0 = leave the kernel's values).
	cat >"$node_dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $state/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $NODE_POD_CIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$NODE_IP/32"]
iptables: {masqueradeAll: true, localhostNodePorts: false, syncPeriod: 10s, minSyncPeriod: 0s}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
	# No forward plugin: names outside the cluster are refused, never sent anywhere.
	cat >"$node_dir/Corefile" <<EOF
.:53 {
    bind $NODE_IP
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $state/coredns.kubeconfig qmodel-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    cache 5
}
EOF
}

node_images() {
	local img
	for img in "$bin/images/pause" "$bin/images/busybox"; do
		CLUSTER_STATE_DIR=$state "$here/load-image" "$img" >/dev/null || die "could not load $img into the node's containerd"
	done
}

# Starts containerd, kubelet, kube-proxy and CoreDNS in the node netns (start(): up's).
node_start() {
	node_config_files
	start_in_node containerd /usr/bin/containerd --config "$node_dir/containerd.toml"
	wait_for containerd node_ctr version
	node_images
	start_in_node kubelet "$bin/kubelet" \
		--config="$node_dir/kubelet.yaml" --kubeconfig="$state/kubelet.kubeconfig" \
		--root-dir="$node_dir/kubelet" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
		--node-labels="$NODE_TAINT_KEY=true"
	start_in_node kube-proxy "$bin/kube-proxy" --config="$node_dir/kube-proxy.yaml"
	start_in_node coredns "$bin/coredns" -conf "$node_dir/Corefile"
}

# Ready, and the Service path works: cluster DNS answers through kube-proxy's ClusterIP rules.
node_dns_answers() { grep -q '10\.96\.0\.1$' <<<"$(busybox nslookup "kubernetes.default.svc.cluster.local" "$NODE_DNS_IP" 2>/dev/null)"; }

# --- down ----------------------------------------------------------------------------------------

# Only a pid that runs what the node started (pids get reused).
node_ours() {
	local exe
	exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
	[[ $exe == "$here/bin/"* || $exe == /usr/bin/containerd || $exe == /usr/bin/containerd-shim-runc-v2 ]]
}

# Every process left in the node netns (shims, a stray kubelet) and in the node's container
# cgroups (the containers: they have their own pod netns).
node_leftover_pids() {
	[[ -e /run/netns/$NODE_NETNS ]] && ip netns pids "$NODE_NETNS" 2>/dev/null
	local id
	for id in $(node_container_ids); do
		cat /sys/fs/cgroup/*/k8s.io/"$id"/cgroup.procs 2>/dev/null
	done
}
# Container ids this node's containerd ran (its task state dirs), i.e. its cgroups k8s.io/<id>.
node_container_ids() {
	local d
	for d in "$node_dir"/containerd/state/io.containerd.runtime.v2.task/k8s.io/*/; do
		[[ -d $d ]] && basename "$d"
	done
	return 0
}

node_stop() {
	local name f pid pids=()
	for name in kubelet coredns kube-proxy containerd; do
		f=$state/pids/$name.pid
		[[ -f $f ]] || continue
		pid=$(cat "$f")
		if [[ $pid =~ ^[0-9]+$ ]] && node_ours "$pid"; then
			kill -TERM "$pid" 2>/dev/null || true
			pids+=("$pid")
		fi
	done
	for _ in $(seq 50); do
		local left=()
		for pid in "${pids[@]}"; do node_ours "$pid" && left+=("$pid"); done
		((${#left[@]} == 0)) && break
		sleep 0.1
	done
	# Containers, shims and anything else still in the netns: SIGKILL until none is left.
	for _ in $(seq 50); do
		mapfile -t pids < <(node_leftover_pids | sort -u)
		((${#pids[@]} == 0)) && break
		kill -KILL "${pids[@]}" 2>/dev/null || true
		sleep 0.1
	done
	((${#pids[@]} == 0)) || echo "down: processes still in the node after SIGKILL: ${pids[*]}" >&2
	return 0
}

# Mounts under the node's dirs (pod volumes, container root filesystems, sandbox netns and shm),
# deepest first. A mount left would make rm -rf reach into what it mounts.
node_unmount() {
	local m mounts
	for _ in 1 2 3; do
		mapfile -t mounts < <(awk -v d="$node_dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -ru)
		((${#mounts[@]} == 0)) && return 0
		for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
	done
	mapfile -t mounts < <(awk -v d="$node_dir/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo)
	((${#mounts[@]} == 0)) || { echo "down: FAIL: mounts left under $node_dir: ${mounts[*]}" >&2; return 1; }
}

node_cgroups_remove() {
	local id h
	for id in $(node_container_ids); do
		for h in /sys/fs/cgroup/*/k8s.io/"$id"; do
			[[ -d $h ]] && find "$h" -depth -type d -exec rmdir {} + 2>/dev/null
		done
	done
	# k8s.io itself, in every hierarchy, when up found none.
	if grep -qx k8s.io-cgroups "$NODE_RECORD/created" 2>/dev/null; then
		for h in /sys/fs/cgroup/*/k8s.io; do
			[[ -d $h ]] && find "$h" -depth -type d -exec rmdir {} + 2>/dev/null
		done
	fi
	return 0
}

# What lives outside $state: the netns (and with it the bridge, the veth pair, the routes, the
# node's iptables rules and forwarding), kernel values, global paths. Only for our own record.
node_cleanup_global() {
	[[ -d $NODE_RECORD ]] || return 0
	local pids
	if [[ -e /run/netns/$NODE_NETNS ]]; then
		# Kill whatever is still in it first, or the namespace outlives its name.
		for _ in $(seq 50); do
			mapfile -t pids < <(ip netns pids "$NODE_NETNS" 2>/dev/null)
			((${#pids[@]} == 0)) && break
			kill -KILL "${pids[@]}" 2>/dev/null || true
			sleep 0.1
		done
		ip netns del "$NODE_NETNS"
	fi
	ip link del "$NODE_HOST_VETH" 2>/dev/null || true
	if [[ -f $NODE_RECORD/sysctl.orig ]]; then
		local kv
		while read -r kv; do sysctl -qw "$kv"; done <"$NODE_RECORD/sysctl.orig"
	fi
	local p
	if [[ -f $NODE_RECORD/netns-mount ]] && [[ -z $(ip netns list) ]]; then
		umount /run/netns 2>/dev/null || true
	fi
	if [[ -f $NODE_RECORD/created ]]; then
		while read -r p; do
			[[ $p == /* && $p != k8s.io-cgroups ]] && rm -rf "$p"
		done <"$NODE_RECORD/created"
	fi
	# kubelet's links into our pod logs, where /var/log/containers was there before.
	find /var/log/containers -maxdepth 1 -type l -lname "$node_dir/*" -delete 2>/dev/null || true
	rm -rf "$NODE_RECORD"
}

node_owned() { [[ -f $NODE_RECORD/owner && $(cat "$NODE_RECORD/owner") == "$state" ]]; }
# down, before the control plane stops: the node's processes, containers, mounts, cgroups.
node_down_processes() {
	node_owned || return 0
	node_stop
	node_unmount || return 1
	node_cgroups_remove
}
# down, after the control plane stopped (the apiserver listens on the veth: with its address gone
# its shutdown hangs on its own loopback client): the netns and everything global.
node_down_global() {
	node_owned || return 0
	node_cleanup_global
}
