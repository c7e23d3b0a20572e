"""The dead-man's switch: the guard process (process.py), how it is started and talked to
(spawn.py), and its backstop (backstop.py)."""
