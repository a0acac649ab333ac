"""Foundation benchmark: images/s, FLOPs and recording overhead on the real backbone.

Run: python benchmarks/bench_foundation.py [--batch-size 16] [--repeats 7]
(the same as `tokvis bench`).  Prints figures; nothing here is a test.
"""

import sys

from tokvis.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
