"""`python -m skinaug`: the `skinaug` command (what launch.py runs under `accelerate launch -m`)."""
from skinaug.cli import main

main()
