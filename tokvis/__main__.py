import sys

from tokvis.cli import main

sys.exit(main())
