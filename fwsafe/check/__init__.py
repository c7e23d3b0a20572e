"""Prediction before anything changes: the lockout check with the real kernel in a scratch
namespace, and trying a change on a copy (diff).

The public API is in the modules (this package imports none of them, so that the namespace
lab can use :mod:`fwsafe.check.netns` without loading the check): :mod:`~fwsafe.check.predict`
(``predict``, ``CheckReport``), :mod:`~fwsafe.check.precheck` (what ``fwsafe apply`` runs),
:mod:`~fwsafe.check.change_diff` and :mod:`~fwsafe.check.simulate`.

The lockout check in phases: :mod:`~fwsafe.check.host` reads the host (interfaces, routes,
the current firewall) and plans the sandbox; :mod:`~fwsafe.check.sandbox` builds it (with
:mod:`~fwsafe.check.netns`, the network-namespace builder shared with ``diff`` and the lab) and
runs its agents; :mod:`~fwsafe.check.loading` loads the current firewall and the candidate
into it; :mod:`~fwsafe.check.attempts` sends the packets and reads the kernel's answer;
:mod:`~fwsafe.check.naming` names the rule responsible, from what the tools print, read by
:mod:`~fwsafe.check.ipt_counters` (which iptables rule counted), :mod:`~fwsafe.check.ipt_lines`
and :mod:`~fwsafe.check.nft_lines` (which file line made a rule), :mod:`~fwsafe.check.nft_listing`
(nft's listing and trace); :mod:`~fwsafe.check.unreproducible` names what the sandbox cannot
reproduce.
"""
