"""Set where a node, or a tag's nodes by default, build their system (``change.set_build_location``).

``buildlocation --node web1 host --build-host builder``, ``buildlocation --tag web panel``,
``buildlocation --node web1 default`` (back to its tags' default). Without a location it says where the
node builds and why. Exit status: 0 done, 2 refused (see _base.py).
"""

from django.core.exceptions import PermissionDenied
from django.core.management.base import BaseCommand

from deployments import change
from deployments.errors import RequestError
from deployments.models import BuildLocation, Tag

from ._base import acting_user, lookup_node, refused


class Command(BaseCommand):
    help = "Where NODE (--node) or the nodes of TAG (--tag, their default) build: target, panel, host, default."

    def add_arguments(self, parser):
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--node", help="this node")
        which.add_argument("--tag", help="the default of the nodes with this tag")
        parser.add_argument("location", nargs="?", choices=[*BuildLocation.values, "default"])
        parser.add_argument("--build-host", default="", help="the build host (a registered node) for 'host'")
        parser.add_argument("--as", dest="as_user", help="act as this panel user (their permissions apply)")

    def handle(self, node, tag, location, build_host, as_user, **opts):
        user = acting_user(as_user)
        if node:
            obj = lookup_node(user, node)
        else:
            obj = Tag.objects.filter(name=tag).first()
            if obj is None:
                raise refused(f"no tag {tag!r}")
        if location is None:
            if not node:
                raise refused("name the tag's new location (target, panel, host or default)")
            where = change.effective_location(obj)
            self.stdout.write(f"{obj.name} builds {where.describe()} ({where.source})")
            return
        host = lookup_node(user, build_host) if build_host else None
        try:
            change.set_build_location(obj, "" if location == "default" else location, host, user=user, actor_kind="cli")
        except (RequestError, PermissionDenied) as exc:
            raise refused(f"refused: {exc}") from None
        if node:
            self.stdout.write(f"{obj.name} builds {change.effective_location(obj).describe()}")
        else:
            self.stdout.write(f"nodes tagged {obj.name} build {location} unless they say otherwise")
