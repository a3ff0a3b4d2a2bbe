"""``python -m analyses``: regenerate the paper (see :mod:`analyses.paper`)."""

import sys

from .paper import main

sys.exit(main())
