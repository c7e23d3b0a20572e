"""`python3 -m fwsafe.rescue`: the offline rescue tool (see fwsafe.rescue.tool)."""

import sys

from fwsafe.rescue.tool import main

sys.exit(main())
