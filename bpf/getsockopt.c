/* cgroup/getsockopt (attached to Envoy's cgroup): answer SO_ORIGINAL_DST
 * (IPv4) and IP6T_SO_ORIGINAL_DST (IPv6) from the map sockops.c filled.
 *
 * On a hit the answer overrides whatever the kernel said: with conntrack loaded
 * the kernel itself answers 127.0.0.1:<outbound port>, and Envoy would connect
 * to itself. On a miss the kernel's answer (normally ENOENT) stands and the miss
 * is counted; Envoy's listener sends such connections to a black hole. */
#include "meshd.h"

struct meshd_sockaddr_in {
	__u16 family;
	__be16 port;
	__u32 addr;
	__u8 zero[8];
};

struct meshd_sockaddr_in6 {
	__u16 family;
	__be16 port;
	__u32 flowinfo;
	__u32 addr[4];
	__u32 scope_id;
};

int meshd_getsockopt(struct bpf_sockopt *ctx)
{
	int v4 = ctx->level == MESHD_SOL_IP && ctx->optname == MESHD_SO_ORIGINAL_DST;
	int v6 = ctx->level == MESHD_SOL_IPV6 && ctx->optname == MESHD_IP6T_SO_ORIGINAL_DST;
	if (!v4 && !v6)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	/* Only the outbound listener's connections were steered by connect.c;
	 * inbound ones (sk_lookup) keep their real local address. */
	__u32 zero = 0;
	struct mesh_settings *s = settings.lookup(&zero);
	if (!s || sk->src_port != s->outbound_port)
		return 1;

	/* Envoy's accepted socket: local = Envoy, remote = the workload. */
	struct conn_tuple t = {};
	t.sport = (__u16)meshd_ntohs((__u16)sk->dst_port);
	t.dport = (__u16)sk->src_port;
	if (v4) {
		t.family = MESHD_AF_INET;
		t.saddr[0] = sk->dst_ip4;
		t.daddr[0] = sk->src_ip4;
	} else {
		t.family = MESHD_AF_INET6;
		t.saddr[0] = sk->dst_ip6[0]; t.saddr[1] = sk->dst_ip6[1];
		t.saddr[2] = sk->dst_ip6[2]; t.saddr[3] = sk->dst_ip6[3];
		t.daddr[0] = sk->src_ip6[0]; t.daddr[1] = sk->src_ip6[1];
		t.daddr[2] = sk->src_ip6[2]; t.daddr[3] = sk->src_ip6[3];
	}
	struct orig_dst *dst = tuple_dst.lookup(&t);
	if (!dst || dst->family != t.family) {
		count(0, C_MISS);
		return 1;
	}

	void *optval = ctx->optval;
	void *end = ctx->optval_end;
	if (v4) {
		struct meshd_sockaddr_in *sa = optval;
		if ((void *)(sa + 1) > end || ctx->optlen < (int)sizeof(*sa)) {
			count(dst->workload, C_MISS);
			return 1;
		}
		sa->family = MESHD_AF_INET;
		sa->port = dst->port;
		sa->addr = dst->addr[0];
		__builtin_memset(sa->zero, 0, sizeof(sa->zero));
		ctx->optlen = sizeof(*sa);
	} else {
		struct meshd_sockaddr_in6 *sa = optval;
		if ((void *)(sa + 1) > end || ctx->optlen < (int)sizeof(*sa)) {
			count(dst->workload, C_MISS);
			return 1;
		}
		sa->family = MESHD_AF_INET6;
		sa->port = dst->port;
		sa->flowinfo = 0;
		sa->addr[0] = dst->addr[0]; sa->addr[1] = dst->addr[1];
		sa->addr[2] = dst->addr[2]; sa->addr[3] = dst->addr[3];
		sa->scope_id = 0;
		ctx->optlen = sizeof(*sa);
	}
	ctx->retval = 0;
	count(dst->workload, C_ANSWERED);
	return 1;
}
