"""The people of the test suite: one name, one meaning, in every test (``PEOPLE``).

alice is the superuser, bob and charlie are signed in without any grant, carol
is the auditor, wendy administers the nodes tagged ``web``, zed is in the team
``ops`` that no other persona is in (World).
Each has the password ``password(name)`` and the address ``<name>@example.com``.
The root conftest offers each of alice, bob, charlie, carol and wendy as a
fixture of that name, and ``users`` is (alice, bob, charlie).

``ROLES`` are the permission matrix's personas (tests/access/test_matrix.py):
who they are is what they may do.  Three are the people above ("superuser" is
alice, "nobody" bob, "auditor" carol); the others are users named after their
role, each in a team of their own with one grant.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model

PEOPLE = {
    "alice": "superuser",
    "bob": "signed in, in no team and holding no grant",
    "charlie": "signed in, no grant: a second plain user",
    "carol": "auditor: member of the team auditors, which holds the global auditor role",
    "wendy": "admin of the nodes tagged web, in the team web-team",
    "zed": "member of the team ops (viewer of every node)",
}
SUPERUSERS = {"alice"}
# Persona -> (role, the rest of its grant): the one grant a persona is created with.
GRANTS = {
    "carol": ("auditor", {"team_name": "auditors"}),
    "wendy": ("admin", {"tag": "web", "team_name": "web-team"}),
}

# Role persona -> (role, scope) of its one grant; None: no grant at all.
ROLES = {
    "anonymous": None,
    "nobody": None,
    "viewer-node": ("viewer", "node"),
    "viewer-tag": ("viewer", "tag"),
    "viewer-all": ("viewer", "all"),
    "deployer-node": ("deployer", "node"),
    "deployer-tag": ("deployer", "tag"),
    "deployer-all": ("deployer", "all"),
    "admin-node": ("admin", "node"),
    "admin-tag": ("admin", "tag"),
    "admin-all": ("admin", "all"),
    "auditor": ("auditor", "all"),
    "superuser": None,
}
# The role personas who are people above.
ROLE_PEOPLE = {"superuser": "alice", "nobody": "bob", "auditor": "carol"}
RANK = {"viewer": 1, "deployer": 2, "admin": 3, "auditor": 1}


def password(name: str) -> str:
    return f"{name}-password-1"


def person(name: str):
    """The user ``name`` as the table above describes them, created on first use."""
    User = get_user_model()
    existing = User.objects.filter(username=name).first()
    if existing is not None:
        return existing
    if name in SUPERUSERS:
        return User.objects.create_superuser(name, f"{name}@example.com", password(name))
    user = User.objects.create_user(name, f"{name}@example.com", password(name))
    if name in GRANTS:
        role, where = GRANTS[name]
        grant(user, role, **where)
    return user


def grant(user, role: str, *, node=None, tag: str = "", team_name: str | None = None):
    """Put ``user`` in a team (created if needed) holding ``role`` over a node, a tag, or all nodes."""
    from deployments.access.models import Grant, Team

    team, _ = Team.objects.get_or_create(name=team_name or f"team-{user.username}")
    team.members.add(user)
    scope = "node" if node is not None else "tag" if tag else "all"
    return Grant.objects.create(team=team, role=role, scope=scope, node=node, tag=tag)


def level(role_persona: str, in_scope: bool) -> int:
    """What a role persona may do on a node inside or outside its grant's scope: 0 nothing, 1 view, 2 deploy, 3 administer."""
    if role_persona == "superuser":
        return 3
    held = ROLES[role_persona]
    if held is None:
        return 0
    role, scope = held
    return RANK[role] if scope == "all" or in_scope else 0


def role_persona(name: str, *, node, tag: str):
    """The user playing role persona ``name`` (None for anonymous); a node or tag grant covers ``node`` / ``tag``."""
    if name == "anonymous":
        return None
    if name in ROLE_PEOPLE:
        return person(ROLE_PEOPLE[name])
    role, scope = ROLES[name]
    user = get_user_model().objects.create_user(name, f"{name}@example.com", password(name))
    grant(user, role, node=node if scope == "node" else None, tag=tag if scope == "tag" else "")
    return user
