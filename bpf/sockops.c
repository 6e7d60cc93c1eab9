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

/* The tuple as the workload sees it (local = client, remote = Envoy). */
static __always_inline void tuple_of(struct bpf_sock_ops *skops, struct conn_tuple *t)
{
	t->sport = (__u16)skops->local_port;
	t->dport = (__u16)meshd_ntohl(skops->remote_port);
	if (skops->family == MESHD_AF_INET) {
		t->family = MESHD_AF_INET;
		t->saddr[0] = skops->local_ip4;
		t->daddr[0] = skops->remote_ip4;
		return;
	}
	if (skops->local_ip6[0] == 0 && skops->local_ip6[1] == 0 &&
	    skops->local_ip6[2] == meshd_htonl(0xffff)) {
		t->family = MESHD_AF_INET;   /* v4-mapped: IPv4 on the wire */
		t->saddr[0] = skops->local_ip6[3];
		t->daddr[0] = skops->remote_ip6[3];
		return;
	}
	t->family = MESHD_AF_INET6;
	t->saddr[0] = skops->local_ip6[0]; t->saddr[1] = skops->local_ip6[1];
	t->saddr[2] = skops->local_ip6[2]; t->saddr[3] = skops->local_ip6[3];
	t->daddr[0] = skops->remote_ip6[0]; t->daddr[1] = skops->remote_ip6[1];
	t->daddr[2] = skops->remote_ip6[2]; t->daddr[3] = skops->remote_ip6[3];
}

/* A workload listens: its port becomes meshed inbound (unless meshd manages
 * this workload's ports explicitly). Returns 1 if the socket is a listener. */
static __always_inline int on_listen(struct bpf_sock_ops *skops)
{
	__u16 port = (__u16)skops->local_port;
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
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct orig_dst *dst = cookie_dst.lookup(&cookie);
	if (!dst)
		return 1;   /* not a steered connection */
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
		if (!inbound_ports.lookup(&t.dport))
			return;
		__u8 one = 1;
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
		track_upstream(skops);
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
	long err = envoy_listeners.sock_map_update(skops, &slot, BPF_ANY);
	(void)err;   /* BCC's rewriter mangles a helper call used inside a condition */
	return 1;
}
