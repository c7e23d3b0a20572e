# Copyright: fwsafe contributors
# MIT License (see the fwsafe repository)
"""Controller side of fwsafe.firewall.apply: change a host's firewall under fwsafe's guard and
confirm the change only through a brand-new SSH connection.

Per host (Ansible runs this once for each host of the batch):

1. upload the rules files (if any) to a temporary directory on the host;
2. ``fwsafe diff --json`` there: nothing to change -> ``changed: false``, ``state: unchanged``;
3. check mode: ``fwsafe check --json`` (a predicted lockout fails the task), and stop;
4. ``fwsafe apply --detach --json ...``: the change is live, the host's guard armed;
5. close every connection to the host: the ssh ControlPersist master (``ssh -O exit`` on its
   control path, verified with ``ssh -O check``) and the connection object (``reset()``);
6. run ``fwsafe confirm ID`` through a NEW ssh process that may not use any control socket
   (``-o ControlMaster=no -o ControlPath=none``, placed before every other option: ssh keeps the
   first value it is given), retried until the guard's deadline. A connection that existed
   before the change is never used, so only a host that still accepts NEW SSH logins is
   confirmed;
7. if no new connection got in, the host's guard reverts at the deadline; the task waits for the
   host to answer a new connection again (timeout + revert_grace) and fails with the reason the
   host recorded (``fwsafe status --json``).

Timing agrees with ``fwsafe apply --host`` (fwsafe/remote/timing.py): before the change one new
ssh login measures the link while it is good (and proves that new logins work at all: if not,
nothing is applied); every new-login and remote-command limit is scaled from it with the same
floors and ceilings (`link_budgets`; tests/unit/test_remote_faults.py checks that both agree).
"""

from __future__ import annotations

import json
import math
import shlex
import socket
import subprocess
import time

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

display = Display()

ARGUMENT_SPEC = {
    "rules": {"type": "str"},
    "rules6": {"type": "str"},
    "partial": {"type": "bool", "default": False},
    "command": {"type": "list", "elements": "str"},
    "timeout": {"type": "int", "default": 60},
    "probes": {"type": "list", "elements": "str", "default": []},
    "force": {"type": "bool", "default": False},
    "state_dir": {"type": "str"},
    "executable": {"type": "str", "default": "fwsafe"},
    "connect_timeout": {"type": "int", "default": 5},
    "revert_grace": {"type": "int", "default": 120},
}
MUTUALLY_EXCLUSIVE = [("rules", "command"), ("rules6", "command"), ("partial", "command")]
REQUIRED_ONE_OF = [("rules", "rules6", "command")]

SSH_TRANSPORTS = ("ssh", "ansible.builtin.ssh")
# Put first on a fresh ssh command line: ssh keeps the first value of an option, so neither
# Ansible's default ssh_args (ControlMaster=auto, ControlPersist=60s) nor the ControlPath that
# Ansible adds can make this process reuse, or become, a multiplexing master.
FRESH_OPTIONS = ("-o", "ControlMaster=no", "-o", "ControlPath=none", "-o", "ControlPersist=no",
                 "-o", "BatchMode=yes", "-o", "ServerAliveInterval=2", "-o", "ServerAliveCountMax=3")
RETRY_PAUSE_S = 1.0
# The budgets of `fwsafe apply --host` (fwsafe.remote.timing.Link), copied: the controller need
# not have fwsafe installed.
ATTEMPT_FLOOR, ATTEMPT_CEILING = 5.0, 60.0
QUERY_FLOOR, QUERY_CEILING = 30.0, 120.0
FIRST_CONNECT_TIMEOUT = 30


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(value, high))


def link_budgets(rtt_s: float, login_s: float) -> dict:
    """A new login's limit ("attempt": TCP connect, key exchange, authentication) and a remote
    command's ("query"), from the round trip and the login time measured before the change."""
    return {"attempt": _clamp(2.0 + 3 * login_s, ATTEMPT_FLOOR, ATTEMPT_CEILING),
            "query": _clamp(QUERY_FLOOR + 10 * rtt_s, QUERY_FLOOR, QUERY_CEILING)}


class FwsafeTaskError(Exception):
    """Ends the task as failed, with these result fields."""

    def __init__(self, msg: str, **fields: object) -> None:
        super().__init__(msg)
        self.fields = {"msg": msg, **fields}


def _last_json(text: str) -> dict:
    """The last line of `text` that is a JSON object ({} if none): fwsafe prints one object on
    stdout; a become plugin may print a marker line before it."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict):
                return data
    return {}


def _diff_text(units: list) -> str:
    parts = []
    for unit in units:
        header = f"# {unit.get('layer')} {unit.get('unit')}: {unit.get('change')}"
        parts.append(header + "\n" + str(unit.get("diff", "")).rstrip("\n") + "\n")
    return "".join(parts)


class ActionModule(ActionBase):
    TRANSFERS_FILES = True

    def run(self, tmp=None, task_vars=None):
        self._supports_check_mode = True
        self._supports_async = False
        result = super().run(tmp, task_vars)
        _, args = self.validate_argument_spec(
            argument_spec=ARGUMENT_SPEC, mutually_exclusive=MUTUALLY_EXCLUSIVE,
            required_one_of=REQUIRED_ONE_OF)
        if args["command"] is not None and not args["command"]:
            result.update(failed=True, msg="command must not be empty")
            return result
        if args["timeout"] < 1:
            result.update(failed=True, msg="timeout must be at least 1 second")
            return result
        self._args = args
        self._hostname = str((task_vars or {}).get("inventory_hostname") or self._target())
        try:
            result.update(self._run(args))
        except FwsafeTaskError as exc:
            result.update({"failed": True, "changed": False, **exc.fields})
        finally:
            self._cleanup_tmp()
        return result

    # ------------------------------------------------------------------ the flow

    def _run(self, args: dict) -> dict:
        self._preflight()
        host = self._hostname
        change = self._upload(args)
        diff = self._fwsafe(["diff", "--json", *change], what="diff")
        units = diff["data"].get("units") or []
        out: dict = {"state": "unchanged", "transaction": None, "reason": None,
                     "diff_units": units}
        if self._task.diff and units:
            out["diff"] = [{"prepared": _diff_text(units)}]
        if not diff["data"].get("changed"):
            out.update(changed=False, msg=f"{host}: the live firewall already equals the request")
            return out
        if self._task.check_mode:
            return {**out, **self._check_mode(args, change, host)}

        apply_cmd = ["apply", "--detach", "--json", "--timeout", str(args["timeout"])]
        if args["force"]:
            apply_cmd.append("--force")
        for url in args["probes"]:
            apply_cmd += ["--probe", url]
        apply_cmd += self._state_dir_args(args)
        self._link = self._measure_link()
        out["link"] = dict(self._link)
        started = time.monotonic()
        try:
            # The uploaded files go in the same command: after the change, the connection that
            # applied it may be slow or cut (rules that drop established connections too).
            applied = self._fwsafe([*apply_cmd, *change], what="apply", allowed=(0, 2, 3, 4, 5, 6),
                                   then_remove_tmp=True)
        except AnsibleConnectionFailure as exc:
            # The change cut the very connection that applied it (established ones included):
            # its answer, and so its transaction id, never came back. Nothing can be confirmed;
            # the guard reverts at the deadline. Report what the host says once it answers.
            out["connections_closed"] = self._close_connections()
            final = self._await_verdict(args, None, started)
            raise FwsafeTaskError(
                f"{host}: the connection broke while applying ({exc}); the change was never "
                f"confirmed, so the host's guard reverts it at its deadline. The host's latest "
                f"transaction: {final.get('id') or 'unknown (no answer)'} "
                f"{final['state'] or ''} ({final['reason'] or 'no reason seen'})",
                state=final["state"] or "unknown", transaction=final.get("id"),
                reason=final["reason"], diff_units=units) from exc
        data = applied["data"]
        if applied["rc"] != 0:
            state = {4: "reverted", 5: "revert-failed"}.get(applied["rc"], "refused")
            raise FwsafeTaskError(
                f"{host}: fwsafe refused the change (exit {applied['rc']}): "
                f"{data.get('error') or applied['stderr'].strip()}"
                + (f" ({data['hint']})" if data.get("hint") else ""),
                state=state, transaction=None, reason=data.get("error"), rc=applied["rc"],
                diff_units=units, **({"diff": out["diff"]} if "diff" in out else {}))
        tx_id = str(data["id"])
        remaining = float(data.get("remaining_s") or args["timeout"])
        # The answer left the host up to a round trip ago.
        deadline = time.monotonic() - self._link["rtt_s"] + remaining
        out["transaction"] = tx_id
        out["connections_closed"] = self._close_connections()
        outcome = self._confirm_fresh(args, tx_id, deadline)
        out["confirm_attempts"] = outcome["attempts"]
        out["elapsed_s"] = round(time.monotonic() - started, 2)
        if not outcome["attempts"]:
            outcome["last_error"] = ("the deadline had passed before a new connection could be "
                                     "tried: the connection that applied the change answered late")
        if outcome["state"] == "confirmed":
            out.update(changed=True, state="confirmed", reason=outcome["reason"],
                       confirmed_via=outcome["via"],
                       msg=f"{host}: transaction {tx_id} confirmed through a new SSH connection")
            return out
        final = outcome if outcome["state"] else self._await_verdict(args, tx_id, started)
        out.update(state=final["state"] or "unknown", reason=final["reason"])
        if final["state"] == "reverted":
            why = final["reason"] or "no reason recorded"
            msg = (f"{host}: the change was REVERTED by the host's guard ({why}); no new SSH "
                   f"connection could confirm transaction {tx_id} within {args['timeout']} s "
                   f"({outcome['last_error'] or 'no error reported'}). The old rules are back.")
        elif final["state"] == "confirmed":
            out.update(changed=True, msg=f"{host}: transaction {tx_id} was confirmed "
                                         f"({final['reason']})")
            return out
        elif final["state"] is None:
            msg = (f"{host}: no new SSH connection got in before the deadline, and the host did "
                   f"not answer a new connection within timeout + revert_grace "
                   f"({args['timeout'] + args['revert_grace']} s): its guard should have "
                   f"reverted transaction {tx_id}, but that could not be seen "
                   f"({outcome['last_error']}); check the host's console")
        else:
            msg = (f"{host}: transaction {tx_id} ended as {final['state']}: {final['reason']} "
                   f"({final.get('error') or ''})")
        raise FwsafeTaskError(msg, **{k: v for k, v in out.items() if k != "msg"})

    def _check_mode(self, args: dict, change: list, host: str) -> dict:
        checked = self._fwsafe(["check", "--json", *change], what="check", allowed=(0, 1, 3))
        data = checked["data"]
        culprits = [v.get("culprit") for v in data.get("verdicts") or [] if v.get("culprit")]
        summary = {"lockout": data.get("lockout"), "culprits": culprits,
                   "not_checked": data.get("not_checked") or []}
        if checked["rc"] == 3:
            raise FwsafeTaskError(f"{host}: fwsafe rejected the change: {data.get('error')}",
                                  state="refused", check=summary)
        if checked["rc"] == 1:
            msg = f"{host}: lockout predicted: {data.get('error') or '; '.join(culprits)}"
            if not args["force"]:
                raise FwsafeTaskError(msg + " (nothing was changed)", state="refused",
                                      reason=data.get("error"), check=summary)
            display.warning(msg + "; force: true would apply it under the guard anyway")
        return {"changed": True, "check": summary,
                "msg": f"{host}: the change would be applied (check mode: nothing changed)"}

    # ------------------------------------------------------------------ host commands

    def _preflight(self) -> None:
        """Refuse, before anything changes, what the fresh confirmation cannot work with."""
        conn = self._connection
        transport = getattr(conn, "transport", "")
        if transport not in SSH_TRANSPORTS:
            raise FwsafeTaskError(
                f"fwsafe.firewall.apply needs the ssh connection plugin (got {transport!r}): it "
                "confirms only through a brand-new SSH connection", state="refused")
        if conn.get_option("password"):
            raise FwsafeTaskError(
                "fwsafe.firewall.apply needs key-based SSH logins: the confirmation runs through "
                "a new, non-interactive ssh process (BatchMode)", state="refused")
        if self._become_active() and conn.become.get_option("become_pass"):
            raise FwsafeTaskError(
                "fwsafe.firewall.apply needs become without a password (e.g. sudo NOPASSWD "
                "for fwsafe): the confirmation runs through a new, non-interactive SSH login",
                state="refused")

    def _state_dir_args(self, args: dict) -> list[str]:
        return ["--state-dir", args["state_dir"]] if args["state_dir"] else []

    def _upload(self, args: dict) -> list[str]:
        """Copy the rules files to a temporary directory on the host; the fwsafe arguments that
        describe the change."""
        if args["command"]:
            return ["--", *args["command"]]
        tmpdir = self._make_tmp_path()
        change: list[str] = ["--partial"] if args["partial"] else []
        for key, name in (("rules", "rules.v4"), ("rules6", "rules.v6")):
            if not args[key]:
                continue
            try:
                local = self._find_needle("files", args[key])
            except AnsibleError as exc:
                raise FwsafeTaskError(f"{key}: {args[key]} not found on the controller ({exc})",
                                      state="refused") from exc
            remote = self._connection._shell.join_path(tmpdir, name)
            self._transfer_file(local, remote)
            change += ([remote] if key == "rules" else ["--rules6", remote])
        return change

    def _fwsafe(self, argv: list[str], *, what: str, allowed: tuple = (0,),
                then_remove_tmp: bool = False) -> dict:
        """Run fwsafe on the host through Ansible's connection; JSON from its stdout."""
        cmd = shlex.join([self._exe(), *argv])
        tmpdir = getattr(self._connection._shell, "tmpdir", None)
        if then_remove_tmp and tmpdir and "ansible-tmp-" in tmpdir:
            cmd = f"{cmd}; rc=$?; rm -f -r {shlex.quote(tmpdir)}; exit $rc"
            self._connection._shell.tmpdir = None
        res = self._low_level_execute_command(cmd, sudoable=True)
        rc, stdout, stderr = res["rc"], res.get("stdout", ""), res.get("stderr", "")
        data = _last_json(stdout)
        if rc not in allowed or (not data and rc == 0):
            detail = data.get("error") or stderr.strip() or stdout.strip()
            raise FwsafeTaskError(f"fwsafe {what} failed on the host (exit {rc}): {detail}",
                                  state="refused", rc=rc, stdout=stdout, stderr=stderr)
        return {"rc": rc, "data": data, "stderr": stderr}

    def _exe(self) -> str:
        return str(self._args["executable"])

    def _become_active(self) -> bool:
        become = getattr(self._connection, "become", None)
        if not become:
            return False
        ruser, buser = self._get_remote_user(), self.get_become_option("become_user")
        from ansible import constants as C

        return bool(C.BECOME_ALLOW_SAME_USER or buser != ruser or not any((ruser, buser)))

    def _remove_tmp_now(self) -> None:
        """Remove the uploaded files while the old connection still works (fwsafe keeps its
        own copy of the change in its state directory)."""
        tmpdir = getattr(self._connection._shell, "tmpdir", None)
        if tmpdir:
            self._remove_tmp_path(tmpdir)
            self._connection._shell.tmpdir = None

    def _cleanup_tmp(self) -> None:
        try:
            self._remove_tmp_now()
        except Exception as exc:  # the host may be unreachable after a revert
            display.vv(f"could not remove the temporary directory: {exc}")

    # ------------------------------------------------------------------ connections

    def _ssh_command(self, *other: str) -> list[bytes]:
        conn = self._connection
        return conn._build_command(conn.get_option("ssh_executable"), "ssh", *other)

    def _target(self) -> str:
        return str(self._connection.get_option("host") or self._play_context.remote_addr)

    def _close_connections(self) -> list[str]:
        """Close the ControlPersist master (if any) and reset the connection object."""
        done: list[str] = []
        target = self._target()

        def control(op: str) -> subprocess.CompletedProcess:
            return subprocess.run(self._ssh_command("-O", op, target), stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=30, check=False)

        if control("check").returncode == 0:
            stopped = control("exit")
            if control("check").returncode == 0:
                display.warning(f"{target}: the ssh ControlPersist master is still running after "
                                f"`ssh -O exit` ({to_text(stopped.stderr).strip()}); the "
                                "confirmation does not use it in any case")
                done.append("ssh ControlPersist master: `ssh -O exit` failed (not used)")
            else:
                done.append("ssh ControlPersist master: closed (ssh -O exit)")
        else:
            done.append("ssh ControlPersist master: none running")
        self._connection.reset()
        self._connection.close()
        done.append("connection object: reset and closed")
        return done

    def _fresh_ssh(self, remote_argv: list[str], connect_timeout: int,
                   run_limit: float = 60) -> tuple[int, str, str]:
        """Run a command through a NEW ssh connection (no control socket at all). The inventory's
        host, port, user, key, ssh_common_args and host key checking apply as for Ansible."""
        cmd = shlex.join(remote_argv)
        if self._become_active():
            cmd = self._connection.become.build_become_command(cmd, self._connection._shell)
        argv = self._ssh_command(self._target(), cmd)
        exe = to_bytes(self._connection.get_option("ssh_executable"))
        at = argv.index(exe) + 1 if exe in argv else 1
        argv[at:at] = [to_bytes(a) for a in (*FRESH_OPTIONS, "-o", f"ConnectTimeout={connect_timeout}",
                                             "-T")]
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=connect_timeout + run_limit, check=False)
        except subprocess.TimeoutExpired:
            return 255, "", f"no answer within {connect_timeout + run_limit:g} s"
        return proc.returncode, to_text(proc.stdout), to_text(proc.stderr)

    def _measure_link(self) -> dict:
        """Before the change, while the link is good: the round trip (a TCP connect, where the
        host is reached directly) and the time of one new ssh login; and the budgets scaled
        from them. A new login that fails now could never confirm: nothing is applied."""
        rtt = 0.0
        if not any(word in str(self._connection.get_option("ssh_common_args") or "")
                   for word in ("ProxyJump", "ProxyCommand", "-J")):
            port = int(self._connection.get_option("port") or 22)
            began = time.monotonic()
            try:
                socket.create_connection((self._target(), port), timeout=10).close()
                rtt = time.monotonic() - began
            except (OSError, ValueError):
                rtt = 0.0
        began = time.monotonic()
        rc, _, stderr = self._fresh_ssh(["true"], FIRST_CONNECT_TIMEOUT, run_limit=QUERY_FLOOR)
        login = time.monotonic() - began
        if rc != 0:
            raise FwsafeTaskError(
                f"{self._hostname}: a new SSH connection fails before any change "
                f"({stderr.strip().splitlines()[-1] if stderr.strip() else f'exit {rc}'}): "
                "the change could never be confirmed through one, so nothing was applied",
                state="refused")
        return {"rtt_s": round(rtt, 3), "login_s": round(login, 3), **link_budgets(rtt, login)}

    def _connect_timeout(self, args: dict) -> int:
        """ssh's ConnectTimeout (TCP connect and banner) for a new login: the option's value,
        or more where the link measured before the change needs it."""
        return max(int(args["connect_timeout"]), math.ceil(self._link["attempt"]))

    def _confirm_fresh(self, args: dict, tx_id: str, deadline: float) -> dict:
        """`fwsafe confirm ID` through new connections until one gets in or the deadline passes."""
        argv = [self._exe(), "confirm", "--json", *self._state_dir_args(args), tx_id]
        attempts, last_error = 0, ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            attempts += 1
            rc, stdout, stderr = self._fresh_ssh(
                argv, max(1, min(self._connect_timeout(args), int(left))),
                run_limit=self._link["query"])
            data = _last_json(stdout)
            if rc == 0 and data.get("state") == "confirmed":
                reason = data.get("reason") or ""
                via = reason.rsplit("(", 1)[-1].rstrip(")") if "new SSH connection" in reason else ""
                return {"state": "confirmed", "reason": reason, "via": via,
                        "attempts": attempts, "last_error": ""}
            if rc == 4:
                return {"state": "reverted", "reason": data.get("error") or stderr.strip(),
                        "attempts": attempts, "last_error": ""}
            if rc == 255:
                last_error = stderr.strip().splitlines()[-1] if stderr.strip() else "ssh failed"
                display.vv(f"{self._target()}: new SSH connection {attempts} failed: {last_error}")
                time.sleep(min(RETRY_PAUSE_S, max(0.0, deadline - time.monotonic())))
                continue
            last_error = data.get("error") or stderr.strip() or f"fwsafe confirm exit {rc}"
            break
        return {"state": None, "reason": None, "attempts": attempts, "last_error": last_error}

    def _await_verdict(self, args: dict, tx_id: str | None, started: float) -> dict:
        """After a missed deadline: wait for the host to answer a NEW connection again and read
        what its guard did (`fwsafe status --json`; tx_id None: its latest transaction)."""
        argv = [self._exe(), "status", "--json", *self._state_dir_args(args)]
        limit = started + args["timeout"] + args["revert_grace"]
        while time.monotonic() < limit:
            left = max(1, int(limit - time.monotonic()))
            rc, stdout, _ = self._fresh_ssh(argv, min(self._connect_timeout(args), left),
                                            run_limit=self._link["query"])
            data = _last_json(stdout)
            if rc == 0 and data.get("id") == (tx_id or data.get("id")) and data.get("state") not in (
                    "pending", "preparing", "applying", "reverting"):
                return {"state": data.get("state"), "reason": data.get("reason"),
                        "error": data.get("error"), "id": data.get("id")}
            time.sleep(RETRY_PAUSE_S)
        return {"state": None, "reason": None, "error": None, "id": None}
