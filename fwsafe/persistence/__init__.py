"""What survives a reboot: the history of known-good states, the boot files, the boot recovery
unit.
"""
