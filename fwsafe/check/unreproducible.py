"""What the sandbox of `fwsafe check` cannot reproduce: the iptables matches and targets, the
nft expressions, and interfaces it does not have, named for the report; `LIMITS`, the general
limits every JSON answer lists. Pure: nothing here runs a program."""

from __future__ import annotations

import re
from collections.abc import Iterable

from fwsafe.backends.iptsave import Rule
from fwsafe.check.nft_listing import ChainKey, NftListing, NftRule

# --------------------------------------------------------------------------------------------
# What the sandbox cannot reproduce
# --------------------------------------------------------------------------------------------

#: iptables match modules (``-m NAME``) whose outcome depends on something the sandbox lacks.
IPT_UNREPRODUCIBLE: dict[str, str] = {
    "owner": "owner: the process owning a local socket",
    "cgroup": "cgroup: the cgroup of a local socket",
    "socket": "socket: lookups of local sockets",
    "limit": "limit: a rate limit (the sandbox sends a single connection)",
    "hashlimit": "hashlimit: a rate limit (the sandbox sends a single connection)",
    "recent": "recent: the address history (empty in the sandbox)",
    "connlimit": "connlimit: connection counts (the sandbox holds only its own)",
    "set": "set: ipset contents (not copied into the sandbox)",
    "time": "time: the time of day or date",
    "physdev": "physdev: bridge ports (the sandbox has no bridge)",
    "mark": "mark: packet marks (may be set outside the firewall: tc, routing, daemons)",
    "connmark": "connmark: connection marks (may be set outside the firewall)",
    "statistic": "statistic: random or every-nth sampling",
    "quota": "quota: the quota used so far",
    "quota2": "quota2: the quota used so far",
    "connbytes": "connbytes: traffic counted so far on the connection",
    "string": "string: payload content (the sandbox does not speak SSH)",
    "u32": "u32: raw packet bytes",
    "bpf": "bpf: a BPF program on packet bytes",
    "length": "length: packet lengths (the sandbox's packets differ from SSH's)",
    "ttl": "ttl: the TTL of packets from the real client (hops away)",
    "hl": "hl: the hop limit of packets from the real client (hops away)",
    "tos": "tos: TOS marking by the real client",
    "dscp": "dscp: DSCP marking by the real client",
    "tcpmss": "tcpmss: the MSS the real client announces",
    "mac": "mac: MAC addresses of the real neighbours",
    "policy": "policy: IPsec policies",
    "geoip": "geoip: the GeoIP database",
    "devgroup": "devgroup: interface groups",
    "cpu": "cpu: the CPU that receives the packet",
    "cluster": "cluster: cluster hashing",
    "rateest": "rateest: rate estimators",
    "realm": "realm: routing realms",
    "ipvs": "ipvs: IPVS state",
    "osf": "osf: OS fingerprinting",
    "condition": "condition: run-time condition flags",
    "psd": "psd: port-scan history",
}
#: iptables targets whose verdict comes from outside the kernel's rules.
IPT_UNREPRODUCIBLE_TARGETS: dict[str, str] = {
    "NFQUEUE": "NFQUEUE: the verdict of a userspace program (none runs in the sandbox)",
    "QUEUE": "QUEUE: the verdict of a userspace program (none runs in the sandbox)",
}
#: nft expressions (regex on the canonical listing) the sandbox cannot reproduce.
NFT_UNREPRODUCIBLE: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(meta\s+)?sk(uid|gid)\b"), "skuid/skgid: the process owning a local socket"),
    (re.compile(r"\bsocket\s+cgroupv2\b|\bmeta\s+cgroup\b"), "cgroup: the cgroup of a local socket"),
    (re.compile(r"\bsocket\s+(transparent|mark|wildcard)\b"), "socket: lookups of local sockets"),
    (re.compile(r"\blimit\s+rate\b"), "limit rate: a rate limit (the sandbox sends a single connection)"),
    (re.compile(r"\bct\s+count\b"), "ct count: connection counts (the sandbox holds only its own)"),
    (re.compile(r"\bmeta\s+(time|day|hour)\b"), "meta time/day/hour: the time of day or date"),
    (re.compile(r"\bqueue\b"), "queue: the verdict of a userspace program (none runs in the sandbox)"),
    (re.compile(r"\bmeter\b|\b(add|update)\s+@"), "meter/dynamic set: history built at run time"),
    (re.compile(r"\bnumgen\s+random\b"), "numgen random: random sampling"),
    (re.compile(r"\b(meta|ct)\s+mark\b(?!\s+set)"),
     "mark: packet or connection marks (may be set outside the firewall)"),
    (re.compile(r"\bquota\b"), "quota: the quota used so far"),
    (re.compile(r"\bct\s+(bytes|packets|avgpkt)\b"), "ct bytes/packets: traffic counted so far"),
    (re.compile(r"\bip\s+ttl\b|\bip6\s+hoplimit\b"), "ttl/hoplimit: packets from the real client"),
    (re.compile(r"\b(meta|ip|ip6)\s+length\b"), "length: packet lengths differ from SSH's"),
    (re.compile(r"\bosf\b"), "osf: OS fingerprinting"),
    (re.compile(r"\bipsec\b|\bmeta\s+secpath\b"), "ipsec: IPsec policies"),
    (re.compile(r"\bether\s+(saddr|daddr)\b"), "ether: MAC addresses of the real neighbours"),
    (re.compile(r"\bmeta\s+cpu\b"), "meta cpu: the CPU that receives the packet"),
    (re.compile(r"\bmeta\s+(iif|oif)group\b"), "interface groups"),
    (re.compile(r"\bmeta\s+rtclassid\b"), "rtclassid: routing realms"),
    (re.compile(r"@ih,"), "@ih: payload content (the sandbox does not speak SSH)"),
]

#: The general limits, reported in every JSON answer.
LIMITS: list[str] = [
    "rate limits (iptables limit/hashlimit, nft limit rate): the sandbox sends one connection",
    "history (recent, connlimit, quota, connbytes, nft meters and dynamic sets): starts empty",
    "socket owner and cgroup matches (owner, cgroup, socket, nft skuid/skgid/cgroupv2)",
    "time of day (iptables time, nft meta time/day/hour)",
    "ipset contents and nft set contents changed at run time",
    "interfaces other than the one the management traffic arrives on; bridge ports (physdev)",
    "packet and connection marks set outside the firewall (tc, ip rule, daemons)",
    "NFQUEUE/queue verdicts of userspace programs",
    "what the real client's packets carry: TTL/hop limit, TOS/DSCP, MSS, MAC address, payload",
    "IPsec policies, GeoIP, OS fingerprints, CPU, cluster hashing, random sampling",
    "ARP and IPv6 neighbour discovery (the sandbox uses static neighbour entries)",
    "routes and addresses other than those of the management path; sysctls other than "
    "nf_conntrack_tcp_loose / nf_conntrack_tcp_be_liberal",
]


def interface_known(name: str, known: Iterable[str]) -> bool:
    """Whether an iptables (``eth+``) or nft (``eth*``) interface name matches a known one."""
    if name.endswith(("+", "*")):
        return any(k.startswith(name[:-1]) for k in known)
    return name in known


def ipt_unreproducible(rule: Rule, known_interfaces: Iterable[str]) -> list[str]:
    """Why the sandbox cannot reproduce this rule's outcome ([] = it can)."""
    reasons = [IPT_UNREPRODUCIBLE[m] for m in rule.modules() if m in IPT_UNREPRODUCIBLE]
    target = rule.target
    if target in IPT_UNREPRODUCIBLE_TARGETS:
        reasons.append(IPT_UNREPRODUCIBLE_TARGETS[target])
    known = list(known_interfaces)
    for option in ("-i", "-o", "--in-interface", "--out-interface"):
        name = rule.option(option)
        # `! -i docker0`: a packet of the sandbox's interfaces matches it as on the host
        if name and not interface_known(name, known) and not rule.negated(option):
            reasons.append(f"interface {name}: not in the sandbox")
    return reasons


def ipt_excludes_tcp(rule: Rule, family: int) -> bool:
    """True when the rule's protocol match can never match the TCP management traffic."""
    proto = rule.option("-p", "--protocol")
    if proto is None:
        return False
    tcp = proto.lower() in ("tcp", "6", "all", "0")
    return tcp == rule.negated("-p")


def ipt_interface_only(reasons: list[str]) -> bool:
    return all(r.startswith("interface ") for r in reasons)


def _strip_comment(text: str) -> str:
    return re.sub(r'\bcomment\s+"(?:[^"\\]|\\.)*"', "", text)


def nft_unreproducible(rule: NftRule, chain: ChainKey, listing: NftListing,
                       known_interfaces: Iterable[str]) -> list[str]:
    """Why the sandbox cannot reproduce this nft rule's outcome ([] = it can)."""
    text = _strip_comment(rule.text)
    reasons = [why for pattern, why in NFT_UNREPRODUCIBLE if pattern.search(text)]
    for name in re.findall(r"@(\w+)", text):
        if (chain[0], chain[1], name) in listing.dynamic_sets:
            reasons.append(f"set @{name}: its contents change at run time")
            break
    known = list(known_interfaces)
    for m in re.finditer(r'\b(?:meta\s+)?(iifname|oifname|iif|oif)\s+(!=\s*)?(\{[^}]*\}|"[^"]*"|\S+)',
                         text):
        if m.group(2):   # `iifname != "docker0"`: matched in the sandbox as on the host
            continue
        for name in re.findall(r'"([^"]*)"|([\w.*+-]+)', m.group(3)):
            value = name[0] or name[1]
            if value and not interface_known(value, known):
                reasons.append(f"interface {value}: not in the sandbox")
    return reasons


def nft_excludes_tcp(rule: NftRule) -> bool:
    """True when the rule clearly matches only non-TCP traffic."""
    text = _strip_comment(rule.text)
    if re.search(r"\btcp\b|\bth\b", text):
        return False
    return bool(re.search(r"\b(udp|icmp|icmpv6|ip6?\s+nexthdr\s+(udp|icmp)|meta\s+l4proto\s+"
                          r"(udp|icmp|ipv6-icmp|icmpv6)|ip\s+protocol\s+(udp|icmp))\b", text))
