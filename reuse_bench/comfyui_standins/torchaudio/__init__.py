"""Import-only stand-in; see ``_standin.py`` beside this package."""

import sys

from _standin import make_standin

make_standin(sys.modules[__name__])
