"""Which rules the sandbox cannot reproduce could still change a verdict.

A rule whose outcome the sandbox cannot reproduce (a rate limit, a hop-limit match, ...) only
matters for the management path when a packet of that path may meet it AND whether it matches
could change what happens to the packet. The first half is the kernel's (the counters and the
nft trace of each attempt, fwsafe.check.attempts); this module answers the second half from the
rules alone, conservatively: a rule is *verdict-free* when, matched or not, the packet ends the
same way:

* iptables: no target (a counter), or a target that only reports (LOG, NFLOG, ...); a RETURN
  from a user chain whose remaining rules are all verdict-free; a jump (-j, not -g) to a user
  chain whose rules are all verdict-free;
* nftables: a rule with no verdict statement (accept, drop, reject, queue, jump, goto, return)
  and no statement that changes the packet or what later rules see (set, mark, nat, ...).

Anything else (MARK, DNAT, a goto, a chain that loops) is taken as able to change the verdict.
Pure functions: nothing here runs a program.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from fwsafe.backends.iptsave import Chain
from fwsafe.check.nft_listing import NftRule

__all__ = ["REPORT_ONLY_TARGETS", "ipt_verdict_free", "nft_verdict_free"]

#: iptables targets that only report the packet: they never decide nor change it.
REPORT_ONLY_TARGETS = frozenset({"LOG", "NFLOG", "ULOG", "TRACE", "AUDIT"})

# nft statements that decide a packet's fate, or change it or what later rules see.
_NFT_EFFECT = re.compile(
    r"\b(accept|drop|reject|queue|jump|goto|return|set|dnat|snat|masquerade|redirect|"
    r"notrack|tproxy|dup|fwd|synproxy|flow|offload|add|update|delete)\b")
_NFT_COMMENT = re.compile(r'\bcomment\s+"(?:[^"\\]|\\.)*"')
_NFT_LOG_PREFIX = re.compile(r'\bprefix\s+"(?:[^"\\]|\\.)*"')


def ipt_verdict_free(chains: Mapping[str, Chain], chain: str, index: int) -> bool:
    """Whether rule ``index`` (1-based) of ``chains[chain]`` (one table) leaves every
    packet's fate as it was, matched or not."""
    return _ipt_free(chains, chain, index, frozenset())


def _ipt_free(chains: Mapping[str, Chain], chain: str, index: int,
              seen: frozenset[str]) -> bool:
    rules = chains[chain].each_rule()
    rule = rules[index - 1]
    if rule.goto is not None:
        return False
    target = rule.target
    if target is None or target in REPORT_ONLY_TARGETS:
        return True
    if target == "RETURN":
        # From a built-in chain, RETURN means the policy: a verdict.
        if chains[chain].policy != "-" or chain in seen:
            return False
        inside = seen | {chain}
        return all(_ipt_free(chains, chain, r.index, inside) for r in rules[index:])
    sub = chains.get(target)
    if sub is None or sub.policy != "-" or target in seen or target == chain:
        return False
    inside = seen | {chain}
    # In the chain entered, a RETURN ends that chain only: free when the rest of it is.
    return all(_ipt_free(chains, target, r.index, inside) for r in sub.each_rule())


def nft_verdict_free(rule: NftRule) -> bool:
    """Whether this nft rule leaves every packet's fate as it was, matched or not."""
    text = _NFT_LOG_PREFIX.sub("", _NFT_COMMENT.sub("", rule.text))
    return _NFT_EFFECT.search(text) is None
