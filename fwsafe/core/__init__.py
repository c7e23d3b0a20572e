"""The spine: the change, the transaction record, the state directory, snapshots, the three-way
merge, the revert and the recover of a transaction left without its guard. It depends on
nothing above it (no CLI, no guard, no backend-specific code beyond the backend interface):
what it needs from there is handed in by its callers; what drives the guard is fwsafe.control.
"""
