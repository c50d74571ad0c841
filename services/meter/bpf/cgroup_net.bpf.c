// SPDX-License-Identifier: GPL-2.0
/* Bytes in and out of one cgroup, split LAN/WAN and IPv4/IPv6 (services/meter/cgroupbpf.py).
 *
 * Two cgroup_skb programs, attached to a workload's cgroup-v2 directory: egress sees every
 * packet a socket of the cgroup (or of a cgroup below it) sends, as IP leaves the socket
 * layer; ingress every packet delivered to one of its sockets. The remote address (the
 * destination going out, the source coming in) is looked up in `lan`, an LPM trie of the
 * configured LAN networks with IPv4 written as IPv4-mapped IPv6 (::ffff:a.b.c.d, prefix
 * + 96); a miss is WAN. `counts` holds bytes and packets of whole IP packets (headers
 * included, as iptables counts them) at index direction * 4 + family * 2 + wan.
 * Verdicts never change: both programs always return 1 (let the packet pass).
 *
 * No CO-RE and no vmlinux.h: only the stable __sk_buff context and bpf_skb_load_bytes.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

struct lan_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct count {
	__u64 bytes;
	__u64 packets;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct lan_key);
	__type(value, __u8);
} lan SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, struct count);
} counts SEC(".maps");

static __always_inline int account(struct __sk_buff *skb, __u32 egress)
{
	struct lan_key key = {.prefixlen = 128};
	__u32 family, index;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		family = 0;
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		/* IPv4 header: source at 12, destination at 16 */
		if (bpf_skb_load_bytes(skb, egress ? 16 : 12, &key.addr[12], 4) < 0)
			return 1;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		family = 1;
		/* IPv6 header: source at 8, destination at 24 */
		if (bpf_skb_load_bytes(skb, egress ? 24 : 8, key.addr, 16) < 0)
			return 1;
	} else {
		return 1;
	}
	index = (egress ? 0 : 4) + family * 2 + (bpf_map_lookup_elem(&lan, &key) ? 0 : 1);
	struct count *c = bpf_map_lookup_elem(&counts, &index);
	if (c) {
		__sync_fetch_and_add(&c->bytes, skb->len);
		__sync_fetch_and_add(&c->packets, 1);
	}
	return 1;
}

SEC("cgroup_skb/egress")
int tollgate_egress(struct __sk_buff *skb)
{
	return account(skb, 1);
}

SEC("cgroup_skb/ingress")
int tollgate_ingress(struct __sk_buff *skb)
{
	return account(skb, 0);
}

char LICENSE[] SEC("license") = "GPL";
