/* sockops: the TCP life cycle of steered connections and of Envoy's listeners.
 *
 * meshd_sockops (attached to workload cgroups): when a steered connection sends
 * its SYN the 4-tuple is known, so the original destination saved by connect.c
 * is re-keyed by it for getsockopt.c; when the connection closes both entries
 * are deleted (no reliance on LRU eviction).
 *
 * It also notes the ports workloads listen on (inbound_ports, for sk_lookup.c)
 * and forgets them when the listening socket closes.
 *
 * meshd_envoy_sockops (attached to Envoy's cgroup): when Envoy listens on the
 * outbound or inbound port, its socket goes into envoy_listeners; the kernel
 * removes it when it closes, which is how connect.c and sk_lookup.c know to
 * fail open. */
#include "meshd.h"

/* -- acceleration ----------------------------------------------------------
 * Both ends of a local pair go into accel_socks once established; sk_msg.c
 * then hands each send straight to the peer. Only pairs whose two ends are
 * known to be on this host join (a socket whose peer is remote would only
 * pay for the detour):
 *   workload -> Envoy outbound: the workload's steered socket (its original
 *     destination is saved) and Envoy's accepted one (its peer's tuple is in
 *     tuple_dst);
 *   Envoy -> local workload (inbound, and same-host workload -> workload):
 *     the workload's listener saw Envoy's SYN arrive (ENVOY_UPSTREAM_LOCAL in
 *     envoy_upstreams), then Envoy's socket and the workload's accepted one.
 * A socket joins only at ESTABLISHED, before either application can send, so
 * nothing is queued on it yet. */
static __always_inline void accel_key_of(struct bpf_sock_ops *skops, struct accel_key *k)
{
	k->netns = bpf_get_netns_cookie(skops);
	tuple_of(skops, &k->t);
}

static __always_inline void accel_insert(struct bpf_sock_ops *skops)
{
	if (!accel_enabled())
		return;
	struct accel_key k = {};
	accel_key_of(skops, &k);
	long err = accel_socks.sock_hash_update(skops, &k, BPF_NOEXIST);
	if (err) {
		accel_add(A_INSERT_FAILED, 1);
		return;
	}
	__u8 st = ACCEL_UNDECIDED;
	accel_state.update(&k, &st);
	/* to forget the latch when the connection closes */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
				  BPF_SOCK_OPS_STATE_CB_FLAG);
	accel_add(A_SOCKETS, 1);
	struct accel_key peer = {};
	accel_peer_of(&k, &peer);
	if (accel_state.lookup(&peer))
		accel_add(A_PAIRS, 1);
}

/* STATE_CB -> CLOSE of any socket: drop its latch (the kernel already drops
 * it from accel_socks). */
static __always_inline void accel_forget(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_STATE_CB || skops->args[1] != MESHD_TCP_CLOSE)
		return;
	struct accel_key k = {};
	accel_key_of(skops, &k);
	if (accel_state.lookup(&k)) {
		accel_state.delete(&k);
		accel_add(A_CLOSED, 1);
	}
}

/* A SYN from Envoy reached an enrolled workload's listener on this host: the
 * pair Envoy is opening is local (runs for the request socket, before the
 * SYN-ACK, so before Envoy's side is established). */
static __always_inline void accel_note_local_syn(struct bpf_sock_ops *skops)
{
	struct conn_tuple mine = {}, envoys = {};
	tuple_of(skops, &mine);
	tuple_reverse(&mine, &envoys);
	__u8 *v = envoy_upstreams.lookup(&envoys);
	if (!v)
		return;
	if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		if (*v == ENVOY_UPSTREAM_LOCAL)
			accel_insert(skops);
		return;
	}
	*v = ENVOY_UPSTREAM_LOCAL;
}

/* A workload listens: its port becomes meshed inbound (unless meshd manages
 * this workload's ports explicitly). Returns 1 if the socket is a listener. */
static __always_inline int on_listen(struct bpf_sock_ops *skops)
{
	__u16 port = (__u16)skops->local_port;
	struct ctr_netns *ctr = in_container_netns(skops);
	if (ctr) {
		/* a container's ports are its own namespace's, keyed by its address */
		struct ctr_port k = {.addr4 = ctr->addr4, .port = port};
		if (skops->op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
			__u32 wl = current_workload();
			if (!wl)
				return 1;
			ctr_inbound_ports.update(&k, &wl);
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
						  BPF_SOCK_OPS_STATE_CB_FLAG);
			return 1;
		}
		if (skops->op == BPF_SOCK_OPS_STATE_CB && skops->args[0] == 10 &&
		    skops->args[1] == MESHD_TCP_CLOSE) {
			ctr_inbound_ports.delete(&k);
			return 1;
		}
		return 0;
	}
	if (skops->op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
		__u32 wl = current_workload();   /* listen() runs in the app's context */
		__u32 *flags = workload_flags.lookup(&wl);
		if (!wl || (flags && (*flags & WL_EXPLICIT_PORTS)))
			return 1;
		inbound_ports.update(&port, &wl);
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
					  BPF_SOCK_OPS_STATE_CB_FLAG);
		return 1;
	}
	/* STATE_CB on a listener we flagged: LISTEN -> CLOSE */
	if (skops->op == BPF_SOCK_OPS_STATE_CB && skops->args[0] == 10 /* TCP_LISTEN */ &&
	    skops->args[1] == MESHD_TCP_CLOSE) {
		__u32 *wl = inbound_ports.lookup(&port);
		__u32 *flags = wl ? workload_flags.lookup(wl) : NULL;
		if (wl && !(flags && (*flags & WL_EXPLICIT_PORTS)))
			inbound_ports.delete(&port);
		return 1;
	}
	return 0;
}

int meshd_sockops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	if (on_listen(skops))
		return 1;
	if (op == BPF_SOCK_OPS_TIMEOUT_INIT || op == BPF_SOCK_OPS_RWND_INIT ||
	    op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		accel_note_local_syn(skops);
		return 1;
	}
	if (op == BPF_SOCK_OPS_STATE_CB)
		accel_forget(skops);
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB &&
	    op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct orig_dst *dst = cookie_dst.lookup(&cookie);
	if (!dst)
		return 1;   /* not a steered connection */
	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		accel_insert(skops);   /* its peer is Envoy's outbound listener: local */
		return 1;
	}
	struct conn_tuple t = {};
	tuple_of(skops, &t);

	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		struct orig_dst copy = *dst;
		/* tuple_dst has as many slots as cookie_dst, one per steered
		 * connection: a failure here means stale entries; count it */
		long err = tuple_dst.update(&t, &copy);
		if (err)
			count(copy.workload, C_TABLE_FULL);
		/* ask for state changes so the entries go when the connection does */
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
					  BPF_SOCK_OPS_STATE_CB_FLAG);
		return 1;
	}
	if (skops->args[1] == MESHD_TCP_CLOSE) {
		__u32 wl = dst->workload;
		tuple_dst.delete(&t);
		cookie_dst.delete(&cookie);
		count(wl, C_CLOSED);
	}
	return 1;
}

/* Envoy connects to a port that a workload listens on (often on behalf of a
 * client, from the client's own address): remember the tuple so sk_lookup lets
 * it through instead of handing it back to Envoy, and forget it on close. */
static __always_inline void track_upstream(struct bpf_sock_ops *skops)
{
	if (skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		struct conn_tuple t = {};
		tuple_of(skops, &t);
		/* Inside a container's namespace: to that container's own meshed
		 * port. (A connection from the served namespace to a container is
		 * an outbound leg: the container's sk_lookup must steer it.) */
		struct ctr_netns *ctr = in_container_netns(skops);
		struct ctr_port k = {.addr4 = t.daddr[0], .port = t.dport};
		if (ctr ? !(t.family == MESHD_AF_INET && t.daddr[0] == ctr->addr4 &&
			    ctr_inbound_ports.lookup(&k))
			: !inbound_ports.lookup(&t.dport))
			return;
		__u8 one = ENVOY_UPSTREAM_SEEN;
		envoy_upstreams.update(&t, &one);
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
					  BPF_SOCK_OPS_STATE_CB_FLAG);
	} else if (skops->op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == MESHD_TCP_CLOSE) {
		struct conn_tuple t = {};
		tuple_of(skops, &t);
		envoy_upstreams.delete(&t);
	}
}

int meshd_envoy_sockops(struct bpf_sock_ops *skops)
{
	__u32 zero = 0;
	struct mesh_settings *cfg = settings.lookup(&zero);
	if (!cfg)
		return 1;
	if (skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB || skops->op == BPF_SOCK_OPS_STATE_CB) {
		accel_forget(skops);
		track_upstream(skops);
		return 1;
	}
	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		/* Envoy's connection to a workload whose listener saw it arrive */
		struct conn_tuple t = {};
		tuple_of(skops, &t);
		__u8 *v = envoy_upstreams.lookup(&t);
		if (v && *v == ENVOY_UPSTREAM_LOCAL)
			accel_insert(skops);
		return 1;
	}
	if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		/* accepted on the outbound listener from a steered workload socket */
		if (skops->local_port != cfg->outbound_port)
			return 1;
		struct conn_tuple mine = {}, wl = {};
		tuple_of(skops, &mine);
		tuple_reverse(&mine, &wl);
		if (tuple_dst.lookup(&wl))
			accel_insert(skops);
		return 1;
	}
	if (skops->op != BPF_SOCK_OPS_TCP_LISTEN_CB)
		return 1;
	struct mesh_settings *s = settings.lookup(&zero);
	if (!s)
		return 1;
	__u32 v6 = skops->family == MESHD_AF_INET6;
	__u32 slot;
	if (skops->local_port == s->outbound_port)
		slot = v6 ? OUT_V6 : OUT_V4;
	else if (skops->local_port == s->inbound_port)
		slot = v6 ? IN_V6 : IN_V4;
	else
		return 1;
	if (in_container_netns(skops)) {
		/* Envoy's listener inside a container's namespace */
		struct netns_slot k = {.netns = bpf_get_netns_cookie(skops), .slot = slot};
		long e = netns_listeners.sock_hash_update(skops, &k, BPF_ANY);
		(void)e;
		return 1;
	}
	long err = envoy_listeners.sock_map_update(skops, &slot, BPF_ANY);
	(void)err;   /* BCC's rewriter mangles a helper call used inside a condition */
	return 1;
}
