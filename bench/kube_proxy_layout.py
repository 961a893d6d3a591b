"""The same state in kube-proxy's own nftables layout (one chain per Service port and
one per endpoint, an inline numgen vmap per Service), written from the facts in
shared/notes/kube-proxy-nftables.md, for comparing load times with `nft -f`."""

from __future__ import annotations

from statefactory import cluster_ip, endpoint_ip

BASE = """add table ip kube-proxy { comment "rules for kube-proxy" ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }
add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }
add chain ip kube-proxy services
add chain ip kube-proxy masquerading
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy service-endpoints-check
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy reject-chain
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; }
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump cluster-ips-check
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject
add rule ip kube-proxy reject-chain reject
"""


def script(n: int, m: int) -> str:
    out = [BASE]
    for i in range(n):
        svc = f"S{i:07d}-bench/svc-{i}/tcp/http"
        ip = cluster_ip(i)
        out.append(f"add chain ip kube-proxy service-{svc}\n")
        eps = []
        for e in range(m):
            ep_ip = endpoint_ip(i, e)
            ep = f"E{i:07d}{e:03d}-bench/svc-{i}/tcp/http__{ep_ip}/8080"
            eps.append(ep)
            out.append(f"add chain ip kube-proxy endpoint-{ep}\n"
                       f"add rule ip kube-proxy endpoint-{ep} ip saddr {ep_ip} jump mark-for-masquerade\n"
                       f"add rule ip kube-proxy endpoint-{ep} meta l4proto tcp dnat to {ep_ip}:8080\n")
        vmap = " , ".join(f"{k} : goto endpoint-{ep}" for k, ep in enumerate(eps))
        out.append(f"add rule ip kube-proxy service-{svc} ip daddr {ip} ip saddr != 10.0.0.0/8 jump mark-for-masquerade\n"
                   f"add rule ip kube-proxy service-{svc} numgen random mod {m} vmap {{ {vmap} }}\n"
                   f"add element ip kube-proxy cluster-ips {{ {ip} }}\n"
                   f"add element ip kube-proxy service-ips {{ {ip} . tcp . 80 : goto service-{svc} }}\n")
    return "".join(out)
