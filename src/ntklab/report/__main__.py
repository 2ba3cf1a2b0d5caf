"""``python -m ntklab.report FOLDER [--out DIR] [--metric KEY ...]``: see :mod:`ntklab.report`."""

import logging

from ntklab.report import main

# The page and the printed lines name every skipped run; the library's warnings would repeat them.
logging.basicConfig(level=logging.ERROR, format="%(levelname)s: %(name)s: %(message)s")
main()
