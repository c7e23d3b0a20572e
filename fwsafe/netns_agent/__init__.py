"""The sandbox agent: one small process in each network namespace of the check's sandbox,
started by ``fwsafe check`` (:mod:`fwsafe.check.sandbox`) and ``fwsafe audit``
(:mod:`fwsafe.audit.reach`, through the check's sandbox), asked one JSON line at a time.

:mod:`~fwsafe.netns_agent.agent` is the script (its docstring lists every request), run by
path (``python3 -I -S``, by ``ip netns exec``); :mod:`~fwsafe.netns_agent.agent_loop` its loop
and socket helpers; :mod:`~fwsafe.netns_agent.echo_paths` the check's requests (an echo
server, the connections tried against it), :mod:`~fwsafe.netns_agent.reach_probes` the
audit's (listeners like the host's, a packet tap, probes sent all at once). Standard library
only (the architecture test keeps it so): it sits below every other package and imports none,
so that both the check and the audit may start it.
"""

from __future__ import annotations

import os

#: The script the sandbox runs in each namespace (``python3 -I -S AGENT``).
AGENT = os.path.join(os.path.dirname(__file__), "agent.py")
