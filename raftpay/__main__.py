"""`python3 -m raftpay ...` is the same as the `raftpay` console script."""

from .cli import main

main()
