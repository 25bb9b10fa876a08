"""Teams and role grants over nodes (Django app label ``access``)."""
