"""Which line of an nftables file made a rule: the file scanned for its rule statements, and
the handles ``nft --echo --handle`` gives mapped back to those lines. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fwsafe.check.nft_listing import ChainKey

# --------------------------------------------------------------------------------------------
# nftables files: rule statements and their lines
# --------------------------------------------------------------------------------------------
NFT_FAMILIES = frozenset({"ip", "ip6", "inet", "arp", "bridge", "netdev"})
_CHAIN_PROPERTIES = frozenset({"type", "policy", "comment", "devices", "priority", "hook"})


@dataclass(frozen=True)
class NftFileRule:
    chain: ChainKey
    line: int
    text: str


@dataclass
class NftFileInfo:
    rules: list[NftFileRule] = field(default_factory=list)
    policies: dict[ChainKey, int] = field(default_factory=dict)
    #: the file includes others, replaces or deletes rules: positions are not reliable
    uncertain: bool = False


@dataclass
class _Tok:
    kind: str  # "word", "str", "nl", ";", "{", "}"
    text: str
    line: int


_BLANKS = re.compile(r"[ \t\r\n]*")
_WORD = re.compile(r"[^ \t\r\n;{}#\"]+")


def _nft_tokens(text: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] == "\n":
            i += 2
            line += 1
        elif c == "\n":
            # One token for a run of newlines and blanks: the lines a pruned file blanked out
            # (tens of thousands) end no more statements than one newline does.
            tokens.append(_Tok("nl", "\n", line))
            blanks = _BLANKS.match(text, i + 1)
            end = blanks.end() if blanks else i + 1
            line += 1 + text.count("\n", i + 1, end)
            i = end
        elif c in " \t\r":
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in ";{}":
            tokens.append(_Tok(c, c, line))
            i += 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"' and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            tokens.append(_Tok("str", text[i:j + 1], line))
            i = j + 1
        else:
            word = _WORD.match(text, i)
            j = word.end() if word else i + 1
            tokens.append(_Tok("word", text[i:j], line))
            i = j
    return tokens


def _table_name(words: list[str]) -> tuple[str, str] | None:
    """(family, name) of ``table [family] name`` (the family defaults to ip)."""
    if len(words) >= 2 and words[0] in NFT_FAMILIES:
        return words[0], words[1]
    if len(words) == 1:
        return "ip", words[0]
    return None


class _NftScanner:
    def __init__(self, text: str) -> None:
        self.tokens = _nft_tokens(text)
        self.pos = 0
        self.info = NftFileInfo()

    def peek(self) -> _Tok | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def skip_block(self) -> None:
        """After a '{': skip to its matching '}'."""
        depth = 1
        while self.pos < len(self.tokens) and depth:
            kind = self.tokens[self.pos].kind
            depth += 1 if kind == "{" else -1 if kind == "}" else 0
            self.pos += 1

    def statement(self, chain_level: bool) -> tuple[list[_Tok], str]:
        """Tokens up to the end of a statement; in a chain, braces belong to the rule.

        Returns the tokens and what ended it: "nl", ";", "{" (a block opens), "}" or "eof".
        """
        toks: list[_Tok] = []
        depth = 0
        while self.pos < len(self.tokens):
            tok = self.tokens[self.pos]
            if tok.kind == "{":
                if not chain_level or not toks:
                    self.pos += 1
                    return toks, "{"
                depth += 1
            elif tok.kind == "}":
                if depth == 0:
                    return toks, "}"
                depth -= 1
            elif tok.kind in ("nl", ";") and depth == 0:
                self.pos += 1
                return toks, tok.kind
            if tok.kind != "nl":
                toks.append(tok)
            self.pos += 1
        return toks, "eof"

    def block(self, level: str, context: tuple[str, ...]) -> None:
        """Read statements until the closing '}' (or the end, at top level)."""
        while self.pos < len(self.tokens):
            tok = self.peek()
            if tok is not None and tok.kind == "}":
                self.pos += 1
                return
            toks, end = self.statement(chain_level=(level == "chain"))
            words = [t.text for t in toks]
            if end == "{":
                self.open_block(level, context, words)
                continue
            if not toks:
                continue
            if level == "chain":
                self.chain_statement(context, toks, words)
            elif level == "top":
                self.top_statement(toks, words)

    def open_block(self, level: str, context: tuple[str, ...], words: list[str]) -> None:
        if level == "top":
            if words[:1] in (["add"], ["create"]):
                words = words[1:]
            if words[:1] == ["table"] and (name := _table_name(words[1:])):
                self.block("table", name)
                return
            if words[:1] == ["chain"] and len(words) >= 3:
                fam, rest = (words[1], words[2:]) if words[1] in NFT_FAMILIES else ("ip", words[1:])
                if len(rest) >= 2:
                    self.block("chain", (fam, rest[0], rest[1]))
                    return
        elif level == "table" and words[:1] == ["chain"] and len(words) >= 2:
            self.block("chain", (context[0], context[1], words[1]))
            return
        self.skip_block()

    def chain_statement(self, context: tuple[str, ...], toks: list[_Tok], words: list[str]) -> None:
        key: ChainKey = (context[0], context[1], context[2])
        if words[0] in _CHAIN_PROPERTIES:
            if words[0] == "policy":
                self.info.policies[key] = toks[0].line
            return
        self.info.rules.append(NftFileRule(key, toks[0].line, " ".join(words)))

    def top_statement(self, toks: list[_Tok], words: list[str]) -> None:
        if words[0] == "include":
            self.info.uncertain = True
            return
        if len(words) >= 2 and words[1] == "rule":
            if words[0] in ("replace", "delete", "destroy"):
                self.info.uncertain = True
                return
            if words[0] not in ("add", "insert"):
                return
            rest = words[2:]
            if rest and rest[0] in NFT_FAMILIES:
                fam, rest = rest[0], rest[1:]
            else:
                fam = "ip"
            if len(rest) >= 3:
                self.info.rules.append(NftFileRule((fam, rest[0], rest[1]), toks[0].line,
                                                   " ".join(rest[2:])))


def scan_nft_file(text: str) -> NftFileInfo:
    """The rule statements of an nftables file, in order, with their chain and line."""
    scanner = _NftScanner(text)
    scanner.block("top", ())
    return scanner.info


_ECHO_RULE = re.compile(
    r"^(?:add|insert) rule (\S+) (\S+) (\S+) (?:(?:handle|position|index) \d+ )?(.*?)"
    r"\s*# handle (\d+)\s*$")


@dataclass(frozen=True)
class EchoedRule:
    chain: ChainKey
    handle: int
    text: str


def parse_nft_echo(text: str) -> list[EchoedRule]:
    """The rules ``nft --echo --handle -f FILE`` reports as added, in order."""
    found = []
    for line in text.splitlines():
        m = _ECHO_RULE.match(line.strip())
        if m:
            found.append(EchoedRule((m.group(1), m.group(2), m.group(3)), int(m.group(5)),
                                    m.group(4)))
    return found


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("{ ", "{").replace(" }", "}")).strip()


def map_nft_handles(info: NftFileInfo, echoed: list[EchoedRule]) -> dict[tuple[ChainKey, int], int]:
    """{(chain, handle): file line} for the rules the file added.

    The k-th rule statement of the file is the k-th rule nft echoes; where the two lists do
    not line up (includes, rules replaced), rules are matched by their text within the chain.
    """
    mapping: dict[tuple[ChainKey, int], int] = {}
    if not info.uncertain and [r.chain for r in info.rules] == [e.chain for e in echoed]:
        for rule, echo in zip(info.rules, echoed):
            mapping[(echo.chain, echo.handle)] = rule.line
        return mapping
    for echo in echoed:
        want = _squash(echo.text)
        for rule in info.rules:
            if rule.chain == echo.chain and _squash(rule.text) == want:
                mapping[(echo.chain, echo.handle)] = rule.line
                break
    return mapping
