"""What a person reads: the topology as a graph (diagram.py, emitted as DOT by dot.py), the policy in
the order the table applies it (policy.py), and the one-file HTML report (html.py).

Pure, like the rest of the core: configs, a host view and already-gathered facts come in, text
goes out. Running Graphviz's `dot` is dmzctl/host/graphviz.py's; gathering the live state for the
report is dmzctl/ops/report.py's.
"""
