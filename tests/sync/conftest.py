"""The sync tests' fixtures: testbed nodes in the inventory (shared with the integration tests)."""

from tests.integration.conftest import add_node  # noqa: F401  (the fixture)
