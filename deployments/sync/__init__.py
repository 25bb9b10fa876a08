"""Where the fleet is not what its repository says: sync status and drift, notifications, metrics."""
