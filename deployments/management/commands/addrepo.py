"""Register a flake repository (git URL or local path)."""

from django.core.management.base import BaseCommand

from deployments import inventory
from deployments.models import Credential, Repository

from ._base import acting_user, clean, refused, require_capability


class Command(BaseCommand):
    help = "Add or update a flake repository."

    def add_arguments(self, parser):
        parser.add_argument("name")
        parser.add_argument("url", help="git URL or absolute local path")
        parser.add_argument("--branch", default="main")
        parser.add_argument("--deploy-key", help="name of an SSH-key credential for a private repository")
        parser.add_argument("--as", dest="as_user")

    def handle(self, name, url, branch, deploy_key, as_user, **opts):
        user = acting_user(as_user)
        require_capability(user, event="repository.created", object_type="repository")
        repo = Repository.objects.filter(name=name).first() or Repository(name=name)
        repo.url, repo.branch = url, branch
        repo.deploy_key = None
        if deploy_key:
            repo.deploy_key = Credential.objects.filter(name=deploy_key).first()
            if repo.deploy_key is None:
                raise refused(f"no credential {deploy_key!r}")
        clean(repo)
        inventory.save_object(repo, user=user, actor_kind=None if user else "cli")
        self.stdout.write(f"repository {repo.name}: {repo.url} ({repo.branch})")
