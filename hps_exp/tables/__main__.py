"""`python -m hps_exp.tables SWEEP_DIR ...` (hps_exp/tables/cli.py)."""
import sys

from hps_exp.tables.cli import main

if __name__ == "__main__":
    sys.exit(main())
