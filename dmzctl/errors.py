"""The one exception family dmzctl's commands turn into a message and an exit code.

Programming errors are not DmzctlError: they keep their traceback.
"""


class DmzctlError(Exception):
    """A failure the user can act on; str() is the one line shown to them."""

    exit_code = 1


class ConfigError(DmzctlError):
    """One or more problems in configuration files; each is one line."""

    exit_code = 2

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class HostError(DmzctlError):
    """The host is not as dmzctl needs it (daemon down, not root, missing file)."""

    exit_code = 3


class OwnershipError(DmzctlError):
    """An object of the same name exists on the host and is not dmzctl's."""

    exit_code = 4


class FirewallError(DmzctlError):
    """nftables refused the batch; nothing of it was committed."""

    exit_code = 5

    def __init__(self, message, batch=None):
        self.batch = batch
        super().__init__(message)


class LockedError(DmzctlError):
    """Another dmzctl run holds the DMZ's lock."""

    exit_code = 6
