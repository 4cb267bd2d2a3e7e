"""`python -m hps_exp.sweep NAME ...` (hps_exp/sweep/cli.py)."""
import sys

from hps_exp.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
