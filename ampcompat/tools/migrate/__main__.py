"""``python -m ampcompat.tools.migrate PATH...`` (the same as ``python -m ampcompat migrate PATH...``)."""
import sys

from . import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
