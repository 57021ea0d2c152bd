"""One exception tree for the whole package.

    RendezvousError
    ├── RegistryError              the registry backend failed (unreachable, corrupt)
    │   ├── UnknownEntry           no entry with that ID
    │   └── DuplicateEntry         an entry with that ID already exists
    ├── ConfigError                a setting or file the user gave is unusable
    └── ProvisioningError          a provisioning file is malformed
"""


class RendezvousError(Exception):
    """Base of every error this package raises on purpose."""


class RegistryError(RendezvousError):
    """The registry backend could not do what was asked (unreachable, corrupt data)."""


class UnknownEntry(RegistryError):
    """No registry entry has this ID."""

    def __init__(self, uuid: str) -> None:
        super().__init__(f"no hidden server with ID {uuid!r} in the registry")
        self.uuid = uuid


class DuplicateEntry(RegistryError):
    """An entry with this ID already exists."""

    def __init__(self, uuid: str) -> None:
        super().__init__(f"a hidden server with ID {uuid!r} already exists")
        self.uuid = uuid


class ConfigError(RendezvousError):
    """A setting, flag or file given by the user cannot be used."""


class ProvisioningError(RendezvousError):
    """A provisioning file is missing fields or malformed."""
