"""A stdout callback for the tests: the whole run as one JSON document, in the shape of
ansible.posix's `json` callback ({"plays": [{"tasks": [{"task", "hosts": {host: result}}]}],
"stats": {host: {ok, changed, failures, ...}}}). ansible-core ships no JSON callback (it moved
to the ansible.posix collection) and the test environment installs ansible-core alone."""

from __future__ import annotations

import json

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "dmzctl_json"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plays = []

    def v2_playbook_on_play_start(self, play):
        self.plays.append({"play": {"name": play.get_name()}, "tasks": []})

    def _record(self, result, **extra):
        if not self.plays:
            self.plays.append({"play": {"name": ""}, "tasks": []})
        entry = {"task": {"name": result._task.get_name()},
                 "hosts": {result._host.get_name(): dict(result._result, **extra)}}
        self.plays[-1]["tasks"].append(entry)

    def v2_runner_on_ok(self, result, **kwargs):
        self._record(result)

    def v2_runner_on_failed(self, result, ignore_errors=False, **kwargs):
        self._record(result, failed=True)

    def v2_runner_on_skipped(self, result, **kwargs):
        self._record(result, skipped=True)

    def v2_runner_on_unreachable(self, result, **kwargs):
        self._record(result, unreachable=True)

    def v2_playbook_on_stats(self, stats):
        summary = {host: stats.summarize(host) for host in sorted(stats.processed)}
        self._display.display(json.dumps({"plays": self.plays, "stats": summary}, default=str))
