"""The audit's ground truth: real packets from the world, the LAN and the neighbours, against
the verdict `fwsafe audit` gives for every listener, under many firewall set-ups.

The lab (built once, set-ups run one after another in it):

```
  world ns  --(w0)--  router (the lab's client ns, a bridge br0)  --eth0--  server (audited)
  198.51.100.77 (the world at large)       |                                 |      |
  1.2.3.4 (in a banned 1.0.0.0/8)        nbr ns (a neighbour on eth0's     eth1   vmnet0
  203.0.113.5 (an allow-listed office)   network: 10.231.I.3)               |      |
  10.50.0.9 (a routed private office)                                     lan ns  vm ns
  2001:db8:77::77, 2001:db8:1::4, 2001:db8:113::5                     172.30.I.2  10.233.I.10
```

The router routes the LAN's and the VM network's prefixes to the server (a routed customer
network), so the world can send to every address of the server. The server listens in about
twenty ways (TCP and UDP, IPv4 and IPv6, wildcard, one address, loopback, the second
interface's address, bound to a device, IPV6_V6ONLY, a REDIRECT target, a DNAT target on
127.0.0.1 with route_localnet, UDP 68 as a DHCP client does); the VM serves port 80 behind a
DNAT; Docker publishes containers. Every listener logs who reached it (TCP: an accepted
connection, so a complete handshake; UDP: a datagram received).

Each set-up loads a firewall, then sends real probes from every vantage point (each of its
addresses, source ports ephemeral/53/67/80, to every address of the server, every listener's
port and the NAT entry ports), all at once and, for set-ups with rate limits, one at a time
after idle as well; `fwsafe audit --json` runs beside them. A listener is *reachable* when any
probe got through; the audit's verdict is *exposed* (`exposed: true`), *uncertain* (`null`)
or *not exposed* (`false`). A miss is "not exposed" for a reachable listener; a false alarm is
"exposed" for an unreachable one.

Run the whole matrix outside pytest (as root), e.g. with another copy of fwsafe:

    .venv/bin/python -m tests.auditlab [--fwsafe "python3 -m fwsafe"] [--pythonpath DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwsafe.check.netns import Namespaces
from fwsafe.lab import Lab, LabError, create_lab, run, teardown

__all__ = ["SETUPS", "AuditTruthLab", "Outcome", "Setup", "confusion_table", "truth_lab"]

# --------------------------------------------------------------------------------------------
# Programs run inside the namespaces (standard library only; their input is JSON: the
# listeners' in argv[1], the probes' on stdin)
# --------------------------------------------------------------------------------------------
LISTENERS_PROGRAM = r"""
import json, socket, sys, threading
spec = json.loads(sys.argv[1])
events, lock = [], threading.Lock()

def accept(name, sock):
    while True:
        conn, peer = sock.accept()
        with lock:
            events.append([name, peer[0], peer[1]])
        conn.close()

def receive(name, sock):
    while True:
        data, peer = sock.recvfrom(512)
        with lock:
            events.append([name, peer[0], peer[1]])
        try:
            sock.sendto(data, peer)
        except OSError:
            pass

for item in spec:
    family = socket.AF_INET6 if ":" in item["address"] else socket.AF_INET
    kind = socket.SOCK_STREAM if item["proto"] == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if item.get("v6only") else 0)
    if item.get("device"):
        sock.setsockopt(socket.SOL_SOCKET, 25, item["device"].encode())  # SO_BINDTODEVICE
    sock.bind((item["address"], item["port"]))
    if kind == socket.SOCK_STREAM:
        sock.listen(1024)
    target = accept if kind == socket.SOCK_STREAM else receive
    threading.Thread(target=target, args=(item["name"], sock), daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    with lock:
        print(json.dumps(events), flush=True)
        events.clear()
"""

PROBE_PROGRAM = r"""
import errno, json, resource, select, socket, struct, sys, time
spec = json.loads(sys.stdin.read())
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
timeout, gap = spec["timeout"], spec.get("gap", 0)
results = {}

def opened(p):
    family = socket.AF_INET6 if ":" in p["dst"] else socket.AF_INET
    kind = socket.SOCK_STREAM if p["proto"] == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.bind((p["src"], p["sport"]))
    s.setblocking(False)
    return s

def wait(pending):
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLOUT)
    end = time.monotonic() + timeout
    while pending and time.monotonic() < end:
        for fd, _ in poller.poll(max(0.0, end - time.monotonic()) * 1000):
            ident, s = pending.pop(fd)
            poller.unregister(fd)
            code = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            results[ident] = code in (0, errno.ECONNRESET)
            s.close()
    for ident, s in pending.values():
        results[ident] = False
        s.close()

def start(p, pending):
    try:
        s = opened(p)
    except OSError:
        results[p["id"]] = False
        return
    try:
        if p["proto"] == "udp":
            s.connect((p["dst"], p["port"]))
            s.send(p["id"].encode())
            results[p["id"]] = None   # the listener's log says
            s.close()
            return
        code = s.connect_ex((p["dst"], p["port"]))
    except OSError:
        results[p["id"]] = False
        s.close()
        return
    if code not in (0, errno.EINPROGRESS):
        results[p["id"]] = False
        s.close()
        return
    pending[s.fileno()] = (p["id"], s)

if gap:
    done = set()
    for p in spec["probes"]:
        if p["group"] in done:
            continue
        time.sleep(gap)
        pending = {}
        start(p, pending)
        wait(pending)
        if results.get(p["id"]):
            done.add(p["group"])
else:
    for i in range(0, len(spec["probes"]), 500):
        pending = {}
        for p in spec["probes"][i:i + 500]:
            start(p, pending)
        wait(pending)
print(json.dumps(results))
"""

# Forget every connection the namespace tracks (a set-up's probes must not find the previous
# one's entries): IPCTNL_MSG_CT_DELETE without a tuple flushes the table, all families.
FLUSH_CONNTRACK_PROGRAM = r"""
import socket, struct
sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)   # NETLINK_NETFILTER
body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)             # struct nfgenmsg
head = struct.pack("=IHHII", 16 + len(body), (1 << 8) | 2, 0x1 | 0x4, 1, 0)
sock.sendto(head + body, (0, 0))
reply = sock.recv(4096)
error = struct.unpack_from("=i", reply, 16)[0]
if error not in (0, -2):   # -ENOENT: nothing tracked
    raise SystemExit("conntrack flush failed: %d" % error)
"""

# --------------------------------------------------------------------------------------------
# The lab's addresses (I is the lab's index)
# --------------------------------------------------------------------------------------------
WORLD4 = {"world": "198.51.100.77", "banned": "1.2.3.4", "office": "203.0.113.5",
          "routed": "10.50.0.9"}
WORLD6 = {"world": "2001:db8:77::77", "banned": "2001:db8:1::4", "office": "2001:db8:113::5"}
SPORTS = (0, 53, 67, 80)          # 0: an ephemeral port
NAT_PORTS = (80, 8080, 8090)      # REDIRECT 80->8001, DNAT 8080->127.0.0.1:8004, 8090->VM:80
DOCKER_PORTS = (8085, 8086)       # published on every address / on 127.0.0.1
PACE = 0.25                       # seconds between paced probes (the SYN limit is 5/s)


@dataclass(frozen=True)
class Spot:
    """One listening socket of the server (or the VM)."""

    name: str
    proto: str
    address: str
    port: int
    v6only: bool = False
    device: str = ""


def spots(i: int) -> list[Spot]:
    eth0_4, eth1_4 = f"10.231.{i}.1", f"172.30.{i}.1"
    eth0_6, eth1_6 = f"fd00:231:{i}::1", f"fd00:232:{i}::1"
    return [
        Spot("tcp4-any", "tcp", "0.0.0.0", 7001),
        Spot("tcp4-lo", "tcp", "127.0.0.1", 7002),
        Spot("tcp-dual", "tcp", "::", 7003),
        Spot("tcp6-v6only", "tcp", "::", 7004, v6only=True),
        Spot("tcp4-eth0", "tcp", eth0_4, 7005),
        Spot("tcp4-eth1", "tcp", eth1_4, 7006),
        Spot("tcp6-eth0", "tcp", eth0_6, 7007),
        Spot("tcp4-dev-eth1", "tcp", "0.0.0.0", 7008, device="eth1"),
        Spot("udp4-any", "udp", "0.0.0.0", 7009),
        Spot("udp-dual", "udp", "::", 7010),
        Spot("udp4-lo", "udp", "127.0.0.1", 7011),
        Spot("udp4-dev-eth1", "udp", "0.0.0.0", 7012, device="eth1"),
        Spot("tcp6-lo", "tcp", "::1", 7013),
        Spot("tcp4-lo-dnat", "tcp", "127.0.0.1", 8004),
        Spot("tcp4-redirect", "tcp", "0.0.0.0", 8001),
        Spot("udp4-dhcp", "udp", "0.0.0.0", 68),
        Spot("tcp6-eth1", "tcp", eth1_6, 7017),
        Spot("udp4-eth1", "udp", eth1_4, 7018),
    ]


@dataclass
class Setup:
    """One firewall set-up: what is loaded before the probes (all optional)."""

    name: str
    v4: str = ""                  # iptables-save text (iptables-nft)
    v6: str = ""
    legacy4: str = ""             # iptables-legacy-save text
    nft: str = ""                 # an nft file
    ipset: str = ""               # `ipset restore` input
    sysctls: dict[str, str] = field(default_factory=dict)
    ufw: list[list[str]] = field(default_factory=list)   # ufw commands, in order
    paced: bool = False           # rate limits: probe one at a time after idle too
    docker: bool = False
    uncertain: frozenset[str] = frozenset()   # spots an unreproducible rule concerns
    reason: str = ""              # ... and what their `uncertain` says
    recent: dict[str, list[str]] = field(default_factory=dict)   # xt_recent lists, filled
    note: str = ""


def _filter(rules: str, policy: str = "ACCEPT", *, v6: bool = False) -> str:
    icmp = "-A INPUT -p ipv6-icmp -j ACCEPT" if v6 else "-A INPUT -p icmp -j ACCEPT"
    base = ("-A INPUT -i lo -j ACCEPT\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED "
            f"-j ACCEPT\n{icmp}\n-A INPUT -p tcp --dport 22 -j ACCEPT\n") \
        if policy == "DROP" else ""
    chains = "".join(f":{c} - [0:0]\n" for c in sorted({ln.split()[1] for ln in rules.splitlines()
                                                       if ln.startswith("-A ")} -
                                                      {"INPUT", "FORWARD", "OUTPUT"}))
    return (f"*filter\n:INPUT {policy} [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            f"{chains}{base}{rules}COMMIT\n")


NAT_SYSCTLS = {"net.ipv4.conf.eth0.route_localnet": "1", "net.ipv4.conf.eth1.route_localnet": "1",
               "net.ipv4.ip_forward": "1"}


def nft_nat(*translations: str) -> str:
    """An nft file: `translations` in a prerouting nat chain, and port 8001 let in only
    through a translation (as the nat set-up's filter does)."""
    rules = "".join(f"        {t}\n" for t in translations)
    return ("table ip audit_nat {\n    chain pre {\n"
            "        type nat hook prerouting priority dstnat; policy accept;\n"
            f"{rules}    }}\n}}\ntable inet audit_filter {{\n    chain input {{\n"
            "        type filter hook input priority 0; policy accept;\n"
            "        tcp dport 8001 ct status dnat accept\n        tcp dport 8001 drop\n"
            "    }\n}\n")


def setups(i: int) -> list[Setup]:
    """The set-ups of the matrix, in the order they run (Docker last: it starts dockerd)."""
    lan4, lan6 = f"172.30.{i}.1", f"fd00:232:{i}::1"
    synflood = ("-A INPUT -p tcp --syn -j SYNFLOOD\n"
                "-A SYNFLOOD -m limit --limit 5/s --limit-burst 3 -j RETURN\n"
                "-A SYNFLOOD -j DROP\n")
    nat = (f"*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
           ":POSTROUTING ACCEPT [0:0]\n"
           "-A PREROUTING -p tcp --dport 80 -j REDIRECT --to-ports 8001\n"
           "-A PREROUTING -p tcp --dport 8080 -j DNAT --to-destination 127.0.0.1:8004\n"
           f"-A PREROUTING -p tcp --dport 8090 -j DNAT --to-destination 10.233.{i}.10:80\n"
           "COMMIT\n")
    nft_sets = textwrap.dedent("""\
        table inet audit_lab {
            set blocked { type ipv4_addr; flags interval; elements = { 1.0.0.0/8 } }
            set blocked6 { type ipv6_addr; flags interval; elements = { 2001:db8:1::/48 } }
            set allowed { type inet_service; elements = { 7001, 7003, 7009 } }
            chain input {
                type filter hook input priority 0; policy drop;
                iif "lo" accept
                ct state established,related accept
                meta l4proto { icmp, ipv6-icmp } accept
                ip saddr @blocked drop
                ip6 saddr @blocked6 drop
                tcp dport 22 accept
                tcp dport @allowed accept
                udp dport @allowed accept
            }
        }
        """)
    return [
        Setup("open", note="no rules at all"),
        Setup("drop-policy", v4=_filter("", "DROP"), v6=_filter("", "DROP", v6=True)),
        Setup("sport-80", v4=_filter("-A INPUT -p tcp --sport 80 -j ACCEPT\n", "DROP"),
              v6=_filter("-A INPUT -p tcp --sport 80 -j ACCEPT\n", "DROP", v6=True),
              note="a classic mistake: replies from web servers, and anyone from port 80"),
        Setup("dns-replies", v4=_filter("-A INPUT -p udp --sport 53 -j ACCEPT\n", "DROP"),
              v6=_filter("", "DROP", v6=True), note="UDP from source port 53 accepted"),
        Setup("ban-prefix", v4=_filter("-A INPUT -s 1.0.0.0/8 -j DROP\n"),
              v6=_filter("-A INPUT -s 2001:db8:1::/48 -j DROP\n", v6=True)),
        Setup("allow-list",
              v4=_filter("-A INPUT -s 203.0.113.0/24 -j ACCEPT\n"
                         "-A INPUT -s 10.50.0.0/16 -j ACCEPT\n", "DROP"),
              v6=_filter("-A INPUT -s 2001:db8:113::/48 -j ACCEPT\n", "DROP", v6=True),
              note="an office, and a routed private office subnet"),
        Setup("syn-flood", v4=_filter(synflood), v6=_filter(synflood, v6=True), paced=True),
        Setup("to-lan-address",
              v4=_filter(f"-A INPUT -d {lan4}/32 -j ACCEPT\n", "DROP"),
              v6=_filter(f"-A INPUT -d {lan6}/128 -j ACCEPT\n", "DROP", v6=True),
              note="meant for the LAN; the world is routed to that address too"),
        Setup("nat", v4=_filter("-A INPUT -p tcp --dport 8001 -m conntrack ! --ctstate DNAT "
                                "-j DROP\n") + nat,
              sysctls=NAT_SYSCTLS,
              note="REDIRECT 80->8001 (8001 only through it), DNAT 8080->127.0.0.1:8004 with "
                   "route_localnet, DNAT 8090 -> the VM's port 80"),
        Setup("nft-nat", nft=nft_nat("tcp dport 80 redirect to :8001",
                                     "tcp dport 8080 dnat to 127.0.0.1:8004",
                                     f"tcp dport 8090 dnat to 10.233.{i}.10:80"),
              sysctls=NAT_SYSCTLS, note="the nat set-up's translations written in nft"),
        Setup("nft-nat-maps",
              nft=nft_nat("meta l4proto tcp redirect to :tcp dport map { 80 : 8001 }",
                          "dnat ip to tcp dport map { 8080 : 127.0.0.1 . 8004, "
                          f"8090 : 10.233.{i}.10 . 80 }}"),
              sysctls=NAT_SYSCTLS, note="the nft-nat set-up's translations written as port maps"),
        Setup("byte-limits",
              v4=_filter("-A INPUT -i eth0 -p tcp -m conntrack --ctstate NEW -m hashlimit "
                         "--hashlimit-above 1kb/s --hashlimit-burst 2kb --hashlimit-name bytes "
                         "-j DROP\n"),
              nft=textwrap.dedent("""\
                  table ip6 audit_bytes {
                      chain input {
                          type filter hook input priority 0; policy accept;
                          iifname "eth0" ct state new meta l4proto tcp \
limit rate over 400 bytes/second burst 400 bytes drop
                      }
                  }
                  """),
              paced=True,
              note="byte-rate limits on new TCP from eth0 (hashlimit in bytes mode over IPv4, "
                   "nft limit rate over N bytes/second over IPv6): many probes at once run "
                   "into them, a single connection passes"),
        Setup("ipset",
              v4=_filter("-A INPUT -m set --match-set banned src -j DROP\n"
                         "-A INPUT -m set --match-set admins src -j ACCEPT\n"
                         "-A INPUT -p tcp -m set --match-set public dst,dst -j ACCEPT\n", "DROP"),
              ipset="create banned hash:net family inet\nadd banned 1.0.0.0/8\n"
                    "add banned 198.51.100.0/24\n"
                    "create admins hash:ip family inet\nadd admins 203.0.113.5\n"
                    f"create public hash:ip,port family inet\nadd public {lan4},tcp:7001\n"),
        Setup("nft-sets", nft=nft_sets),
        Setup("ufw-stock", ufw=[["--force", "enable"], ["allow", "22/tcp"]],
              note="ufw's own before.rules: UDP from port 67 to port 68 is accepted"),
        Setup("ufw-to-lan", ufw=[["--force", "enable"], ["allow", "22/tcp"],
                                 ["allow", "to", lan4, "port", "7001"],
                                 ["allow", "to", lan4, "port", "7009"]]),
        Setup("legacy", legacy4=_filter("-A INPUT -p tcp --dport 7001 -j ACCEPT\n", "DROP")),
        Setup("v6-drops", v6=_filter("-A INPUT -p tcp --dport 7003 -j DROP\n"
                                     "-A INPUT -p udp --dport 7010 -j DROP\n", v6=True)),
        Setup("output-drops",
              v4="*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                 "-A OUTPUT -p tcp --sport 7001 -j DROP\n-A OUTPUT -p tcp --sport 7005 -j DROP\n"
                 "-A OUTPUT -d 198.51.100.0/24 -j DROP\nCOMMIT\n"),
        Setup("nft-and-iptables",
              v4=_filter("-A INPUT -p tcp --dport 7005 -j DROP\n"),
              nft="table inet audit_lab {\n chain input {\n"
                  "  type filter hook input priority 10; policy accept;\n"
                  "  tcp dport { 7001, 7003 } drop\n  udp dport 7009 drop\n }\n}\n"),
        Setup("random-drop",
              v4=_filter("-A INPUT -p tcp --dport 7001 -m statistic --mode random "
                         "--probability 0.5 -j DROP\n"),
              uncertain=frozenset({"tcp4-any"}),
              note="a match the sandbox cannot reproduce: that listener is uncertain"),
        Setup("port-knock",
              v4=_filter("-A INPUT -p tcp --dport 7001 -m recent --rcheck --seconds 30 "
                         "--name knocked -j ACCEPT\n", "DROP"),
              note="a port opened to the addresses in a recent list that no rule fills and "
                   "that is empty: decided (not exposed)"),
        Setup("port-knock-held",
              v4=_filter("-A INPUT -p tcp --dport 7001 -m recent --rcheck --seconds 60 "
                         "--name knocked -j ACCEPT\n", "DROP"),
              recent={"knocked": [WORLD4["world"]]},
              note="the same, with the world's address in the list now (it knocked, or an "
                   "admin let it in): copied into the sandbox, exposed"),
        Setup("port-knock-sequence",
              v4=_filter("-A INPUT -p tcp --dport 7099 -m recent --set --name knock -j DROP\n"
                         "-A INPUT -p tcp --dport 7001 -m recent --rcheck --seconds 30 "
                         "--name knock -j ACCEPT\n", "DROP"),
              uncertain=frozenset({"tcp4-any"}), reason="port knocking",
              note="a knock on 7099 opens 7001 for 30 s: whoever knocks gets in; the probes "
                   "do not knock, so uncertain (saying why), not closed"),
        Setup("docker", docker=True,
              legacy4="*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT "
                      "[0:0]\n:POSTROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\nCOMMIT\n",
              note="dockerd publishing 8085 and 127.0.0.1:8086; a leftover empty legacy "
                   "nat DOCKER chain"),
    ]


SETUPS = [s.name for s in setups(1)]

# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
VERDICTS = ("exposed", "uncertain", "not exposed", "missing")


@dataclass
class Outcome:
    """One set-up's verdicts: service -> (reachable from (vantages), the audit's verdict)."""

    setup: str
    truth: dict[str, set[str]] = field(default_factory=dict)
    verdict: dict[str, str] = field(default_factory=dict)
    world: dict[str, str] = field(default_factory=dict)    # the verdict about the world alone
    audit_s: float = 0.0
    exit_code: int = 0
    audit: dict[str, Any] = field(default_factory=dict)

    def rows(self, world: bool = False) -> Iterator[tuple[str, bool, str]]:
        """(service, reachable, verdict); `world`: from the world alone."""
        for name in sorted(self.truth):
            if world:
                yield name, "world" in self.truth[name], self.world.get(name, "missing")
            else:
                yield name, bool(self.truth[name]), self.verdict.get(name, "missing")

    @property
    def missed(self) -> list[str]:
        return [n for n, reachable, v in self.rows() if reachable and v != "exposed"
                and v != "uncertain"]

    @property
    def world_missed(self) -> list[str]:
        """Services the world reached that the audit says the world does not."""
        return [n for n, reachable, v in self.rows(world=True) if reachable
                and v not in ("exposed", "uncertain")]

    @property
    def false_alarms(self) -> list[str]:
        return [n for n, reachable, v in self.rows() if not reachable and v == "exposed"]

    @property
    def uncertain(self) -> list[str]:
        return [n for n, _, v in self.rows() if v == "uncertain"]

    def counts(self, world: bool = False) -> dict[tuple[bool, str], int]:
        found: dict[tuple[bool, str], int] = {}
        for _, reachable, verdict in self.rows(world):
            found[(reachable, verdict)] = found.get((reachable, verdict), 0) + 1
        return found

    def detail(self) -> str:
        lines = [f"set-up {self.setup}: audit {self.audit_s:.2f} s, exit {self.exit_code}"]
        for name, reachable, verdict in self.rows():
            mark = ""
            if reachable and verdict in ("not exposed", "missing"):
                mark = "   <-- MISSED"
            elif not reachable and verdict == "exposed":
                mark = "   <-- false alarm"
            truth = ", ".join(sorted(self.truth[name])) or "-"
            world = self.world.get(name, "missing")
            if "world" in self.truth[name] and world in ("not exposed", "missing"):
                mark += "   <-- world MISSED"
            elif "world" not in self.truth[name] and world == "exposed":
                mark += "   <-- world false alarm"
            lines.append(f"  {name:<22} reachable from: {truth:<24} audit: {verdict:<11} "
                         f"world: {world}{mark}")
        return "\n".join(lines)


def confusion_table(outcomes: Sequence[Outcome], world: bool = False) -> str:
    """Per set-up: reachable / not reachable against exposed / uncertain / not exposed; with
    `world`, from the world alone (the audit's world sources against the world namespace)."""
    head = (f"{'set-up':<17} {'reach->exp':>10} {'reach->unc':>10} {'reach->NOT':>10} "
            f"{'unre->exp':>10} {'unre->unc':>10} {'unre->not':>10} {'audit s':>8}")
    lines = [head]
    total: dict[tuple[bool, str], int] = {}
    for outcome in outcomes:
        c = outcome.counts(world)
        for key, value in c.items():
            total[key] = total.get(key, 0) + value
        lines.append(_row(outcome.setup, c, f"{outcome.audit_s:8.2f}"))
    lines.append(_row("total", total, ""))
    verdicts = sum(total.values())
    missed = sum(v for (r, verdict), v in total.items() if r and verdict in ("not exposed",
                                                                            "missing"))
    alarms = total.get((False, "exposed"), 0)
    uncertain = sum(v for (_, verdict), v in total.items() if verdict == "uncertain")
    lines.append(f"{verdicts} verdicts: {missed} missed exposures, {alarms} false alarms "
                 f"({100 * alarms / max(verdicts, 1):.1f} %), {uncertain} uncertain")
    return "\n".join(lines)


def _row(name: str, c: dict[tuple[bool, str], int], tail: str) -> str:
    missed = c.get((True, "not exposed"), 0) + c.get((True, "missing"), 0)
    return (f"{name:<17} {c.get((True, 'exposed'), 0):>10} {c.get((True, 'uncertain'), 0):>10} "
            f"{missed:>10} {c.get((False, 'exposed'), 0):>10} "
            f"{c.get((False, 'uncertain'), 0):>10} "
            f"{c.get((False, 'not exposed'), 0) + c.get((False, 'missing'), 0):>10} {tail}")


# --------------------------------------------------------------------------------------------
# The lab
# --------------------------------------------------------------------------------------------
class AuditTruthLab:
    """The lab of the module docstring; `fwsafe`: the argv that runs fwsafe (in the server
    namespace), `env`: extra environment for it."""

    def __init__(self, lab: Lab, fwsafe: Sequence[str], env: dict[str, str] | None = None
                 ) -> None:
        self.lab = lab
        self.i = lab.index
        self.fwsafe = list(fwsafe)
        self.env = dict(env or {})
        self.ns = Namespaces()
        p = lab.prefix
        self.world, self.lan, self.nbr, self.vm = f"{p}-w", f"{p}-l", f"{p}-n", f"{p}-v"
        self.spots = spots(self.i)
        self.vm_spot = Spot("vm-forward", "tcp", f"10.233.{self.i}.10", 80)
        self.config = lab.workdir / "audit.toml"
        self.config.write_text('expected_open = ["22/tcp"]\n')
        self.listeners: Any = None
        self.vm_listener: Any = None
        self.docker: Any = None
        self.containers: dict[str, str] = {}    # name -> container address

    # -- building ------------------------------------------------------------------------------
    def build(self) -> None:
        i, ns, lab = self.i, self.ns, self.lab
        for name in (self.world, self.lan, self.nbr, self.vm):
            ns.create(name)
        cli = lab.cli_ns
        # the router: its eth0 joins a bridge with the neighbour
        ns.batch(cli, ["link add br0 type bridge", "link set br0 up",
                       f"addr del 10.231.{i}.2/24 dev eth0", f"addr del fd00:231:{i}::2/64 dev eth0",
                       "link set eth0 master br0", f"addr add 10.231.{i}.2/24 dev br0",
                       f"addr add fd00:231:{i}::2/64 dev br0 nodad"])
        ns.veth(cli, "nb0", self.nbr, "eth0")
        ns.batch(cli, ["link set nb0 master br0", "link set nb0 up"])
        ns.configure(self.nbr, "eth0", [f"10.231.{i}.3/24", f"fd00:231:{i}::3/64"])
        ns.batch(self.nbr, [f"route add default via 10.231.{i}.2",
                            f"route add default via fd00:231:{i}::2"])
        # the world behind the router
        ns.veth(cli, "w0", self.world, "eth0")
        ns.configure(cli, "w0", [f"100.64.{i}.1/30", f"fd00:64:{i}::1/64"])
        world_addrs = [f"{a}/32" for a in WORLD4.values()] + [f"{a}/128" for a in WORLD6.values()]
        ns.configure(self.world, "eth0", [f"100.64.{i}.2/30", f"fd00:64:{i}::2/64",
                                          *world_addrs])
        ns.batch(self.world, [f"route add default via 100.64.{i}.1",
                              f"route add default via fd00:64:{i}::1"])
        router = [f"route add {a}/32 via 100.64.{i}.2" for a in WORLD4.values()]
        router += [f"route add {a}/128 via fd00:64:{i}::2" for a in WORLD6.values()]
        router += [f"route add 172.30.{i}.0/24 via 10.231.{i}.1",
                   f"route add 10.233.{i}.0/24 via 10.231.{i}.1",
                   f"route add fd00:232:{i}::/64 via fd00:231:{i}::1"]
        ns.batch(cli, router)
        # the server's LAN (eth1) and VM network (vmnet0)
        srv = lab.srv_ns
        ns.veth(srv, "eth1", self.lan, "eth0")
        ns.configure(srv, "eth1", [f"172.30.{i}.1/24", f"fd00:232:{i}::1/64"])
        ns.configure(self.lan, "eth0", [f"172.30.{i}.2/24", f"fd00:232:{i}::2/64"])
        ns.batch(self.lan, [f"route add default via 172.30.{i}.1",
                            f"route add default via fd00:232:{i}::1"])
        ns.veth(srv, "vmnet0", self.vm, "eth0")
        ns.configure(srv, "vmnet0", [f"10.233.{i}.1/24"])
        ns.configure(self.vm, "eth0", [f"10.233.{i}.10/24"])
        ns.batch(self.vm, [f"route add default via 10.233.{i}.1"])
        ns.batch(srv, [f"route add default via 10.231.{i}.2",
                       f"route add default via fd00:231:{i}::2"])
        for name, value in (("net.ipv4.ip_forward", "1"),
                            ("net.ipv6.conf.all.forwarding", "1")):
            run(ns.exec_argv(cli, ["sysctl", "-qw", f"{name}={value}"]))
        self._start_listeners()

    def _start_listeners(self) -> None:
        spec = [vars(s) for s in self.spots]
        self.listeners = self.lab.srv_popen(["python3", "-I", "-c", LISTENERS_PROGRAM,
                                             json.dumps(spec)], stdin=-1, stdout=-1)
        self._ready(self.listeners)
        # the VM's service: started through our own namespace handle, stopped in close()
        import subprocess

        self.vm_listener = subprocess.Popen(
            self.ns.exec_argv(self.vm, ["python3", "-I", "-c", LISTENERS_PROGRAM,
                                        json.dumps([vars(self.vm_spot)])]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self._ready(self.vm_listener)

    @staticmethod
    def _ready(proc: Any) -> None:
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise LabError(f"the listeners did not start (exit {proc.poll()})")

    def close(self) -> None:
        for proc in (self.vm_listener, self.listeners):
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
                proc.kill()
                proc.wait(timeout=10)
        steps: list[tuple[str, Callable[[], object]]] = []
        if self.docker is not None:
            steps.append(("stopping docker", self.docker.close))
        steps.append(("removing namespaces", self.ns.close))
        errors = teardown(steps)
        if errors:
            raise LabError("audit lab teardown: " + "; ".join(errors))

    # -- the firewall ----------------------------------------------------------------------------
    def srv(self, argv: list[str], *, input: str | None = None, check: bool = True) -> Any:
        return self.lab.srv_exec(argv, input=input, check=check, timeout=120)

    def reset(self) -> None:
        """No rules, no sets, ufw off, the sysctls as a new namespace has them."""
        for tool in ("iptables", "ip6tables", "iptables-legacy", "ip6tables-legacy"):
            for table in ("filter", "nat", "mangle", "raw"):
                self.srv([tool, "-w", "-t", table, "-F"], check=False)
                self.srv([tool, "-w", "-t", table, "-X"], check=False)
                for chain in ("INPUT", "FORWARD", "OUTPUT"):
                    self.srv([tool, "-w", "-t", table, "-P", chain, "ACCEPT"], check=False)
        self.srv(["nft", "flush", "ruleset"])
        self.srv(["ipset", "destroy"], check=False)
        self.srv(["python3", "-I", "-c", FLUSH_CONNTRACK_PROGRAM])
        for name in ("net.ipv4.conf.eth0.route_localnet", "net.ipv4.conf.eth1.route_localnet",
                     "net.ipv4.conf.all.route_localnet", "net.ipv4.ip_forward"):
            self.srv(["sysctl", "-qw", f"{name}=0"])

    def load(self, setup: Setup) -> None:
        self.reset()
        if setup.ipset:
            self.srv(["ipset", "restore"], input=setup.ipset)
        for tool, text in (("iptables-restore", setup.v4), ("ip6tables-restore", setup.v6),
                           ("iptables-legacy-restore", setup.legacy4)):
            if text:
                self.srv([tool], input=text)
        for name, addresses in setup.recent.items():   # one address per write
            for address in addresses:
                self.srv(["tee", f"/proc/net/xt_recent/{name}"], input=f"+{address}\n")
        if setup.nft:
            self.srv(["nft", "-f", "-"], input=setup.nft)
        for name, value in setup.sysctls.items():
            self.srv(["sysctl", "-qw", f"{name}={value}"])
        if setup.ufw:
            self.srv(["ufw", "--force", "reset"])
            for command in setup.ufw:
                self.srv(["ufw", *command])
        if setup.docker:
            self._start_docker()

    def unload(self, setup: Setup) -> None:
        if setup.ufw:
            self.srv(["ufw", "--force", "disable"])
        self.reset()

    def _start_docker(self) -> None:
        if self.docker is not None:
            return
        from tests.neighbours import Dockerd

        self.docker = Dockerd(self.lab)
        self.docker.start()
        self.docker.import_busybox()
        self.docker.network_create("n1")
        self.docker.run_httpd("web1", "n1", 8085)
        image = self.docker.image
        self.docker.docker("run", "-d", "--name", "web2", "--network", "n1", "-p",
                           "127.0.0.1:8086:80", image, "/bin/sh", "-c",
                           "exec httpd -f -p 80 -h /www")
        for name in ("web1", "web2"):
            self.containers[name] = self.docker.docker(
                "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                name).stdout.strip()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:   # the containers' httpd answer
            probes = [{"id": name, "proto": "tcp", "src": f"172.30.{self.i}.2", "sport": 0,
                       "dst": address, "port": 80, "group": name}
                      for name, address in self.containers.items()]
            if all(self._probe(self.lan, probes, 1.0).values()):
                return
            time.sleep(0.3)
        raise LabError("the containers' httpd did not answer")

    # -- the truth ----------------------------------------------------------------------------
    def vantages(self) -> dict[str, tuple[str, list[str]]]:
        i = self.i
        return {
            "world": (self.world, [*WORLD4.values(), *WORLD6.values()]),
            "nbr": (self.nbr, [f"10.231.{i}.3", f"fd00:231:{i}::3"]),
            "lan": (self.lan, [f"172.30.{i}.2", f"fd00:232:{i}::2"]),
            "vm": (self.vm, [f"10.233.{i}.10"]),
        }

    def destinations(self) -> list[str]:
        i = self.i
        return [f"10.231.{i}.1", f"172.30.{i}.1", f"10.233.{i}.1", f"fd00:231:{i}::1",
                f"fd00:232:{i}::1"]

    def targets(self, setup: Setup) -> list[tuple[str, int, str | None]]:
        """(proto, port, service it is attributed to when no listener logs it) to probe on
        every address of the server."""
        found: list[tuple[str, int, str | None]] = [(s.proto, s.port, None) for s in self.spots]
        found.append(("tcp", 22, "sshd"))
        found += [("tcp", port, None) for port in NAT_PORTS]
        if setup.docker:
            found += [("tcp", 8085, "docker:web1"), ("tcp", 8086, "docker:web2")]
        return list(dict.fromkeys(found))

    def probes(self, setup: Setup) -> dict[str, list[dict[str, Any]]]:
        """Per vantage namespace: every probe (source, source port, destination, port)."""
        by_ns: dict[str, list[dict[str, Any]]] = {}
        counter = 0
        direct = [(address, name) for name, address in self.containers.items()] \
            if setup.docker else []
        for vantage, (ns, sources) in self.vantages().items():
            items = by_ns.setdefault(ns, [])
            for src in sources:
                six = ":" in src
                dsts = [d for d in self.destinations() if (":" in d) == six]
                for sport in SPORTS:
                    for proto, port, service in self.targets(setup):
                        for dst in dsts:
                            counter += 1
                            items.append({"id": f"p{counter}", "proto": proto, "src": src,
                                          "sport": sport, "dst": dst, "port": port,
                                          "vantage": vantage, "service": service,
                                          "group": f"{vantage}/{proto}/{port}/{six}"})
                    if not six:
                        for address, name in direct:
                            counter += 1
                            items.append({"id": f"p{counter}", "proto": "tcp", "src": src,
                                          "sport": sport, "dst": address, "port": 80,
                                          "vantage": vantage, "service": f"docker:{name}",
                                          "group": f"{vantage}/direct/{name}"})
        return by_ns

    def _probe(self, ns: str, probes: list[dict[str, Any]], timeout: float,
               gap: float = 0.0) -> dict[str, Any]:
        spec = {"timeout": timeout, "gap": gap,
                "probes": [{k: p[k] for k in ("id", "proto", "src", "sport", "dst", "port",
                                              "group")} for p in probes]}
        if ns == self.lab.srv_ns:
            raise LabError("probes never start in the server")
        result = run(self.ns.exec_argv(ns, ["python3", "-I", "-c", PROBE_PROGRAM]),
                     input=json.dumps(spec), timeout=600)
        found: dict[str, Any] = json.loads(result.stdout)
        return found

    def _paced(self, probes: list[dict[str, Any]], results: dict[str, Any]) -> None:
        """One at a time after idle, from the world at large (the limits are shared: one
        vantage is enough), for each TCP port that no probe reached yet."""
        reached = {(p["proto"], p["port"], ":" in p["dst"]) for p in probes if results.get(p["id"])}
        paced = [p for p in probes if p["proto"] == "tcp" and p["sport"] == 0
                 and p["src"] in (WORLD4["world"], WORLD6["world"])
                 and (p["proto"], p["port"], ":" in p["dst"]) not in reached]
        time.sleep(1.0)      # idle: every rate limit's bucket is full again
        for key, value in self._probe(self.world, paced, 1.0, gap=PACE).items():
            results[key] = results.get(key) or value

    def _events(self, proc: Any) -> list[list[Any]]:
        proc.stdin.write(b"dump\n")
        proc.stdin.flush()
        events: list[list[Any]] = json.loads(proc.stdout.readline())
        return events

    def truth(self, setup: Setup) -> dict[str, set[str]]:
        """service -> the vantage points that reached it, with real packets."""
        self._events(self.listeners)
        self._events(self.vm_listener)
        by_ns = self.probes(setup)
        who = {a: v for v, (_, addresses) in self.vantages().items() for a in addresses}
        results: dict[str, Any] = {}
        with concurrent.futures.ThreadPoolExecutor(len(by_ns)) as pool:
            jobs = [pool.submit(self._probe, ns, probes, 1.0) for ns, probes in by_ns.items()]
            for job in jobs:
                results.update(job.result())
        reached: dict[str, set[str]] = {s.name: set() for s in [*self.spots, self.vm_spot]}
        reached["sshd4"], reached["sshd6"] = set(), set()
        if setup.docker:
            reached.update({f"docker:{n}": set() for n in self.containers})
        attributed = [p for probes in by_ns.values() for p in probes if p["service"]]
        if setup.paced:
            self._paced(by_ns[self.world], results)
        for p in attributed:
            if results.get(p["id"]):
                name = p["service"]
                if name == "sshd":
                    name = "sshd6" if ":" in p["dst"] else "sshd4"
                reached.setdefault(name, set()).add(p["vantage"])
        for proc in (self.listeners, self.vm_listener):
            for name, peer, _ in self._events(proc):
                peer = peer.removeprefix("::ffff:")
                if peer in who:
                    reached[name].add(who[peer])
        return reached

    # -- the audit ----------------------------------------------------------------------------
    def audit(self) -> tuple[float, int, dict[str, Any], str]:
        started = time.monotonic()
        result = self.lab.srv_exec(["env", *(f"{k}={v}" for k, v in self.env.items()),
                                    *self.fwsafe, "audit", "--json", "--config",
                                    str(self.config)], check=False, timeout=300)
        elapsed = time.monotonic() - started
        try:
            data: dict[str, Any] = json.loads(result.stdout)
        except ValueError as exc:
            raise LabError(f"fwsafe audit said no JSON (exit {result.returncode}): "
                           f"{result.stderr[-2000:]}") from exc
        return elapsed, result.returncode, data, result.stderr

    def verdicts(self, data: dict[str, Any], world: bool = False) -> dict[str, str]:
        """service -> the audit's verdict: exposed, uncertain, not exposed; with `world`, about
        the world alone."""
        found: dict[str, str] = {}

        def word(item: dict[str, Any]) -> str:
            exposed = item.get("exposed")
            if world and exposed:
                exposed = item.get("world", any(str(n).startswith("world")
                                               for n in item.get("reachable_from", [])))
                if exposed is False and item.get("world_uncertain"):
                    exposed = None
            return {True: "exposed", None: "uncertain", False: "not exposed"}[exposed]

        for item in data.get("listeners", []):
            for s in self.spots:
                if (item["proto"], item["address"], item["port"]) == (s.proto, s.address,
                                                                      s.port):
                    found[s.name] = word(item)
            if item["proto"] == "tcp" and item["port"] == 22 and item.get("process") == "sshd":
                found["sshd6" if ":" in item["address"] else "sshd4"] = word(item)
        for item in data.get("forwards", []):
            if (item["proto"], item["address"], item["port"]) == ("tcp", self.vm_spot.address,
                                                                  80):
                found[self.vm_spot.name] = word(item)
            for name, address in self.containers.items():
                if (item["proto"], item["address"], item["port"]) == ("tcp", address, 80):
                    found[f"docker:{name}"] = word(item)
        return found

    def run(self, setup: Setup) -> Outcome:
        """Load the set-up, send the truth's probes and run the audit side by side."""
        self.load(setup)
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                audit = pool.submit(self.audit)
                truth = self.truth(setup)
                elapsed, code, data, _ = audit.result()
        finally:
            self.unload(setup)
        outcome = Outcome(setup.name, truth, self.verdicts(data), self.verdicts(data, True),
                          elapsed, code, data)
        return outcome


@contextlib.contextmanager
def truth_lab(fwsafe: Sequence[str], env: dict[str, str] | None = None, *,
              prefix: str | None = None, index: int = 77) -> Iterator[AuditTruthLab]:
    """The lab, built once; everything removed again at the end (also after errors)."""
    lab = create_lab(prefix or f"fwat{os.getpid()}"[:14], index, private_ufw=True)
    truth: AuditTruthLab | None = None
    try:
        lab.start_sshd(env={"FWSAFE_STATE_DIR": str(lab.workdir / "state")})
        truth = AuditTruthLab(lab, fwsafe, env)
        truth.build()
        yield truth
    finally:
        errors = []
        if truth is not None:
            try:
                truth.close()
            except LabError as exc:
                errors.append(str(exc))
        try:
            lab.close()
        except LabError as exc:
            errors.append(str(exc))
        if errors:
            raise LabError("; ".join(errors))


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fwsafe", default=f"{sys.executable} -m fwsafe",
                        help="the command that runs fwsafe (split on spaces)")
    parser.add_argument("--pythonpath", help="PYTHONPATH for it (another copy of fwsafe)")
    parser.add_argument("--only", action="append", help="run only these set-ups")
    parser.add_argument("--json-out", help="write every outcome there")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    env = {"PYTHONPATH": args.pythonpath} if args.pythonpath else {}
    outcomes: list[Outcome] = []
    with truth_lab(args.fwsafe.split(), env) as lab:
        env["FWSAFE_STATE_DIR"] = str(lab.lab.workdir / "state")
        lab.env = env
        for setup in setups(lab.i):
            if args.only and setup.name not in args.only:
                continue
            outcome = lab.run(setup)
            outcomes.append(outcome)
            _log(outcome.detail() if args.verbose or outcome.missed or outcome.false_alarms
                else f"set-up {setup.name}: {outcome.audit_s:.2f} s")
    print("Anyone outside (the world, the LAN, the neighbours, the VM):")
    print(confusion_table(outcomes))
    print("\nThe world alone:")
    print(confusion_table(outcomes, world=True))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            [{"setup": o.setup, "audit_s": o.audit_s, "exit_code": o.exit_code,
              "truth": {k: sorted(v) for k, v in o.truth.items()}, "verdict": o.verdict,
              "world": o.world}
             for o in outcomes], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
