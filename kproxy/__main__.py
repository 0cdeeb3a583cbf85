"""``python -m kproxy`` runs the command line."""

import sys

from kproxy.cli import main

sys.exit(main())
