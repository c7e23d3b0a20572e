"""Socket-activated sshd (fwsafe.sshd.socketunit): what systemd says about ssh.socket, the
drop-in written from sshd -T's listen addresses, and the socket's files."""

from __future__ import annotations

from pathlib import Path

from fwsafe.sshd.socketunit import (
    SocketUnit,
    dropin_content,
    is_socket_file,
    listen_streams,
    parse_show,
    socket_files,
)


def test_parse_show_reads_accept_listen_and_bindipv6only() -> None:
    text = ("Accept=no\nBindIPv6Only=default\nListen=[::]:22 (Stream)\n"
            "Listen=0.0.0.0:2222 (Stream)\nListen=/run/x.sock (Datagram)\n")
    assert parse_show(text) == (False, ("[::]:22", "0.0.0.0:2222"), False)
    assert parse_show("Accept=yes\nBindIPv6Only=ipv6-only\n") == (True, (), True)


def test_a_dual_stack_socket_serves_ipv4_too() -> None:
    sock = SocketUnit("ssh.socket", False, ("[::]:22",))
    assert sock.addresses() == [("::", 22), ("0.0.0.0", 22)]
    assert sock.ports() == [22]
    only6 = SocketUnit("ssh.socket", False, ("[::]:22", "10.0.0.1:2200"), ipv6_only=True)
    assert only6.addresses() == [("::", 22), ("10.0.0.1", 2200)]
    assert only6.as_effective({"port": ["22"]}) == {
        "port": ["22"], "listenaddress": ["[::]:22", "10.0.0.1:2200"]}
    assert sock.service == "ssh.service"
    assert sock.dropin == "/etc/systemd/system/ssh.socket.d/zz-fwsafe-listen.conf"


def test_listen_streams_from_sshd_t() -> None:
    both = {"listenaddress": ["[::]:2222", "0.0.0.0:2222"]}
    assert listen_streams(both) == (["2222"], False)
    v4 = {"listenaddress": ["0.0.0.0:2222"]}
    assert listen_streams(v4) == (["0.0.0.0:2222"], False)
    some = {"listenaddress": ["10.0.0.1:22", "[fd00::1]:22", "[::]:2200"]}
    assert listen_streams(some) == (["10.0.0.1:22", "[fd00::1]:22", "[::]:2200"], True)


def test_the_dropin_resets_listenstream_first() -> None:
    text = dropin_content({"listenaddress": ["[::]:2222", "0.0.0.0:2222"]}).decode()
    body = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert body == ["[Socket]", "ListenStream=", "ListenStream=2222"]
    text = dropin_content({"listenaddress": ["[::]:22"]}).decode()
    assert text.endswith("ListenStream=[::]:22\nBindIPv6Only=ipv6-only\n")


def test_socket_files_are_the_overrides_and_dropins(tmp_path: Path) -> None:
    unit_dir = str(tmp_path)
    (tmp_path / "ssh.socket.d").mkdir()
    (tmp_path / "ssh.socket.d" / "b.conf").write_text("[Socket]\n")
    (tmp_path / "ssh.socket.d" / "a.conf").write_text("[Socket]\n")
    (tmp_path / "ssh.socket.d" / "notes.txt").write_text("")
    (tmp_path / "ssh.socket.d" / "link.conf").symlink_to(tmp_path / "ssh.socket.d" / "a.conf")
    (tmp_path / "sshd.socket").write_text("[Socket]\n")
    assert socket_files(unit_dir) == [f"{unit_dir}/ssh.socket.d/a.conf",
                                      f"{unit_dir}/ssh.socket.d/b.conf", f"{unit_dir}/sshd.socket"]
    assert is_socket_file(f"{unit_dir}/ssh.socket.d/gone.conf", unit_dir)
    assert is_socket_file(f"{unit_dir}/sshd.socket", unit_dir)
    assert not is_socket_file(f"{unit_dir}/ssh.service.d/x.conf", unit_dir)
    assert not is_socket_file("/etc/ssh/sshd_config", unit_dir)
