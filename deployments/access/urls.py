"""Team and grant pages (namespace ``access``)."""

app_name = "access"
urlpatterns: list = []
