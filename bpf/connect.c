/* cgroup/connect4 and cgroup/connect6: steer an enrolled workload's outbound
 * TCP connection to Envoy's outbound listener and remember where it was going.
 *
 * The original destination is saved under the socket cookie here; sockops.c
 * re-keys it by the connection's 4-tuple once the source port is known, which
 * is what Envoy's SO_ORIGINAL_DST lookup (getsockopt.c) can see. */
#include "meshd.h"

static __always_inline int port_excluded(__u32 workload, __u16 port)
{
	struct port_key k = {.workload = 0, .port = port};
	if (excluded_ports.lookup(&k))
		return 1;
	k.workload = workload;
	return workload && excluded_ports.lookup(&k) != NULL;
}

static __always_inline int cidr4_excluded(__u32 workload, __u32 addr)
{
	struct cidr4_key k = {.prefixlen = 64, .workload = 0, .addr = addr};
	if (excluded_cidr4.lookup(&k))
		return 1;
	k.workload = meshd_htonl(workload);
	return workload && excluded_cidr4.lookup(&k) != NULL;
}

static __always_inline int cidr6_excluded(__u32 workload, __u32 *addr)
{
	struct cidr6_key k = {.prefixlen = 160, .workload = 0};
	k.addr[0] = addr[0]; k.addr[1] = addr[1];
	k.addr[2] = addr[2]; k.addr[3] = addr[3];
	if (excluded_cidr6.lookup(&k))
		return 1;
	k.workload = meshd_htonl(workload);
	return workload && excluded_cidr6.lookup(&k) != NULL;
}

/* Is Envoy's listener for this family up? (fail-open when it is not) */
static __always_inline int envoy_up(__u32 slot)
{
	/* a SOCKMAP lookup yields a referenced socket, not the value */
	struct bpf_sock *sk = (struct bpf_sock *)envoy_listeners.lookup(&slot);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* Is Envoy's listener up where this socket lives? In a container's network
 * namespace that is Envoy's listener inside it (netns_listeners), elsewhere
 * the served namespace's (envoy_listeners). */
static __always_inline int envoy_up_here(struct bpf_sock_addr *ctx, struct ctr_netns *ctr,
					 __u32 slot)
{
	if (!ctr)
		return envoy_up(slot);
	struct netns_slot k = {.netns = bpf_get_netns_cookie(ctx), .slot = slot};
	struct bpf_sock *sk = (struct bpf_sock *)netns_listeners.lookup(&k);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

static __always_inline int save_dst(struct bpf_sock_addr *ctx, struct orig_dst *dst)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	return cookie_dst.update(&cookie, dst);
}

int meshd_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != MESHD_SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 1;
	__u32 daddr = ctx->user_ip4;
	if ((meshd_ntohl(daddr) >> 24) == 127)
		return 1;   /* loopback passes: local services and Envoy itself */
	struct mesh_settings *s = get_settings();
	if (!s || s->outbound_port == 0)
		return 1;   /* not configured yet */

	__u32 wl = current_workload();
	__u16 dport = meshd_ntohs((__u16)ctx->user_port);
	if (port_excluded(wl, dport) || cidr4_excluded(wl, daddr)) {
		count(wl, C_EXCLUDED);
		return 1;
	}
	struct ctr_netns *ctr = in_container_netns(ctx);
	if (!envoy_up_here(ctx, ctr, OUT_V4)) {
		count(wl, C_FAIL_OPEN);
		return 1;
	}
	struct orig_dst dst = {.family = MESHD_AF_INET, .port = (__be16)ctx->user_port,
			       .workload = wl};
	dst.addr[0] = daddr;
	if (save_dst(ctx, &dst) != 0) {
		/* cookie_dst is full (mesh.max_connections): better direct than lost */
		count(wl, C_TABLE_FULL);
		return 1;
	}
	ctx->user_ip4 = meshd_htonl(0x7f000001);
	ctx->user_port = meshd_htons(s->outbound_port);
	if (ctr) {
		/* In a container's namespace: from CONTAINER_NET4 | its index, so a
		 * 4-tuple names one connection across every container namespace
		 * (Envoy's listener there serves that one container). */
		struct sockaddr_in src = {.sin_family = MESHD_AF_INET};
		src.sin_addr.s_addr = meshd_htonl(CONTAINER_NET4 | (ctr->index & 0xffff));
		long err = bpf_bind(ctx, (struct sockaddr *)&src, sizeof(src));
		(void)err;
	} else if (wl) {
		/* Connect from 127.77.0.<workload id>: Envoy tells workloads apart by
		 * source address (per-workload filter chains and stats). A socket the
		 * app bound itself keeps its address (and is counted unattributed). */
		struct sockaddr_in src = {.sin_family = MESHD_AF_INET};
		src.sin_addr.s_addr = meshd_htonl(WORKLOAD_NET4 | wl);
		long err = bpf_bind(ctx, (struct sockaddr *)&src, sizeof(src));
		(void)err;
	}
	count(wl, C_REDIRECTED);
	return 1;
}

int meshd_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != MESHD_SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 1;
	__u32 a[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
	int mapped = a[0] == 0 && a[1] == 0 && a[2] == meshd_htonl(0xffff);
	if (mapped && (meshd_ntohl(a[3]) >> 24) == 127)
		return 1;
	if (!mapped && a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == meshd_htonl(1))
		return 1;   /* ::1 */
	struct mesh_settings *s = get_settings();
	if (!s || s->outbound_port == 0)
		return 1;

	__u32 wl = current_workload();
	__u16 dport = meshd_ntohs((__u16)ctx->user_port);
	int excluded = mapped ? cidr4_excluded(wl, a[3]) : cidr6_excluded(wl, a);
	if (port_excluded(wl, dport) || excluded) {
		count(wl, C_EXCLUDED);
		return 1;
	}
	/* a v4-mapped destination travels as IPv4: it needs Envoy's IPv4 listener.
	 * Containers get no IPv6 listener: their IPv6 goes direct (counted). */
	struct ctr_netns *ctr = in_container_netns(ctx);
	if (ctr || !envoy_up(mapped ? OUT_V4 : OUT_V6)) {
		count(wl, C_FAIL_OPEN);
		return 1;
	}
	struct orig_dst dst = {.port = (__be16)ctx->user_port, .workload = wl};
	if (mapped) {
		dst.family = MESHD_AF_INET;
		dst.addr[0] = a[3];
	} else {
		dst.family = MESHD_AF_INET6;
		dst.addr[0] = a[0]; dst.addr[1] = a[1]; dst.addr[2] = a[2]; dst.addr[3] = a[3];
	}
	if (save_dst(ctx, &dst) != 0) {
		count(wl, C_TABLE_FULL);
		return 1;
	}
	if (mapped) {
		ctx->user_ip6[3] = meshd_htonl(0x7f000001);
	} else {
		ctx->user_ip6[0] = 0; ctx->user_ip6[1] = 0; ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = meshd_htonl(1);
	}
	ctx->user_port = meshd_htons(s->outbound_port);
	count(wl, C_REDIRECTED);
	return 1;
}
