"""The spine: the change, the transaction record, the state directory, snapshots, the three-way
merge and the revert, the manager. No CLI, no backend-specific code beyond the backend
interface.
"""
