/* cgroup/getpeername4 and getpeername6 (attached to workload cgroups): a
 * steered socket is really connected to Envoy; show the application the
 * address it asked for, so nothing in the path is visible to it. */
#include "meshd.h"

int meshd_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst *dst = cookie_dst.lookup(&cookie);
	if (!dst || dst->family != MESHD_AF_INET)
		return 1;
	ctx->user_ip4 = dst->addr[0];
	ctx->user_port = dst->port;
	count(dst->workload, C_PEERNAME);
	return 1;
}

int meshd_getpeername6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst *dst = cookie_dst.lookup(&cookie);
	if (!dst)
		return 1;
	if (dst->family == MESHD_AF_INET) {   /* a v4-mapped connect */
		ctx->user_ip6[0] = 0; ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = meshd_htonl(0xffff);
		ctx->user_ip6[3] = dst->addr[0];
	} else {
		ctx->user_ip6[0] = dst->addr[0]; ctx->user_ip6[1] = dst->addr[1];
		ctx->user_ip6[2] = dst->addr[2]; ctx->user_ip6[3] = dst->addr[3];
	}
	ctx->user_port = dst->port;
	count(dst->workload, C_PEERNAME);
	return 1;
}
