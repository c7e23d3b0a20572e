"""Rulesets the lab tests share (iptables-save format)."""

# What every lab's server starts with (see the fwlab fixture).
BASELINE_V4 = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:LOGDROP - [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m multiport --dports 22,80 -m comment --comment "baseline ssh+web" -j ACCEPT
-A INPUT -p icmp -m limit --limit 5/sec -j ACCEPT
-A LOGDROP -j DROP
COMMIT
"""
BASELINE_V6 = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p ipv6-icmp -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
"""

# Everything dropped, established SSH connections included: the classic lockout.
DROP_ALL = """\
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
COMMIT
"""
# Established connections survive, NEW ones to 22 are dropped: the sneaky lockout.
DROP_NEW_SSH = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -m conntrack --ctstate NEW -j DROP
COMMIT
"""
# A harmless change: SSH and HTTPS in, FORWARD closed.
GOOD = """\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -p tcp -m tcp --dport 443 -j ACCEPT
COMMIT
"""


# Debian's /etc/nftables.conf plus one rule: what nftables.service loads at boot.
NFT_BASELINE = """\
#!/usr/sbin/nft -f

flush ruleset

table inet filter {
	chain input {
		type filter hook input priority filter; policy accept;
		ct state established,related accept
		tcp dport 22 accept
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
	}
	chain output {
		type filter hook output priority filter; policy accept;
	}
}
"""
# The change: NEW connections to 22 are dropped by a table of its own.
NFT_DROP_NEW_SSH = """\
table inet lockout {
	chain input {
		type filter hook input priority -10; policy accept;
		tcp dport 22 ct state new drop
	}
}
"""
