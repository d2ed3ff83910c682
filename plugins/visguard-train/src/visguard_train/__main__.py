"""``python -m visguard_train ARGS`` is ``visguard train ARGS`` (handy under ``torchrun -m``)."""

import sys

from visguard.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
