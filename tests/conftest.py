"""Shared fixtures: users, inventory objects, and the NixOS-like testbed."""
