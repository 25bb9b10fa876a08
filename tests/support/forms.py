"""What the panel's forms post, for tests that post them as a browser would."""

from __future__ import annotations


def node_form_data(node, **changes) -> dict:
    """The node form as it is filled in for ``node`` (its tags included), with ``changes`` typed over it."""
    data = {
        "name": node.name,
        "host": node.host,
        "port": node.port,
        "ssh_user": node.ssh_user,
        "flake_attr": node.flake_attr,
        "repository": node.repository_id,
        "credential": node.credential_id,
        "tag_names": ", ".join(node.tags.values_list("name", flat=True)),
        "jump_host": node.jump_host_id or "",
    }
    return {**data, **changes}
