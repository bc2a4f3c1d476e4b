"""Errors that cross the wire: the server raises them at the edge, the client re-raises them by name."""


class MeadowError(Exception):
    """Base of every error Meadow reports to a user."""


class BadRequest(MeadowError):
    """The request is malformed or asks for something this server cannot do; the sender should not retry here."""


class ServerBusy(MeadowError):
    """The server is healthy but lacks room (cache, sessions) right now; another server may have it."""


class RemoteError(MeadowError):
    """A server answered with an error; `kind` names the server-side error class."""

    def __init__(self, message: str, kind: str = "MeadowError", peer: str | None = None):
        super().__init__(f"{kind} from {peer}: {message}" if peer else f"{kind}: {message}")
        self.kind, self.peer, self.remote_message = kind, peer, message


class WrongServer(MeadowError):
    """This server does not (or no longer) hold the requested blocks: the client's routes are stale; retry elsewhere."""


class ServerLeaving(MeadowError):
    """The server is shutting down or moving to other blocks: its sessions end now; retry elsewhere at once."""
