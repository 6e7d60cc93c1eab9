/* sk_msg (attached to the accel_socks SOCKHASH, so it runs on every send of a
 * socket sockops.c put there): hand the bytes straight to the peer socket's
 * receive queue, skipping TCP/IP, when the peer is in the map too.
 *
 * Every path returns SK_PASS: a miss (peer not in the map, acceleration
 * turned off) sends through the normal TCP path; nothing is ever dropped.
 *
 * The latch (accel_state) keeps each direction of a connection on one path,
 * because a reader drains redirected bytes before the TCP receive queue:
 *  - a socket whose first send found its peer redirects from then on;
 *  - once a socket has sent through TCP (peer missing at its first send,
 *    acceleration turned off, the peer gone) it never redirects again, so
 *    bytes redirected later can never overtake bytes still in the peer's TCP
 *    receive queue. Redirect -> TCP is safe (the older bytes are read first).
 * A socket without a latch entry (evicted, or inserted by someone else) sends
 * through TCP. */
#include "meshd.h"

int meshd_sk_msg(struct sk_msg_md *msg)
{
	struct accel_key self = {}, peer = {};
	self.netns = bpf_get_netns_cookie(msg);
	tuple_of_msg(msg, &self.t);
	__u8 *st = accel_state.lookup(&self);
	if (!st || *st == ACCEL_TCP || !accel_enabled()) {
		if (st)
			*st = ACCEL_TCP;
		accel_add(A_FALLBACKS, 1);
		return SK_PASS;
	}
	accel_peer_of(&self, &peer);
	__u32 size = msg->size;
	long verdict = accel_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (verdict == SK_PASS) {
		*st = ACCEL_REDIRECT;
		accel_add(A_MESSAGES_REDIRECTED, 1);
		accel_add(A_BYTES_REDIRECTED, size);
		return SK_PASS;
	}
	*st = ACCEL_TCP;
	accel_add(A_FALLBACKS, 1);
	return SK_PASS;
}
