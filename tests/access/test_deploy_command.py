"""``manage.py deploy NODE --as USER`` obeys the same gate as the pages."""

import pytest
from django.core.management import CommandError, call_command

from deployments.audit.models import AuditEvent
from deployments.models import Deployment
from tests.support.personas import grant

pytestmark = pytest.mark.django_db


def test_it_queues_a_deployment_for_a_deployer(world, users):
    _, bob, _ = users
    grant(bob, "deployer", tag="web")
    call_command("deploy", "web-1", "--as", "bob")
    deployment = Deployment.objects.get(node__name="web-1", status="queued")
    assert deployment.requested_by == bob and deployment.trigger == "cli"


def test_it_refuses_a_viewer_and_audits_the_refusal(world, users, capsys):
    _, bob, _ = users
    grant(bob, "viewer", tag="web")
    with pytest.raises(SystemExit) as exit_:
        call_command("deploy", "web-1", "--as", "bob")
    assert exit_.value.code == 2
    assert "refused" in capsys.readouterr().err
    assert AuditEvent.objects.filter(action="deployment.requested", outcome="denied", actor_name="bob").exists()
    assert not Deployment.objects.filter(status="queued").exists()


def test_a_node_bob_may_not_see_does_not_exist_for_him(world, users):
    _, bob, _ = users
    grant(bob, "deployer", tag="web")
    with pytest.raises(CommandError, match="no node 'db-1'"):
        call_command("deploy", "db-1", "--as", "bob")
