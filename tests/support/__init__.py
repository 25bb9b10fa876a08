"""What the tests stand on: harnesses, helpers and the people of the suite, each defined once.

- ``fleet``: twelve tagged nodes for rollout tests and stand-ins for the worker that end what a rollout
  hands out.
- ``forms``: what the panel's forms post (``node_form_data``).
- ``keys``: SSH keys, fresh (in memory or by ssh-keygen) or a fixed host key.
- ``net``: a free port, one that refuses, a server that hangs up at once.
- ``panel``: a real panel (daphne + qcluster) and a browser-like HTTP/WebSocket client.
- ``personas``: alice, bob, charlie, carol, zed and the permission matrix's role personas.
- ``processes``: processes by owner (below a pid, in a network namespace, by session environment).
- ``services``: private PostgreSQL and Redis servers a test or bench starts and stops itself.
- ``sshd``: the one throwaway OpenSSH server harness.
- ``testbed``: NixOS-like nodes over real SSH (``testbed/README.md``).
- ``wait``: ``wait_for``, the one polling loop.
- ``world``: the roles tests' inventory of nodes, teams and personas.

The fixtures over these live in ``tests/conftest.py``.
"""
