/* cgroup/getsockname4 and getsockname6 (attached to workload cgroups): a
 * steered socket is bound to 127.77.0.<id> (or ::1) towards Envoy; show the
 * application the local address the kernel would have chosen for its real
 * destination, so protocols that announce their own address (FTP's PORT, SIP)
 * keep working. meshd fills route_src4/6 from the namespace's routing table:
 * destination prefix -> source address. The port stays the socket's own. */
#include "meshd.h"

static __always_inline int source_for4(__u32 daddr, __u32 *saddr)
{
	struct route4_key k = {.prefixlen = 32, .addr = daddr};
	__u32 *src = route_src4.lookup(&k);
	if (!src)
		return 0;
	*saddr = *src;
	return 1;
}

int meshd_getsockname4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst *dst = cookie_dst.lookup(&cookie);
	if (!dst || dst->family != MESHD_AF_INET)
		return 1;
	if ((meshd_ntohl(ctx->user_ip4) >> 24) != 127)
		return 1;   /* the application bound an address itself: it is the truth */
	/* A container has one interface: its address is the source of every
	 * non-loopback connection (route_src4 is the served namespace's table). */
	struct ctr_netns *ctr = in_container_netns(ctx);
	__u32 saddr;
	if (ctr)
		saddr = ctr->addr4;
	else if (!source_for4(dst->addr[0], &saddr))
		return 1;
	ctx->user_ip4 = saddr;
	return 1;
}

int meshd_getsockname6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst *dst = cookie_dst.lookup(&cookie);
	if (!dst)
		return 1;
	int mapped = ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
		     ctx->user_ip6[2] == meshd_htonl(0xffff);
	int loopback = mapped ? (meshd_ntohl(ctx->user_ip6[3]) >> 24) == 127
			      : (ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
				 ctx->user_ip6[2] == 0 && ctx->user_ip6[3] == meshd_htonl(1));
	if (!loopback)
		return 1;   /* the application bound an address itself: it is the truth */
	if (dst->family == MESHD_AF_INET) {   /* a v4-mapped connect */
		__u32 saddr;
		if (!source_for4(dst->addr[0], &saddr))
			return 1;
		ctx->user_ip6[0] = 0; ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = meshd_htonl(0xffff);
		ctx->user_ip6[3] = saddr;
		return 1;
	}
	struct route6_key k = {.prefixlen = 128};
	k.addr[0] = dst->addr[0]; k.addr[1] = dst->addr[1];
	k.addr[2] = dst->addr[2]; k.addr[3] = dst->addr[3];
	struct route6_src *src = route_src6.lookup(&k);
	if (!src)
		return 1;
	ctx->user_ip6[0] = src->addr[0]; ctx->user_ip6[1] = src->addr[1];
	ctx->user_ip6[2] = src->addr[2]; ctx->user_ip6[3] = src->addr[3];
	return 1;
}
