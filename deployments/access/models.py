"""Teams and grants (filled in by the roles work)."""
