"""`python -m ml.training CONFIG [--resume RUN_DIR]` (what `drscreen train` calls)."""

import argparse
import logging

from ml.training.train import train_from_config

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("config")
parser.add_argument("--resume", default=None)
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
train_from_config(args.config, resume=args.resume)
