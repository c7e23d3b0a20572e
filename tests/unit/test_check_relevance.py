"""Which rules the sandbox cannot reproduce could still decide a packet's fate
(fwsafe.check.relevance): what ufw's stock rules are, and what they are not."""

from __future__ import annotations

import pytest

from fwsafe.backends.iptsave import parse_ruleset
from fwsafe.check.nft_listing import NftRule
from fwsafe.check.relevance import ipt_verdict_free, nft_verdict_free

UFW_LIKE = """\
*filter
:INPUT DROP [0:0]
:ufw-logging-deny - [0:0]
:ufw-not-local - [0:0]
:ufw-after-logging-input - [0:0]
:ufw-limit - [0:0]
:ufw-loop - [0:0]
:ufw-mark - [0:0]
-A INPUT -j ufw-not-local
-A INPUT -m limit --limit 3/min -j RETURN
-A INPUT -j ufw-after-logging-input
-A ufw-after-logging-input -m limit --limit 3/min --limit-burst 10 -j LOG --log-prefix "[UFW BLOCK] "
-A ufw-logging-deny -m conntrack --ctstate INVALID -m limit --limit 3/min --limit-burst 10 -j RETURN
-A ufw-logging-deny -m limit --limit 3/min --limit-burst 10 -j LOG --log-prefix "[UFW BLOCK] "
-A ufw-not-local -m limit --limit 3/min --limit-burst 10 -j ufw-logging-deny
-A ufw-not-local -m limit --limit 3/min -g ufw-logging-deny
-A ufw-not-local -j DROP
-A ufw-limit -m limit --limit 3/min -j LOG
-A ufw-limit -m limit --limit 3/min -j RETURN
-A ufw-limit -j REJECT
-A ufw-loop -m limit --limit 3/min -j ufw-loop
-A ufw-mark -m limit --limit 3/min -j MARK --set-mark 1
COMMIT
"""


@pytest.mark.parametrize("chain,index,free", [
    ("ufw-after-logging-input", 1, True),   # LOG: reports only
    ("ufw-logging-deny", 1, True),          # RETURN with only a LOG after it
    ("ufw-logging-deny", 2, True),
    ("ufw-not-local", 1, True),             # a jump into a chain that decides nothing
    ("ufw-not-local", 2, False),            # a goto skips the DROP after it
    ("ufw-not-local", 3, False),            # DROP
    ("INPUT", 2, False),                    # RETURN from a built-in chain: the policy
    ("ufw-limit", 2, False),                # RETURN skips a REJECT
    ("ufw-limit", 1, True),
    ("ufw-loop", 1, False),                 # a chain that jumps to itself: not taken as free
    ("ufw-mark", 1, False),                 # a mark changes what later rules see
])
def test_ipt_verdict_free(chain: str, index: int, free: bool) -> None:
    tables = parse_ruleset(UFW_LIKE)
    assert ipt_verdict_free(tables["filter"].chains, chain, index) is free


@pytest.mark.parametrize("text,free", [
    ('limit rate 3/minute burst 10 packets log prefix "[UFW BLOCK] "', True),
    ('limit rate 3/minute counter comment "accept drop"', True),
    ('log prefix "drop me: "', True),
    ("tcp dport 22 limit rate 3/minute accept", False),
    ("limit rate 3/minute jump logging", False),
    ("meta mark 0x1 limit rate 3/minute meta mark set 0x2", False),
    ("limit rate over 10/second drop", False),
])
def test_nft_verdict_free(text: str, free: bool) -> None:
    assert nft_verdict_free(NftRule(1, text)) is free
