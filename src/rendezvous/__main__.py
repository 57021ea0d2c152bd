"""``python -m rendezvous``: the same as the ``rendezvous`` command."""

import sys

from rendezvous.cli import main

if __name__ == "__main__":
    sys.exit(main())
