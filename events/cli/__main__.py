"""``python -m events.cli``: the ``evp`` command."""

import sys

from events.cli.main import main

sys.exit(main())
