"""The commands' work, one module per family, each built on state.observe/diff:
lifecycle (up, down, kill, restart, the firewall alone), inspect (status, check),
plan (what up would do, as diffs), guard, boot and install. cli.py only calls them."""
