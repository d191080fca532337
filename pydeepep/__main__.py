"""`python -m pydeepep --version | --include-dir | --lib-dir | --cmake-dir`: what a C/C++ build needs."""

import argparse
import sys

import pydeepep


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pydeepep", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--version", action="store_true", help="the library version")
    group.add_argument("--include-dir", action="store_true", help="directory to pass as -I")
    group.add_argument("--lib-dir", action="store_true", help="directory holding libdeepep.so")
    group.add_argument("--cmake-dir", action="store_true", help="directory holding deepepConfig.cmake")
    args = parser.parse_args(argv)
    if args.version:
        print(pydeepep.__version__)
    elif args.include_dir:
        print(pydeepep.get_include())
    elif args.lib_dir:
        print(pydeepep.get_lib_dir())
    else:
        print(pydeepep.get_cmake_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
