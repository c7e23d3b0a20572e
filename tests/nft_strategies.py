"""nft sets and maps for the merge's property tests: a story of labels (tests.merge_strategies)
turned into set elements, listed the way `nft -s list` prints them (wrapped, two a line)."""

from __future__ import annotations

from hypothesis import strategies as st

from tests.merge_strategies import Story, stories

_BASE = {"b": 1, "c": 2, "o": 3}


def element(label: str, kind: str) -> str:
    """b3 -> 10.0.1.3 (a set), `10.0.1.3 timeout 1h` (a timeout set), `10.0.1.3 : drop`."""
    address = f"10.0.{_BASE[label[0]]}.{int(label[1:]) + 1}"
    if kind == "map":
        return f"{address} : {'drop' if int(label[1:]) % 2 else 'accept'}"
    if kind == "timeout" and int(label[1:]) % 2:
        return f"{address} timeout 1h"
    return address


def set_block(name: str, kind: str, labels: list[str]) -> str:
    head = {"set": ["\t\ttype ipv4_addr", "\t\tflags interval"],
            "timeout": ["\t\ttype ipv4_addr", "\t\tflags timeout"],
            "map": ["\t\ttype ipv4_addr : verdict"]}[kind]
    elements = [element(label, kind) for label in labels]
    lines = [f"\t{'map' if kind == 'map' else 'set'} {name} {{", *head]
    if elements:
        pairs = [", ".join(elements[i:i + 2]) for i in range(0, len(elements), 2)]
        text = ",\n\t\t\t     ".join(pairs)
        lines.append(f"\t\telements = {{ {text} }}")
    return "\n".join([*lines, "\t}"])


def table(kind: str, labels: list[str]) -> str:
    rule = ("ip saddr vmap @s" if kind == "map" else "ip saddr @s drop")
    return "\n".join(["table inet prop {", set_block("s", kind, labels), "\tchain input {",
                      "\t\ttype filter hook input priority filter; policy accept;",
                      f"\t\t{rule}", "\t}", "}"])


KINDS = st.sampled_from(["set", "timeout", "map"])


@st.composite
def set_stories(draw: st.DrawFn) -> tuple[str, Story]:
    """(kind of set, story of its elements)."""
    return draw(KINDS), draw(stories())
