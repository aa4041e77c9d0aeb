#!/usr/bin/env bash
# The README's picture of the demo DMZ, drawn by Graphviz from dmzctl's own DOT (never by hand).
# The PNG records the digest of that DOT; tests/test_diagram.py checks it against the golden DOT
# (tests/golden/diagram/demo.dot), so a change to the diagram that is not redrawn fails the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
# A fixed config path, as the golden files have it: the picture does not depend on the checkout.
"$python" -m dmzctl.cli diagram examples/demo.toml -o docs/demo-diagram.png
echo "make-diagram: docs/demo-diagram.png ($(stat -c %s docs/demo-diagram.png) bytes)"
