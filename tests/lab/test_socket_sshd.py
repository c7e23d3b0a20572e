"""Socket-activated sshd on the second generation (Debian 13, trixie) in the systemd lab: sshd
started by `ssh.socket` (ListenStream=22, Accept=no), as on Ubuntu 24.04 and a Debian 13 whose
admin ran `systemctl disable --now ssh.service; systemctl enable --now ssh.socket`.

What a user sees: an nft lockout applied with fwsafe and not confirmed is reverted on time and a
NEW login gets in; `fwsafe sshd set Port=2222` is put in force through fwsafe's drop-in for the
socket without ending the open session, confirmed through a NEW connection to 2222, and survives
a reboot; the move back, not confirmed, is reverted with sshd_config and every drop-in
byte-identical and SSH answering on 2222 again; ufw is active with its old rules after a hard
reboot mid-window. Times are printed (run with -s).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.rulesets import NFT_BASELINE, NFT_DROP_NEW_SSH
from tests.systemdlab import SystemdLab

pytestmark = pytest.mark.lab

PROBE_SLACK_S = 0.3
DROPIN_DIR = "/etc/systemd/system/ssh.socket.d"
FWSAFE_DROPIN = f"{DROPIN_DIR}/zz-fwsafe-listen.conf"
# An administrator's own drop-in, there before fwsafe: it must come back byte for byte.
ADMIN_DROPIN = f"{DROPIN_DIR}/00-admin.conf"
ADMIN_DROPIN_TEXT = "# the admin's: keep the backlog\n[Socket]\nBacklog=128\n"


def _socket_activated(lab: SystemdLab) -> None:
    """sshd as Ubuntu 24.04 / Debian 13 with ssh.socket."""
    _socket_activated_on(lab, 22)


def _socket_activated_on(lab: SystemdLab, port: int) -> None:
    lab.exec(["sh", "-c", "systemctl daemon-reload && systemctl disable --now ssh.service && "
                          "systemctl enable --now ssh.socket"])
    lab.wait_ssh(20, port=port)
    show = lab.exec(["systemctl", "show", "-p", "Accept", "-p", "Listen", "ssh.socket"]).stdout
    assert "Accept=no" in show and f"Listen=[::]:{port} (Stream)" in show, show
    enabled = lab.exec(["systemctl", "is-enabled", "ssh.service"], check=False).stdout.strip()
    assert enabled == "disabled", enabled


def _files(lab: SystemdLab) -> dict[str, str]:
    """sshd_config, its drop-ins and the socket's drop-ins: path -> sha256 (and mode, owner)."""
    out = lab.exec(["sh", "-c", "for f in /etc/ssh/sshd_config /etc/ssh/sshd_config.d/* "
                                f"{DROPIN_DIR}/*; do [ -f \"$f\" ] && "
                                "echo \"$f $(stat -c '%a %u:%g' \"$f\") $(sha256sum < \"$f\")\"; "
                                "done; true"]).stdout
    return {line.split()[0]: line for line in out.splitlines() if line.strip()}


def _json(result: Any) -> dict[str, Any]:
    assert result.returncode == 0, f"{result.returncode}\n{result.stdout}\n{result.stderr}"
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _listen(lab: SystemdLab) -> str:
    return lab.exec(["systemctl", "show", "-p", "Listen", "--value", "ssh.socket"]).stdout.strip()


def _listening(lab: SystemdLab) -> set[str]:
    return {word for word in _listen(lab).split() if word != "(Stream)"}


def test_nft_lockout_not_confirmed_is_reverted_on_time(sdlab_trixie: SystemdLab) -> None:
    lab = sdlab_trixie
    _socket_activated(lab)
    lab.write("/etc/nftables.conf", NFT_BASELINE, mode="0755")
    lab.exec(["systemctl", "enable", "--now", "nftables.service"])
    lab.write("/root/change.nft", NFT_DROP_NEW_SSH)
    before = lab.ruleset()
    # The check knows where the socket listens: the change locks out port 22.
    check = lab.ssh("fwsafe check /root/change.nft")
    assert check.returncode == 1, f"{check.stdout}\n{check.stderr}"
    applied = _json(lab.ssh("fwsafe apply --detach --json --force --timeout 6 /root/change.nft"))
    assert applied["state"] == "pending", applied
    assert not lab.new_connection_ok(timeout=0.5), "the lockout is not live"
    deadline = float(lab.status()["deadline"])
    lab.wait_ssh(30)
    answered = time.time()
    print(f"\n[socket sshd] nft lockout reverted: SSH answered {answered - deadline:+.2f} s "
          "from the deadline")
    assert answered - deadline < 3.0 + PROBE_SLACK_S
    assert lab.ssh("true").returncode == 0  # a NEW login gets in
    assert lab.status()["state"] == "reverted"
    assert lab.ruleset() == before


def test_port_move_confirmed_survives_a_reboot_and_the_move_back_is_reverted(
        sdlab_trixie: SystemdLab) -> None:
    lab = sdlab_trixie
    lab.write(ADMIN_DROPIN, ADMIN_DROPIN_TEXT)
    _socket_activated(lab)
    original = _files(lab)
    admin = lab.ssh_popen("sleep 600")  # the admin's open session
    time.sleep(1.0)

    started = time.monotonic()
    moved = _json(lab.ssh("fwsafe sshd set --detach --json --timeout 60 Port=2222"))
    print(f"\n[socket sshd] Port=2222 live and armed in {time.monotonic() - started:.2f} s")
    assert moved["state"] == "pending", moved
    assert _listen(lab) == "[::]:2222 (Stream)"
    assert "ListenStream=2222" in lab.read(FWSAFE_DROPIN)
    assert lab.read(ADMIN_DROPIN) == ADMIN_DROPIN_TEXT
    assert admin.poll() is None, "the open session ended"
    assert not lab.new_connection_ok(timeout=0.5)  # 22 is no more
    confirm = lab.ssh(f"fwsafe confirm {moved['id']}", port=2222)  # a NEW connection to 2222
    assert confirm.returncode == 0, confirm.stderr
    assert lab.status()["state"] == "confirmed"
    assert admin.poll() is None, "the open session ended"
    confirmed = _files(lab)

    issued = time.monotonic()
    lab.reboot(hard=False)
    lab.wait_ssh(60, port=2222)
    print(f"[socket sshd] after the reboot SSH answers on 2222 in "
          f"{time.monotonic() - issued:.2f} s")
    assert lab.ssh("true", port=2222).returncode == 0
    assert not lab.new_connection_ok(timeout=0.5)
    assert _files(lab) == confirmed
    assert _listen(lab) == "[::]:2222 (Stream)"

    # The move back, not confirmed: reverted on time, every file as it was.
    admin = lab.ssh_popen("sleep 600", port=2222)
    time.sleep(1.0)
    back = _json(lab.ssh("fwsafe sshd set --detach --json --timeout 6 Port=22", port=2222))
    assert back["state"] == "pending", back
    lab.wait_ssh(10)  # now on 22
    assert not lab.new_connection_ok(timeout=0.5, port=2222)
    deadline = float(lab.status()["deadline"])
    lab.wait_ssh(30, port=2222)
    answered = time.time()
    print(f"[socket sshd] unconfirmed move back reverted: SSH answered on 2222 "
          f"{answered - deadline:+.2f} s from the deadline")
    assert answered - deadline < 3.0 + PROBE_SLACK_S
    assert lab.ssh("true", port=2222).returncode == 0
    assert lab.status()["state"] == "reverted"
    assert _files(lab) == confirmed
    assert _listen(lab) == "[::]:2222 (Stream)"
    assert admin.poll() is None, "the open session ended"
    assert original != confirmed


def test_ufw_active_with_its_old_rules_after_a_hard_reboot_mid_window(
        sdlab_trixie: SystemdLab) -> None:
    lab = sdlab_trixie
    _socket_activated(lab)
    lab.exec(["ufw", "allow", "22/tcp"])
    lab.exec(["ufw", "--force", "enable"])
    before = lab.ruleset()
    ufw_before = lab.exec(["ufw", "status", "verbose"]).stdout
    assert "Status: active" in ufw_before
    applied = _json(lab.ssh("fwsafe apply --detach --json --force --timeout 300 "
                            "-- ufw delete allow 22/tcp"))
    assert not lab.new_connection_ok(timeout=0.5), "the lockout is not live"
    issued = time.monotonic()
    lab.reboot(hard=True)
    lab.wait_ssh(60)
    print(f"\n[socket sshd] ufw: hard reboot mid-window -> SSH answering: "
          f"{time.monotonic() - issued:.2f} s")
    state = lab.wait_booted()
    assert state in ("running", "degraded"), state
    assert lab.exec(["ufw", "status", "verbose"]).stdout == ufw_before
    assert lab.ruleset() == before
    info = lab.status()
    assert info["id"] == applied["id"] and info["state"] == "reverted", info
    assert lab.ssh("true").returncode == 0


def test_the_check_knows_the_sockets_ports(sdlab_trixie: SystemdLab) -> None:
    """The socket listens on 2200 by an admin's drop-in, sshd_config still says 22: the
    established sessions fwsafe protects (run outside any SSH session) are those on 2200."""
    lab = sdlab_trixie
    lab.write(ADMIN_DROPIN, "[Socket]\nListenStream=\nListenStream=2200\n")
    _socket_activated_on(lab, 2200)
    admin = lab.ssh_popen("sleep 600", port=2200)
    lab.write("/root/change.nft", NFT_DROP_NEW_SSH.replace("dport 22 ", "dport 2200 "))
    end = time.monotonic() + 10
    while lab.ssh("true", port=2200).returncode != 0 and time.monotonic() < end:
        time.sleep(0.1)  # the session is up once logins are
    time.sleep(1.0)
    check = lab.exec(["fwsafe", "check", "/root/change.nft"], check=False)  # not over SSH
    assert check.returncode == 1, f"{check.stdout}\n{check.stderr}"
    assert lab.cli_ip4 in check.stdout + check.stderr, check.stdout + check.stderr
    assert admin.poll() is None


def test_an_address_the_socket_cannot_listen_on_is_put_back(sdlab_trixie: SystemdLab) -> None:
    """ListenAddress 10.9.9.9 (not an address of the host): sshd -t accepts it, the socket
    cannot bind it and fails. The guard puts every file back and brings the socket back up:
    SSH answers on 22, the open session lives."""
    lab = sdlab_trixie
    lab.write(ADMIN_DROPIN, ADMIN_DROPIN_TEXT)
    _socket_activated(lab)
    original = _files(lab)
    admin = lab.ssh_popen("sleep 600")
    time.sleep(1.0)
    result = lab.ssh("fwsafe sshd set --json --force --timeout 30 ListenAddress=10.9.9.9",
                     timeout=120)
    print(f"\n[socket sshd] unbindable address: exit {result.returncode}; "
          f"{result.stderr.strip()[-300:]}")
    assert result.returncode in (3, 4), f"{result.stdout}\n{result.stderr}"
    lab.wait_ssh(10)
    assert lab.ssh("true").returncode == 0
    assert _files(lab) == original
    assert _listen(lab) == "[::]:22 (Stream)"
    assert lab.exec(["systemctl", "is-active", "ssh.socket", "ssh.service"],
                    check=False).stdout.split() == ["active", "active"]
    assert admin.poll() is None, "the open session ended"
    assert lab.status()["state"] in ("reverted", "rejected", "failed"), lab.status()


# A stand-in for Ubuntu 24.04's sshd-socket-generator (a C program of Ubuntu's openssh-server,
# not in Debian): at every daemon-reload it turns sshd_config's listen addresses (`sshd -G`)
# into the socket's ListenStream= lines, in the generator's output directory.
GENERATOR = "/usr/lib/systemd/system-generators/sshd-socket-generator"
GENERATOR_SCRIPT = """\
#!/bin/sh
out="${1:-/run/systemd/generator}"
mkdir -p "$out/ssh.socket.d"
{
    echo "[Socket]"
    echo "ListenStream="
    /usr/sbin/sshd -G 2>/dev/null | awk '$1 == "listenaddress" { print "ListenStream=" $2 }'
    echo "BindIPv6Only=ipv6-only"
} > "$out/ssh.socket.d/addresses.conf"
"""


def test_with_the_generator_sshd_config_moves_the_socket(sdlab_trixie: SystemdLab) -> None:
    lab = sdlab_trixie
    lab.write(GENERATOR, GENERATOR_SCRIPT, mode="0755")
    _socket_activated(lab)
    assert _listening(lab) == {"0.0.0.0:22", "[::]:22"}, _listen(lab)
    original = _files(lab)
    admin = lab.ssh_popen("sleep 600")
    time.sleep(1.0)
    moved = _json(lab.ssh("fwsafe sshd set --detach --json --timeout 6 Port=2222"))
    assert _listening(lab) == {"0.0.0.0:2222", "[::]:2222"}
    assert lab.exec(["test", "-e", FWSAFE_DROPIN], check=False).returncode == 1  # no drop-in
    assert lab.ssh("true", port=2222).returncode == 0
    deadline = float(lab.status()["deadline"])
    lab.wait_ssh(30)
    answered = time.time()
    print(f"\n[socket sshd] generator: unconfirmed Port=2222 reverted, SSH on 22 "
          f"{answered - deadline:+.2f} s from the deadline")
    assert answered - deadline < 3.0 + PROBE_SLACK_S
    assert lab.status()["id"] == moved["id"] and lab.status()["state"] == "reverted"
    assert _files(lab) == original
    assert _listening(lab) == {"0.0.0.0:22", "[::]:22"}
    assert admin.poll() is None, "the open session ended"


def test_a_hard_reboot_mid_window_of_a_port_move_comes_back_on_the_old_port(
        sdlab_trixie: SystemdLab) -> None:
    """The boot recovery reverts a pending sshd change before the socket starts: the files are
    back byte for byte and the socket listens on 22 again."""
    lab = sdlab_trixie
    lab.write(ADMIN_DROPIN, ADMIN_DROPIN_TEXT)
    _socket_activated(lab)
    original = _files(lab)
    moved = _json(lab.ssh("fwsafe sshd set --detach --json --timeout 300 Port=2222"))
    assert _listening(lab) == {"[::]:2222"}
    issued = time.monotonic()
    lab.reboot(hard=True)
    lab.wait_ssh(60)
    print(f"\n[socket sshd] hard reboot mid-window of Port=2222: SSH on 22 after "
          f"{time.monotonic() - issued:.2f} s")
    assert lab.wait_booted() in ("running", "degraded")
    assert _files(lab) == original
    assert _listening(lab) == {"[::]:22"}
    assert not lab.new_connection_ok(timeout=0.5, port=2222)
    info = lab.status()
    assert info["id"] == moved["id"] and info["state"] == "reverted", info


def test_a_port_move_under_a_stream_of_new_connections(sdlab_trixie: SystemdLab) -> None:
    """Scanners and monitors connect all the time: a connection while the service is stopped
    and the socket still listens starts the service again, and systemd then refuses to start
    the socket anew. fwsafe stops the socket first: the move goes through, and an
    `override.conf` of `systemctl edit` adds no port (fwsafe's drop-in comes last)."""
    import threading

    lab = sdlab_trixie
    lab.write(f"{DROPIN_DIR}/override.conf", "[Socket]\nListenStream=2200\n")
    _socket_activated(lab)
    stop = threading.Event()
    knocks = [0]

    def knock() -> None:
        while not stop.is_set():
            lab.new_connection_ok(timeout=0.2)
            knocks[0] += 1

    threads = [threading.Thread(target=knock, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        moved = _json(lab.ssh("fwsafe sshd set --detach --json --timeout 60 Port=2222",
                              timeout=120))
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    print(f"\n[socket sshd] Port=2222 moved while {knocks[0]} connections knocked")
    assert moved["state"] == "pending", moved
    assert _listening(lab) == {"[::]:2222"}
    assert lab.ssh("true", port=2222).returncode == 0
