"""Rulesets of the shapes real hosts have, at a given size, in iptables-save syntax (issue 27).

Each shape is a pair of variants: A (live before the change) and B (the change), the same
shape and size with other addresses, so that a restore of either replaces every rule. Every
variant keeps the lab usable: established connections and SSH (port 22) accepted in INPUT.
``n`` is the number of ``-A`` rules, approximately (exactly for the bench's own shape).

* ``bench``: the bench's own (bench/rules.py): ``-s ADDR -p tcp --dport 22 -j ACCEPT``;
* ``blocklist``: SSH accepted first, then ``-s ADDR -p tcp --dport P -j DROP|REJECT`` with
  sources and ports varying (nearly every rule its own port: abuse lists);
* ``kube``: kube-proxy (iptables mode): nat ``KUBE-SERVICES`` -> ``KUBE-SVC-*`` (one
  ``statistic --probability`` rule per endpoint) -> ``KUBE-SEP-*`` (``KUBE-MARK-MASQ`` and a
  DNAT), three endpoints per service, a few NodePorts, and kube-proxy's filter chains;
* ``ufw``: ufw's own chains (ufw-before-*, ufw-user-input, ...) with thousands of user rules
  (``ufw allow from ADDR to any port P proto tcp``) in ``ufw-user-input``;
* ``docker``: Docker with hundreds of user networks: FORWARD -> DOCKER-USER,
  DOCKER-ISOLATION-STAGE-1/2, DOCKER; nat DOCKER with published ports (DNAT) and MASQUERADE
  per network.
* ``nft-blocklist``: the blocklist as one native nft table (replaced atomically);
* ``nft-set``: an nft set of ``n`` elements used by one rule; B is A with ONE element
  changed (issue 27: a set changed by one element costs no more than loading it once).
"""

from __future__ import annotations

from collections.abc import Callable

SHAPES = ("bench", "blocklist", "kube", "ufw", "docker", "nft-blocklist", "nft-set")
NFT_TABLE = "inet fwshape"

_HEAD = [":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
_KEEP_SSH = ["-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
             "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"]


def _addr(i: int, variant: int, first: int = 10, second: int = 100) -> str:
    """The i-th address of a variant: FIRST.(SECOND+variant).x.y for the first 62,500, then
    SECOND+2+variant, ...: every one distinct, the variants' apart (200k rules and more)."""
    block, i = divmod(i, 62500)
    return f"{first}.{second + variant + 2 * block}.{i // 250}.{i % 250 + 1}"


def _port(i: int) -> str:
    """The i-th rule's port: nearly every rule its own (1..65535), as in abuse lists."""
    return str(1 + i * 7919 % 65535)


def bench(n: int, variant: int) -> str:
    from bench.rules import iptables_rules
    return iptables_rules(n, variant)


def blocklist(n: int, variant: int) -> str:
    lines = ["*filter", *_HEAD, *_KEEP_SSH]
    for i in range(n):
        target = "DROP" if i % 3 else "REJECT --reject-with icmp-port-unreachable"
        lines.append(f"-A INPUT -s {_addr(i, variant)}/32 -p tcp -m tcp "
                     f"--dport {_port(i)} -j {target}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _kube_id(kind: str, i: int, variant: int) -> str:
    return f"KUBE-{kind}-{variant:X}{i:015X}"


def kube(n: int, variant: int) -> str:
    """About n rules: 8 per service (1 in KUBE-SERVICES, 3 in KUBE-SVC, 2 in each of 3 SEPs
    = 10), so n // 10 services; one NodePort per 50 services."""
    services = max(1, n // 10)
    chains: list[str] = [":KUBE-SERVICES - [0:0]", ":KUBE-NODEPORTS - [0:0]",
                         ":KUBE-POSTROUTING - [0:0]", ":KUBE-MARK-MASQ - [0:0]"]
    rules = ["-A PREROUTING -m comment --comment \"kubernetes service portals\" "
             "-j KUBE-SERVICES",
             "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
             "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" "
             "-j KUBE-POSTROUTING",
             "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
             "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
             "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
             "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring "
             "SNAT\" -j MASQUERADE --random-fully"]
    svc_rules: list[str] = []
    node_rules: list[str] = []
    for s in range(services):
        svc = _kube_id("SVC", s, variant)
        cluster_ip = _addr(s, variant, 10, 96)
        port = 80 + s % 5
        name = f"ns{s % 40}/svc{s}:http"
        chains.append(f":{svc} - [0:0]")
        svc_rules.append(f"-A KUBE-SERVICES -d {cluster_ip}/32 -p tcp -m comment --comment "
                         f"\"{name} cluster IP\" -m tcp --dport {port} -j {svc}")
        if s % 50 == 0:
            node_rules.append(f"-A KUBE-NODEPORTS -p tcp -m comment --comment \"{name}\" -m tcp "
                              f"--dport {30000 + s // 50 % 2700} -j {svc}")
        for e in range(3):
            sep = _kube_id("SEP", 3 * s + e, variant)
            pod = _addr(3 * s + e, variant, 10, 200)
            chains.append(f":{sep} - [0:0]")
            if e < 2:
                prob = "0.33333333349" if e == 0 else "0.50000000000"
                rules.append(f"-A {svc} -m comment --comment \"{name} -> {pod}:8080\" "
                             f"-m statistic --mode random --probability {prob} -j {sep}")
            else:
                rules.append(f"-A {svc} -m comment --comment \"{name} -> {pod}:8080\" -j {sep}")
            rules.append(f"-A {sep} -s {pod}/32 -m comment --comment \"{name}\" "
                         "-j KUBE-MARK-MASQ")
            rules.append(f"-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp "
                         f"-j DNAT --to-destination {pod}:8080")
    svc_rules.append("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; "
                     "NOTE: this must be the last rule in this chain\" -m addrtype "
                     "--dst-type LOCAL -j KUBE-NODEPORTS")
    nat = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
           ":POSTROUTING ACCEPT [0:0]", *chains, *rules, *svc_rules, *node_rules, "COMMIT"]
    filt = ["*filter", *_HEAD, ":KUBE-FIREWALL - [0:0]", ":KUBE-FORWARD - [0:0]",
            ":KUBE-SERVICES - [0:0]", *_KEEP_SSH,
            "-A INPUT -j KUBE-FIREWALL",
            "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes "
            "externally-visible service portals\" -j KUBE-SERVICES",
            "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
            "-A OUTPUT -j KUBE-FIREWALL",
            "-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block "
            "incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT "
            "-j DROP",
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
            "-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT",
            "-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "COMMIT"]
    return "\n".join(filt + nat) + "\n"


_UFW_CHAINS = ("ufw-after-forward", "ufw-after-input", "ufw-after-logging-forward",
               "ufw-after-logging-input", "ufw-after-logging-output", "ufw-after-output",
               "ufw-before-forward", "ufw-before-input", "ufw-before-logging-forward",
               "ufw-before-logging-input", "ufw-before-logging-output", "ufw-before-output",
               "ufw-reject-forward", "ufw-reject-input", "ufw-reject-output",
               "ufw-track-forward", "ufw-track-input", "ufw-track-output",
               "ufw-user-forward", "ufw-user-input", "ufw-user-output",
               "ufw-user-logging-forward", "ufw-user-logging-input", "ufw-user-logging-output",
               "ufw-user-limit", "ufw-user-limit-accept", "ufw-logging-allow",
               "ufw-logging-deny", "ufw-skip-to-policy-input", "ufw-skip-to-policy-output",
               "ufw-skip-to-policy-forward", "ufw-not-local")


def ufw(n: int, variant: int) -> str:
    """ufw enabled (default deny incoming), its chains as `ufw enable` loads them, with n user
    rules ``ufw allow from ADDR to any port P proto tcp`` (and SSH allowed first)."""
    lines = ["*filter", ":INPUT DROP [0:0]", ":FORWARD DROP [0:0]", ":OUTPUT ACCEPT [0:0]",
             *(f":{c} - [0:0]" for c in _UFW_CHAINS)]
    for hook, low in (("INPUT", "input"), ("FORWARD", "forward"), ("OUTPUT", "output")):
        lines += [f"-A {hook} -j ufw-before-logging-{low}", f"-A {hook} -j ufw-before-{low}",
                  f"-A {hook} -j ufw-after-{low}", f"-A {hook} -j ufw-after-logging-{low}",
                  f"-A {hook} -j ufw-reject-{low}", f"-A {hook} -j ufw-track-{low}"]
    lines += [
        "-A ufw-after-input -p udp -m udp --dport 137 -j ufw-skip-to-policy-input",
        "-A ufw-after-input -p udp -m udp --dport 138 -j ufw-skip-to-policy-input",
        "-A ufw-after-input -p tcp -m tcp --dport 139 -j ufw-skip-to-policy-input",
        "-A ufw-after-input -p tcp -m tcp --dport 445 -j ufw-skip-to-policy-input",
        "-A ufw-after-input -m addrtype --dst-type BROADCAST -j ufw-skip-to-policy-input",
        "-A ufw-after-logging-input -m limit --limit 3/min --limit-burst 10 -j LOG "
        "--log-prefix \"[UFW BLOCK] \"",
        "-A ufw-before-input -i lo -j ACCEPT",
        "-A ufw-before-input -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A ufw-before-input -m conntrack --ctstate INVALID -j ufw-logging-deny",
        "-A ufw-before-input -m conntrack --ctstate INVALID -j DROP",
        "-A ufw-before-input -p icmp -m icmp --icmp-type 3 -j ACCEPT",
        "-A ufw-before-input -p icmp -m icmp --icmp-type 8 -j ACCEPT",
        "-A ufw-before-input -p udp -m udp --sport 67 --dport 68 -j ACCEPT",
        "-A ufw-before-input -j ufw-not-local",
        "-A ufw-before-input -d 224.0.0.251/32 -p udp -m udp --dport 5353 -j ACCEPT",
        "-A ufw-before-input -j ufw-user-input",
        "-A ufw-before-output -o lo -j ACCEPT",
        "-A ufw-before-output -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A ufw-before-output -j ufw-user-output",
        "-A ufw-before-forward -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-A ufw-before-forward -j ufw-user-forward",
        "-A ufw-logging-deny -m conntrack --ctstate INVALID -m limit --limit 3/min "
        "--limit-burst 10 -j RETURN",
        "-A ufw-logging-deny -m limit --limit 3/min --limit-burst 10 -j LOG "
        "--log-prefix \"[UFW BLOCK] \"",
        "-A ufw-not-local -m addrtype --dst-type LOCAL -j RETURN",
        "-A ufw-not-local -m addrtype --dst-type MULTICAST -j RETURN",
        "-A ufw-not-local -m addrtype --dst-type BROADCAST -j RETURN",
        "-A ufw-not-local -m limit --limit 3/min --limit-burst 10 -j ufw-logging-deny",
        "-A ufw-not-local -j DROP",
        "-A ufw-skip-to-policy-forward -j DROP",
        "-A ufw-skip-to-policy-input -j DROP",
        "-A ufw-skip-to-policy-output -j ACCEPT",
        "-A ufw-track-output -p tcp -m conntrack --ctstate NEW -j ACCEPT",
        "-A ufw-track-output -p udp -m conntrack --ctstate NEW -j ACCEPT",
        "-A ufw-user-input -p tcp -m tcp --dport 22 -j ACCEPT",
    ]
    for i in range(max(0, n - 60)):
        lines.append(f"-A ufw-user-input -s {_addr(i, variant)}/32 -p tcp -m tcp "
                     f"--dport {1024 + i % 5000} -j ACCEPT")
    lines += ["-A ufw-user-limit -m limit --limit 3/min -j LOG --log-prefix "
              "\"[UFW LIMIT BLOCK] \"",
              "-A ufw-user-limit -j REJECT --reject-with icmp-port-unreachable",
              "-A ufw-user-limit-accept -j ACCEPT", "COMMIT"]
    return "\n".join(lines) + "\n"


def docker(n: int, variant: int) -> str:
    """Docker with user networks (a bridge br-* per /24 network in 172.(18+v).x.0/24) and
    published ports: per network 2 isolation rules, 4 forward rules, 1 MASQUERADE, and per
    container 1 DNAT + 1 ACCEPT (+1 MASQUERADE hairpin): about 10 rules per network with one
    container, so n // 10 networks. The networks' addresses repeat after 2,500 networks (and the
    variants' overlap): the bridges' names, which the rules match on, never do."""
    nets = max(1, n // 10)
    filt = ["*filter", *_HEAD, ":DOCKER - [0:0]", ":DOCKER-ISOLATION-STAGE-1 - [0:0]",
            ":DOCKER-ISOLATION-STAGE-2 - [0:0]", ":DOCKER-USER - [0:0]", *_KEEP_SSH,
            "-A FORWARD -j DOCKER-USER", "-A FORWARD -j DOCKER-ISOLATION-STAGE-1"]
    iso1: list[str] = []
    iso2: list[str] = []
    dock: list[str] = []
    nat = ["*nat", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
           ":POSTROUTING ACCEPT [0:0]", ":DOCKER - [0:0]",
           "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
           "-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER"]
    natdock: list[str] = []
    for k in range(nets):
        br = f"br-{variant:x}{k:011x}"
        net = f"172.{18 + variant + k // 250 % 10}.{k % 250}"
        ctr = f"{net}.2"
        port = 10000 + k % 50000
        filt += [f"-A FORWARD -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                 f"-A FORWARD -o {br} -j DOCKER",
                 f"-A FORWARD -i {br} ! -o {br} -j ACCEPT",
                 f"-A FORWARD -i {br} -o {br} -j ACCEPT"]
        iso1.append(f"-A DOCKER-ISOLATION-STAGE-1 -i {br} ! -o {br} -j DOCKER-ISOLATION-STAGE-2")
        iso2.append(f"-A DOCKER-ISOLATION-STAGE-2 -o {br} -j DROP")
        dock.append(f"-A DOCKER -d {ctr}/32 ! -i {br} -o {br} -p tcp -m tcp --dport 80 "
                    "-j ACCEPT")
        nat.append(f"-A POSTROUTING -s {net}.0/24 ! -o {br} -j MASQUERADE")
        nat.append(f"-A POSTROUTING -s {ctr}/32 -d {ctr}/32 -p tcp -m tcp --dport 80 "
                   "-j MASQUERADE")
        natdock.append(f"-A DOCKER -i {br} -j RETURN")
        natdock.append(f"-A DOCKER ! -i {br} -p tcp -m tcp --dport {port} "
                       f"-j DNAT --to-destination {ctr}:80")
    filt += [*dock, *iso1, "-A DOCKER-ISOLATION-STAGE-1 -j RETURN", *iso2,
             "-A DOCKER-ISOLATION-STAGE-2 -j RETURN", "-A DOCKER-USER -j RETURN", "COMMIT"]
    return "\n".join(filt + nat + natdock + ["COMMIT"]) + "\n"


def _nft_table(body: list[str]) -> str:
    return "\n".join([f"table {NFT_TABLE}", f"delete table {NFT_TABLE}", f"table {NFT_TABLE} {{",
                      *body, "}"]) + "\n"


def _nft_input(rules: list[str]) -> list[str]:
    return ["\tchain input {", "\t\ttype filter hook input priority 0; policy accept;",
            "\t\tct state established,related accept", "\t\ttcp dport 22 accept",
            *(f"\t\t{r}" for r in rules), "\t}"]


def nft_blocklist(n: int, variant: int) -> str:
    return _nft_table(_nft_input([
        f"ip saddr {_addr(i, variant)} tcp dport {_port(i)} "
        + ("drop" if i % 3 else "reject") for i in range(n)]))


def nft_set(n: int, variant: int) -> str:
    """One rule using a set of n addresses (up to 250^3); B (variant 1) changes one element."""
    def element(i: int) -> str:
        return f"10.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"
    elements = [element(i) for i in range(n)]
    if variant:
        elements[0] = "10.99.0.1"
    lines = ["\tset blocked {", "\t\ttype ipv4_addr", "\t\telements = {"]
    lines += [f"\t\t\t{', '.join(elements[i:i + 8])}," for i in range(0, n, 8)]
    lines += ["\t\t}", "\t}"]
    return _nft_table(lines + _nft_input(["ip saddr @blocked drop"]))


GENERATORS: dict[str, Callable[[int, int], str]] = {
    "bench": bench, "blocklist": blocklist, "kube": kube, "ufw": ufw, "docker": docker,
    "nft-blocklist": nft_blocklist, "nft-set": nft_set}


def backend(shape: str) -> str:
    return "nft" if shape.startswith("nft-") else "iptables"


def iptables_shape(shape: str, n: int, variant: int) -> str:
    """The shape's file (iptables-save, or nft for the nft- shapes)."""
    return GENERATORS[shape](n, variant)
