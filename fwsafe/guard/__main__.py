"""`python -m fwsafe.guard --daemonize|--foreground STATE_DIR TX_ID`: the guard process."""

import sys

from fwsafe.guard.process import main

sys.exit(main())
