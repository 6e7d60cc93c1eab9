/* meshd: maps, structs and small helpers shared by every hook program.
 *
 * All hook files are compiled together into one BCC module, so each map below
 * exists once and every program sees the same instance. The maps are pinned
 * under <bpffs_dir>/v1/maps/ and meshd talks to them by name.
 *
 * meshd/maplayout.py declares what C and Python share: it generates the
 * constants and enums this file uses but does not define (MESHD_MAX_WORKLOADS,
 * WORKLOAD_NET4, MESHD_ENVOY_INBOUND_SOURCE4, WL_EXPLICIT_PORTS, MESH_F_ACCEL,
 * ENVOY_UPSTREAM_LOCAL, the map sizes MESHD_MAX_CONNS, MESHD_MAX_EXCLUSIONS,
 * MESHD_MAX_INBOUND_PORTS, enum meshd_counter, enum listener_slot, enum
 * accel_counter, enum accel_state) and checks every struct here against
 * its Python twin at compile time. A struct or map changed here must change
 * there too: a struct that differs fails the compilation, a map whose key or
 * value size differs is refused when meshd opens it.
 */
#ifndef MESHD_H
#define MESHD_H

#ifndef MESHD_LAYOUT_PRELUDE
#error "compile bpf/*.c through meshd (meshd/maplayout.py generates the shared constants)"
#endif

#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>

#define MESHD_SOCK_STREAM 1   /* not in BCC's include set */
#define MESHD_AF_INET 2
#define MESHD_AF_INET6 10
#define MESHD_TCP_CLOSE 7
#define MESHD_SO_ORIGINAL_DST 80        /* linux/netfilter_ipv4.h */
#define MESHD_IP6T_SO_ORIGINAL_DST 80   /* linux/netfilter_ipv6/ip6_tables.h */
#define MESHD_SOL_IP 0
#define MESHD_SOL_IPV6 41

#define MESHD_MAX_CGROUP_DEPTH 32

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define meshd_ntohs(x) __builtin_bswap16(x)
#define meshd_htons(x) __builtin_bswap16(x)
#define meshd_ntohl(x) __builtin_bswap32(x)
#define meshd_htonl(x) __builtin_bswap32(x)
#else
#define meshd_ntohs(x) (x)
#define meshd_htons(x) (x)
#define meshd_ntohl(x) (x)
#define meshd_htonl(x) (x)
#endif

/* Live settings the daemon writes; index 0 only. */
struct mesh_settings {
	__u16 outbound_port;   /* host order */
	__u16 inbound_port;    /* host order */
	__u32 flags;
};

/* An original destination: what the workload asked connect() for. */
struct orig_dst {
	__u8 family;           /* AF_INET or AF_INET6 */
	__u8 pad;
	__be16 port;           /* network order, as in sockaddr */
	__u32 workload;        /* workload id, for per-workload counters */
	__u32 addr[4];         /* network order; IPv4 in addr[0] */
};

/* A connection as seen from the workload's side (client -> Envoy). IPv4 and
 * v4-mapped IPv6 both use family AF_INET with the address in [0]. */
struct conn_tuple {
	__u8 family;
	__u8 pad;
	__u16 sport;           /* host order */
	__u16 dport;           /* host order */
	__u16 pad2;
	__u32 saddr[4];
	__u32 daddr[4];
};

/* Acceleration: a socket of a local pair, keyed as that socket sees itself
 * (saddr/sport = its own side). Tuples repeat across network namespaces
 * (127.0.0.1:15001 exists in each), so the namespace's cookie is part of it. */
struct accel_key {
	__u64 netns;
	struct conn_tuple t;
};

struct port_key {
	__u32 workload;        /* 0 = applies to every workload */
	__u16 port;            /* host order */
	__u16 pad;
};

struct cidr4_key {
	__u32 prefixlen;       /* 32 (workload) + CIDR length */
	__u32 workload;        /* network order, so the trie matches it bit by bit */
	__u32 addr;
};

struct cidr6_key {
	__u32 prefixlen;
	__u32 workload;
	__u32 addr[4];
};

/* Source address selection (getsockname.c): destination prefix -> the
 * address the kernel would use as source. Addresses in network order. */
struct route4_key {
	__u32 prefixlen;
	__u32 addr;
};

struct route6_key {
	__u32 prefixlen;
	__u32 addr[4];
};

struct route6_src {
	__u32 addr[4];
};

/* Every map is pinned where meshd says (MESHD_PIN_<name>, generated; not part
 * of the hashed text): BCC reuses a map already pinned there, so a new build of
 * these programs keeps the maps and their contents (a hitless upgrade), and
 * creates and pins one that is not there yet. Type, size and flags must match
 * meshd/maplayout.py's MAPS (meshd checks the kernel's maps against it). */
#define MESHD_MAP(_type, _key, _value, _name, _size, _flags) \
	BPF_TABLE_PINNED(_type, _key, _value, _name, _size, MESHD_PIN_##_name, _flags)

/* BCC's BPF_SOCKMAP() offers no lookup and BPF_TABLE("sockmap") no
 * sock_map_update; this declares a pinned SOCKMAP with both (same shape as BCC's). */
#define MESHD_SOCKMAP(_name, _max_entries) \
struct _name##_table_t { \
	u32 key; \
	u64 leaf; /* 8 bytes: user space then reads the socket cookie */ \
	u64 *(*lookup)(u32 *); \
	int (*update)(u32 *, u64 *); \
	int (*delete)(u32 *); \
	int (*sock_map_update)(void *, void *, u64); \
	u32 max_entries; \
}; \
__attribute__((section("maps/sockmap:" MESHD_PIN_##_name))) \
struct _name##_table_t _name = {.max_entries = (_max_entries)}; \
BPF_ANNOTATE_KV_PAIR(_name, u32, u64)

/* The same for a SOCKHASH (BCC's BPF_SOCKHASH() cannot be pinned), with the
 * value type given: accel_socks keeps BCC's 4-byte value, netns_listeners a
 * u64 (its lookup returns the socket's cookie). */
#define MESHD_SOCKHASH(_name, _key_type, _leaf_type, _max_entries) \
struct _name##_table_t { \
	_key_type key; \
	_leaf_type leaf; \
	_leaf_type *(*lookup)(_key_type *); \
	int (*update)(_key_type *, _leaf_type *); \
	int (*delete)(_key_type *); \
	int (*sock_hash_update)(void *, void *, u64); \
	int (*msg_redirect_hash)(void *, void *, u64); \
	int (*sk_redirect_hash)(void *, void *, u64); \
	u32 max_entries; \
}; \
__attribute__((section("maps/sockhash:" MESHD_PIN_##_name))) \
struct _name##_table_t _name = {.max_entries = (_max_entries)}; \
BPF_ANNOTATE_KV_PAIR(_name, _key_type, _leaf_type)

/* A Podman container's own network namespace, by its netns cookie: there
 * connect4 sends connections to Envoy's listener inside that namespace. */
struct ctr_netns {
	__u32 index;           /* connect4 binds CONTAINER_NET4 | index: tuples stay unique */
	__u32 addr4;           /* the container's IPv4 address (network order), for getsockname */
};

/* Key of netns_listeners: one of Envoy's listeners in one container namespace. */
struct netns_slot {
	__u64 netns;           /* netns cookie */
	__u32 slot;            /* enum listener_slot */
	__u32 pad;
};

/* Key of ctr_inbound_ports: a port of one container (by its IPv4 address). */
struct ctr_port {
	__u32 addr4;           /* network order */
	__u16 port;            /* host order */
	__u16 pad;
};

MESHD_MAP("array", __u32, struct mesh_settings, settings, 1, 0);
/* [0] = hash of the BPF sources these pins were built from (set by meshd) */
MESHD_MAP("array", __u32, __u64, meta, 1, 0);
/* cgroup id (of an enrolled cgroup) -> workload id */
MESHD_MAP("hash", __u64, __u32, workload_ids, 1024, 0);
MESHD_MAP("hash", struct port_key, __u8, excluded_ports, MESHD_MAX_EXCLUSIONS, 0);
MESHD_MAP("lpm_trie", struct cidr4_key, __u8, excluded_cidr4, MESHD_MAX_EXCLUSIONS, BPF_F_NO_PREALLOC);
MESHD_MAP("lpm_trie", struct cidr6_key, __u8, excluded_cidr6, MESHD_MAX_EXCLUSIONS, BPF_F_NO_PREALLOC);
/* socket cookie -> original destination (for getpeername and cleanup). Not LRU:
 * when it is full connect4 leaves the connection direct (counted, C_TABLE_FULL)
 * instead of evicting a live connection's entry (which would black-hole it). */
MESHD_MAP("hash", __u64, struct orig_dst, cookie_dst, MESHD_MAX_CONNS, 0);
/* connection 4-tuple -> original destination (for Envoy's SO_ORIGINAL_DST);
 * one entry per cookie_dst entry, so it has room whenever cookie_dst had. */
MESHD_MAP("hash", struct conn_tuple, struct orig_dst, tuple_dst, MESHD_MAX_CONNS, 0);
/* Envoy's listening sockets (enum listener_slot). The kernel drops a socket
 * from a SOCKMAP when it closes, so an empty slot means Envoy is down. */
MESHD_SOCKMAP(envoy_listeners, 4);
/* Inbound: TCP ports enrolled workloads listen on -> workload id. Filled by
 * sockops when a workload calls listen() (auto mode) or by meshd (explicit
 * inbound_ports); read by sk_lookup. */
MESHD_MAP("hash", __u16, __u32, inbound_ports, MESHD_MAX_INBOUND_PORTS, 0);
/* Per workload id: WL_EXPLICIT_PORTS = only meshd sets its inbound ports. */
MESHD_MAP("array", __u32, __u32, workload_flags, MESHD_MAX_WORKLOADS, 0);
MESHD_MAP("hash", struct port_key, __u8, excluded_in_ports, MESHD_MAX_EXCLUSIONS, 0);
/* Envoy's own connections to local applications' meshed ports, as the app's
 * side sees them (saddr = Envoy's source, which with original_src is the
 * client's address; daddr = app): sk_lookup must let these through instead of
 * steering them back into Envoy (a loop). Only needed while that SYN is looked
 * up, so LRU eviction of old entries is harmless. */
MESHD_MAP("lru_hash", struct conn_tuple, __u8, envoy_upstreams, MESHD_MAX_CONNS, 0);
MESHD_MAP("lpm_trie", struct route4_key, __u32, route_src4, 4096, BPF_F_NO_PREALLOC);
MESHD_MAP("lpm_trie", struct route6_key, struct route6_src, route_src6, 4096, BPF_F_NO_PREALLOC);
MESHD_MAP("percpu_array", __u32, __u64, counters, MESHD_MAX_WORKLOADS * MESHD_NR_COUNTERS, 0);
/* Acceleration (sockops.c fills, sk_msg.c reads): the established sockets of
 * local pairs; sk_msg.c is attached to this map and runs on their sends. The
 * kernel removes a socket when it closes. Its size is fixed (not
 * max_connections): a map of another layout would be replaced at an upgrade,
 * and dropping this one drops the bytes redirected into its sockets but not
 * yet read; a socket that does not fit is counted and uses TCP. */
MESHD_SOCKHASH(accel_socks, struct accel_key, int, MESHD_MAX_ACCEL);
/* Per socket in accel_socks: enum accel_state, the latch that keeps each
 * direction of a connection on one path (see sk_msg.c). Deleted on close. */
MESHD_MAP("lru_hash", struct accel_key, __u8, accel_state, MESHD_MAX_ACCEL, 0);
MESHD_MAP("percpu_array", __u32, __u64, accel_counters, MESHD_NR_ACCEL_COUNTERS, 0);

static __always_inline void accel_add(__u32 slot, __u64 n)
{
	__u64 *v = accel_counters.lookup(&slot);
	if (v)
		*v += n;
}

static __always_inline int accel_enabled(void)
{
	__u32 zero = 0;
	struct mesh_settings *s = settings.lookup(&zero);
	return s && (s->flags & MESH_F_ACCEL);
}

/* tuple_of_<ctx>(ctx, t): the connection tuple from a context with the
 * sock_ops / sk_msg_md field names, as that socket sees it (local = saddr).
 * IPv4 and v4-mapped IPv6 both become AF_INET with the address in [0]. The
 * remote port is big-endian in the context, the local one host order. (Each
 * case returns: merged branches would load through a computed ctx pointer,
 * which the verifier refuses; the
 * volatile reads keep them apart.) */
#define MESHD_DEFINE_TUPLE_OF(_name, _ctx_type) \
static __always_inline void _name(_ctx_type *ctx, struct conn_tuple *t) \
{ \
	t->sport = (__u16)ctx->local_port; \
	t->dport = (__u16)meshd_ntohl(ctx->remote_port); \
	if (ctx->family == MESHD_AF_INET) { \
		t->family = MESHD_AF_INET; \
		t->saddr[0] = *(volatile __u32 *)&ctx->local_ip4; \
		t->daddr[0] = *(volatile __u32 *)&ctx->remote_ip4; \
		return; \
	} \
	if (ctx->local_ip6[0] == 0 && ctx->local_ip6[1] == 0 && \
	    ctx->local_ip6[2] == meshd_htonl(0xffff)) { \
		t->family = MESHD_AF_INET;   /* v4-mapped: IPv4 on the wire */ \
		t->saddr[0] = *(volatile __u32 *)&ctx->local_ip6[3]; \
		t->daddr[0] = *(volatile __u32 *)&ctx->remote_ip6[3]; \
		return; \
	} \
	t->family = MESHD_AF_INET6; \
	t->saddr[0] = ctx->local_ip6[0]; t->saddr[1] = ctx->local_ip6[1]; \
	t->saddr[2] = ctx->local_ip6[2]; t->saddr[3] = ctx->local_ip6[3]; \
	t->daddr[0] = ctx->remote_ip6[0]; t->daddr[1] = ctx->remote_ip6[1]; \
	t->daddr[2] = ctx->remote_ip6[2]; t->daddr[3] = ctx->remote_ip6[3]; \
}
MESHD_DEFINE_TUPLE_OF(tuple_of, struct bpf_sock_ops)
MESHD_DEFINE_TUPLE_OF(tuple_of_msg, struct sk_msg_md)

/* The same connection as the other end sees it. */
static __always_inline void tuple_reverse(struct conn_tuple *t, struct conn_tuple *r)
{
	r->family = t->family;
	r->sport = t->dport;
	r->dport = t->sport;
	r->saddr[0] = t->daddr[0]; r->saddr[1] = t->daddr[1];
	r->saddr[2] = t->daddr[2]; r->saddr[3] = t->daddr[3];
	r->daddr[0] = t->saddr[0]; r->daddr[1] = t->saddr[1];
	r->daddr[2] = t->saddr[2]; r->daddr[3] = t->saddr[3];
}

static __always_inline void accel_peer_of(struct accel_key *k, struct accel_key *peer)
{
	peer->netns = k->netns;
	tuple_reverse(&k->t, &peer->t);
}
/* Podman containers with their own network namespace (netns cookie -> ...) */
MESHD_MAP("hash", __u64, struct ctr_netns, container_netns, 4096, 0);
/* ... and by their IPv4 address -> netns cookie (sk_lookup has no netns cookie) */
MESHD_MAP("hash", __u32, __u64, container_addr4, 4096, 0);
/* Inbound: ports a container's processes listen on -> workload id, filled by
 * sockops at listen() (the served namespace's are in inbound_ports) */
MESHD_MAP("hash", struct ctr_port, __u32, ctr_inbound_ports, MESHD_MAX_INBOUND_PORTS, 0);
/* Envoy's listening sockets inside those namespaces; empty = fail open there */
MESHD_SOCKHASH(netns_listeners, struct netns_slot, u64, 8192);

static __always_inline void count(__u32 workload, __u32 slot)
{
	__u32 idx = workload * MESHD_NR_COUNTERS + slot;
	__u64 *v = counters.lookup(&idx);
	if (v)
		*v += 1;
}

/* The workload id of the deepest enrolled cgroup that holds the caller (only
 * meaningful in process context). The programs run for every cgroup below the
 * one they are attached to, so the caller's own cgroup may not be in the map:
 * walk its ancestors. */
static __always_inline __u32 current_workload(void)
{
	__u64 id = bpf_get_current_cgroup_id();
	__u32 *wl = workload_ids.lookup(&id);
	if (wl)
		return *wl;
	__u32 found = 0;
	for (int level = 1; level < MESHD_MAX_CGROUP_DEPTH; level++) {
		id = bpf_get_current_ancestor_cgroup_id(level);
		if (id == 0)
			break;
		wl = workload_ids.lookup(&id);
		if (wl)
			found = *wl;
	}
	return found;
}

/* The container namespace the calling socket lives in, or NULL (the served
 * namespace itself: host processes and --network host containers). */
static __always_inline struct ctr_netns *in_container_netns(void *ctx)
{
	__u64 ns = bpf_get_netns_cookie(ctx);
	return container_netns.lookup(&ns);
}

static __always_inline struct mesh_settings *get_settings(void)
{
	__u32 zero = 0;
	return settings.lookup(&zero);
}

#endif /* MESHD_H */
