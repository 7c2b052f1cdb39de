"""Every error dreamd raises on purpose descends from DreamdError.

    DreamdError
    ├── ConfigError                  a config file or value is wrong (names the key)
    ├── UsageError                   a command was asked for what it does not do (`dreamd sql`
    │                                writing, an unknown revision): says what to do instead
    ├── LedgerError                  the ledger refused a change
    │   ├── IllegalTransitionError   the edge is not in the table of legal transitions
    │   ├── StaleTransitionError     the row was not in the expected state (someone else moved it)
    │   └── LedgerUnusableError      the ledger file cannot be opened or written as it is
    │                                (garbage, damaged, read-only): names it and what to do

The CLI exits 2 on ConfigError, UsageError and LedgerUnusableError (the user must change
something first), 1 on any other DreamdError.
    ├── DaemonError                  the daemon cannot start (already running, bad data dir)
    ├── BackendError                 a keyframe backend failed
    │   ├── TransientBackendError    worth retrying: refused, reset, timeout, 5xx
    │   └── PermanentBackendError    retrying cannot help: a rejected workflow, a bad image
    ├── CodecError                   a latent codec cannot be built or loaded (names the file)
    ├── EmbedderError                an embedder cannot be used here (names the file it needs);
    │                                the memory falls back to the descriptor
    └── ModelError                   an in-process diffusion model cannot be found or used
        │                            (names the file and the fix); the dream goes on with the
        │                            procedural backend meanwhile
        └── ModelFetchError          `dreamd models pull` could not fetch a model, or what came
                                     does not match the hub's listing (names the file)

The docstring of each class is its default message.
"""

from __future__ import annotations


class DreamdError(Exception):
    """dreamd failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(DreamdError):
    """The configuration is invalid."""


class UsageError(DreamdError):
    """This command cannot do that."""


class LedgerError(DreamdError):
    """The ledger refused a change."""


class LedgerUnusableError(LedgerError):
    """The ledger file cannot be used as it is."""


class IllegalTransitionError(LedgerError):
    """This state change is not in the table of legal transitions."""


class StaleTransitionError(LedgerError):
    """The row was not in the expected state: another worker moved it first."""


class DaemonError(DreamdError):
    """The daemon cannot start."""


class BackendError(DreamdError):
    """A keyframe backend failed."""


class TransientBackendError(BackendError):
    """A keyframe backend failed in a way worth retrying."""


class KeyframeInterruptedError(TransientBackendError):
    """The keyframe in flight was interrupted for a pause (the guard freeing the GPU): its
    row is postponed with its attempt given back, never counted as a failure."""


class PermanentBackendError(BackendError):
    """A keyframe backend failed in a way retrying cannot help."""


class CodecError(DreamdError):
    """A latent codec cannot be built or loaded."""


class EmbedderError(DreamdError):
    """An embedder cannot be used here (no weights on this machine, or they do not load)."""


class ModelError(DreamdError):
    """The diffusion model cannot be found or used."""


class ModelFetchError(ModelError):
    """A model could not be fetched from the hub, or what came does not check out."""
