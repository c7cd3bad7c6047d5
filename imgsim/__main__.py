"""`python -m imgsim ...`: the same command line as the `imgsim` script."""

from .cli import main

main()
