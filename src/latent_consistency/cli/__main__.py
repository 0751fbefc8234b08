import sys

from latent_consistency.cli import entry

sys.exit(entry())
