"""sshd's configuration under the guard: reading it as sshd does (`config`), changing it so that
the new values win (`edit`), the daemon (`daemon`: `sshd -t`/`-T`, reload, listening sockets),
who must still get in and whether they would (`access`, `lockout`), and the change that
`fwsafe sshd set|harden` and `fwsafe apply --sshd-set` hand to the apply flow (`change`).

The layer itself (capture, apply = write + reload, revert = the files back + reload) is
fwsafe.backends.sshd_layer; its serialised form is fwsafe.ondisk.sshd_files.
"""
