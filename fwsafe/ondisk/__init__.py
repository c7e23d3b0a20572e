"""On-disk formats shared by the running tool and the rescue zipapp (standard library only,
Python 3.9+; they import nothing of fwsafe but each other and fwsafe.errors):

* files: the one atomic writer (state files, ufw's files, boot files) and paths under a root;
* ufw: ufw's files as one serialised layer;
* history: the history of known-good states (its layout, reading and verifying it);
* boot: the files a system loads its firewall from at boot, and their content;
* iptsave_lines: iptables-save text read line by line (what each line is), the lowest level of
  the format's one reader (fwsafe.backends.iptsave builds on it).
"""
