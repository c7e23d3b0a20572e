"""Issue 27, item 3: `apply --no-check` of a change that is one nft transaction (one nft file,
loaded by the guard with one `nft -f`) is validated by that transaction, not first by `nft -c`:
the kernel applies all of it or nothing. With the real kernel and nft: a file the kernel
refuses changes nothing and is reported (exit 3, the file and line named, the record
rejected); a good one is live; `nft -c` never runs (the -vv trace of every command)."""

from __future__ import annotations

import pytest

from tests.bins import FWSAFE
from tests.conftest import FwLab

pytestmark = pytest.mark.lab

GOOD = ("table inet fwt {\n\tchain c {\n\t\ttype filter hook input priority 0; policy accept;\n"
        "\t\tip saddr 10.9.9.9 drop\n\t}\n}\n")
# The kernel refuses it (a jump to a chain that does not exist), nft's parser does not.
REFUSED = GOOD.replace("ip saddr 10.9.9.9 drop", "ip saddr 10.9.9.9 drop\n\t\tjump nosuch")


def apply_no_check(fw: FwLab, text: str) -> tuple[int, str]:
    path = fw.write("change.nft", text)
    lab = fw.lab
    result = lab.srv_exec(["env", f"FWSAFE_STATE_DIR={fw.state_dir}",
                           f"SSH_CONNECTION={lab.cli_ip4} 50022 {lab.srv_ip4} 22", FWSAFE, "apply",
                           "-vv", "--detach", "--no-check", "--timeout", "60", str(path)],
                          check=False, timeout=120)
    print(result.stderr)
    return result.returncode, result.stderr


def test_a_refused_nft_file_changes_nothing_and_is_reported(fwlab: FwLab) -> None:
    lab = fwlab.lab
    before = (lab.srv_exec(["nft", "list", "ruleset"]).stdout,
              lab.srv_exec(["iptables-save"]).stdout)
    code, err = apply_no_check(fwlab, REFUSED)
    assert code == 3, err
    assert "change.nft:" in err and "nothing" in err.lower()
    assert "fwsafe: run: " in err and " -c -f " not in err, "nft -c ran before the guard's load"
    after = (lab.srv_exec(["nft", "list", "ruleset"]).stdout,
             lab.srv_exec(["iptables-save"]).stdout)
    assert after[0] == before[0], "the refused file changed the nft ruleset"
    assert "-A " in after[1] and after[1].count("-A ") == before[1].count("-A ")
    assert fwlab.status()["state"] == "rejected"
    assert lab.new_login_ok()


def test_a_good_nft_file_is_live_without_a_first_load(fwlab: FwLab) -> None:
    code, err = apply_no_check(fwlab, GOOD)
    assert code == 0, err
    assert " -c -f " not in err
    assert "10.9.9.9" in fwlab.lab.srv_exec(["nft", "list", "table", "inet", "fwt"]).stdout
    assert fwlab.fw("revert").returncode == 4
    assert "fwt" not in fwlab.lab.srv_exec(["nft", "list", "tables"]).stdout
