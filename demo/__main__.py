"""`make demo`: bring the local stack up and say honestly what is there."""
from __future__ import annotations

import sys

from infra import stack


def main() -> int:
    print("== make demo: starting the local stack", flush=True)
    stack.up()
    print("\n== what is running", flush=True)
    stack.status()
    print("\nThe stack stays up for exploring; `make down` stops it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
