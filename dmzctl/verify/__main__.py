"""`python -m dmzctl.verify`: the probe agent, as `python -m dmzctl.verify.agent` (kept for callers of the old name)."""

from .agent import main

main()
