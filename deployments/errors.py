"""Errors a request can meet that the user must read: views show the message as it is."""


class RequestError(Exception):
    """A request that cannot be carried out; the message is shown to the user as is."""


class NodeBusy(RequestError):
    """The node already has a queued or running deployment (HTTP 409 on the API)."""


class AwaitingApproval(RequestError):
    """The request touches a protected node: it was held as an approval request, nothing started.

    ``approval`` is the held request (``deployments.gitops.models.ApprovalRequest``); pages show it,
    the API answers 202 with it, ``manage.py deploy`` prints it.
    """

    def __init__(self, approval) -> None:
        self.approval = approval
        super().__init__(
            f"Awaiting approval #{approval.pk}: a protected node is touched, so a second person with deploy "
            "rights must approve before anything starts."
        )
