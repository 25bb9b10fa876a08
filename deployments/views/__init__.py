"""The panel's HTTP views: ``pages`` (nodes, deployments) and ``api`` (JSON)."""
