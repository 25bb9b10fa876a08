"""Errors a request can meet that the user must read: views show the message as it is."""


class RequestError(Exception):
    """A request that cannot be carried out; the message is shown to the user as is."""


class NodeBusy(RequestError):
    """The node already has a queued or running deployment (HTTP 409 on the API)."""
