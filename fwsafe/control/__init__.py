"""What drives a transaction through core and the guard: the apply flow
(:mod:`~fwsafe.control.flow`: checks, snapshot, record, the guard started and told to go) and
the Manager (:mod:`~fwsafe.control.manager`: confirm, revert, extend, status, recover). It sits
above both, so that `core` (the change, the record, the snapshots, the merge, the revert)
depends on nothing above it and the guard uses core alone."""
