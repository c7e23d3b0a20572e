"""fwsafe: change a firewall over SSH under a dead-man's switch."""

__version__ = "0.1.0"
