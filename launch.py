"""Start RLHF Studio: `python launch.py --db feedback.duckdb [--model embedded] [--share] ...`."""
from rlhf_studio.studio.cli import run

if __name__ == "__main__":
    run()
