"""The `parassm` command (the console script `parassm`, and `python -m parassm`)."""

from ._front import main as main
