"""Start RLHF Studio: `python launch.py --db feedback.duckdb [--model embedded] [--share] ...`."""
import sys

from studio.cli import main

if __name__ == "__main__":
    sys.exit(main())
