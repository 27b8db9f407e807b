"""``python -m d2r.cli``: the ``d2r`` command."""

import sys

from . import main

sys.exit(main())
