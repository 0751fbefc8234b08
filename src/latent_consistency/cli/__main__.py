import sys

from latent_consistency.cli import main

sys.exit(main())
