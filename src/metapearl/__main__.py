import sys

from metapearl.cli import main

sys.exit(main())
