/* sk_lookup (attached to the instance's network namespace): an inbound TCP
 * connection to a port an enrolled workload listens on is handed to Envoy's
 * inbound listener instead, before the application sees it. The connection
 * keeps its addresses, so Envoy reads the original destination as its local
 * address and the client's as its peer.
 *
 * Passed through untouched: Envoy's own upstream connections to the app (they
 * come from 127.0.0.6 / ::1), loopback destinations, excluded ports, and
 * everything while Envoy's inbound listener is down (fail open). */
#include "meshd.h"

static __always_inline int from_envoy(struct bpf_sk_lookup *ctx)
{
	if (ctx->family == MESHD_AF_INET)
		return ctx->remote_ip4 == meshd_htonl(MESHD_ENVOY_INBOUND_SOURCE4);
	return ctx->remote_ip6[0] == 0 && ctx->remote_ip6[1] == 0 &&
	       ctx->remote_ip6[2] == 0 && ctx->remote_ip6[3] == meshd_htonl(1);
}

/* One of Envoy's own connections to the app carrying the client's address? */
static __always_inline int envoy_upstream(struct bpf_sk_lookup *ctx)
{
	struct conn_tuple t = {.sport = (__u16)meshd_ntohs((__u16)ctx->remote_port),
			       .dport = (__u16)ctx->local_port};
	if (ctx->family == MESHD_AF_INET) {
		t.family = MESHD_AF_INET;
		t.saddr[0] = ctx->remote_ip4;
		t.daddr[0] = ctx->local_ip4;
	} else {
		t.family = MESHD_AF_INET6;
		t.saddr[0] = ctx->remote_ip6[0]; t.saddr[1] = ctx->remote_ip6[1];
		t.saddr[2] = ctx->remote_ip6[2]; t.saddr[3] = ctx->remote_ip6[3];
		t.daddr[0] = ctx->local_ip6[0]; t.daddr[1] = ctx->local_ip6[1];
		t.daddr[2] = ctx->local_ip6[2]; t.daddr[3] = ctx->local_ip6[3];
	}
	return envoy_upstreams.lookup(&t) != NULL;
}

static __always_inline int to_loopback(struct bpf_sk_lookup *ctx)
{
	if (ctx->family == MESHD_AF_INET)
		return (meshd_ntohl(ctx->local_ip4) >> 24) == 127;
	return ctx->local_ip6[0] == 0 && ctx->local_ip6[1] == 0 &&
	       ctx->local_ip6[2] == 0 && ctx->local_ip6[3] == meshd_htonl(1);
}

/* An excluded inbound port (for everyone, or for this workload) passes. */
static __always_inline int inbound_excluded(__u32 wl, __u16 port)
{
	struct port_key k = {.workload = 0, .port = port};
	if (!excluded_in_ports.lookup(&k)) {
		k.workload = wl;
		if (!excluded_in_ports.lookup(&k))
			return 0;
	}
	count(wl, C_INBOUND_EXCLUDED);
	return 1;
}

/* Hand the connection to Envoy's listening socket sk (a referenced lookup
 * result, released here); none: the application gets it (fail open). */
static __always_inline int steer(struct bpf_sk_lookup *ctx, struct bpf_sock *sk, __u32 wl)
{
	if (!sk) {
		count(wl, C_INBOUND_FAIL_OPEN);
		return SK_PASS;
	}
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	count(wl, err == 0 ? C_INBOUND : C_INBOUND_FAIL_OPEN);
	return SK_PASS;
}

/* Inside a container's namespace (its own pinned link): to the container's
 * address, a port it listens on -> Envoy's inbound listener in that namespace. */
static __always_inline int container_lookup(struct bpf_sk_lookup *ctx, __u64 *ns)
{
	__u16 port = (__u16)ctx->local_port;
	struct ctr_port k = {.addr4 = ctx->local_ip4, .port = port};
	__u32 *wlp = ctr_inbound_ports.lookup(&k);
	if (!wlp)
		return SK_PASS;
	__u32 wl = *wlp;
	if (from_envoy(ctx) || envoy_upstream(ctx) || inbound_excluded(wl, port))
		return SK_PASS;
	struct netns_slot slot = {.netns = *ns, .slot = IN_V4};
	return steer(ctx, (struct bpf_sock *)netns_listeners.lookup(&slot), wl);
}

int meshd_sk_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (ctx->family == MESHD_AF_INET) {
		__u32 addr = ctx->local_ip4;
		__u64 *ns = container_addr4.lookup(&addr);
		if (ns)
			return container_lookup(ctx, ns);
	}
	__u16 port = (__u16)ctx->local_port;   /* host order here */
	__u32 *wlp = inbound_ports.lookup(&port);
	if (!wlp)
		return SK_PASS;
	__u32 wl = *wlp;
	if (from_envoy(ctx) || to_loopback(ctx) || envoy_upstream(ctx) ||
	    inbound_excluded(wl, port))
		return SK_PASS;
	__u32 slot = ctx->family == MESHD_AF_INET6 ? IN_V6 : IN_V4;
	return steer(ctx, (struct bpf_sock *)envoy_listeners.lookup(&slot), wl);
}
