"""The audit trail: append-only, hash-chained events (Django app label ``audit``)."""
