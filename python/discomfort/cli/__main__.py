"""``python -m discomfort.cli``: the ``discomfort`` command."""

import sys

from . import main

sys.exit(main())
