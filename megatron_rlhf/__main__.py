import sys

from megatron_rlhf.cli import main

if __name__ == "__main__":
    sys.exit(main())
