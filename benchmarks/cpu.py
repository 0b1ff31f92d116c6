"""CPU benchmarks: ``python benchmarks/cpu.py --quick`` (the suite lives in batchnorm.bench)."""

import argparse
import sys

from batchnorm import bench

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    bench.add_arguments(parser)
    sys.exit(bench.run(parser.parse_args()))
