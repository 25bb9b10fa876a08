"""Changes to user accounts, on the chain: who was created, changed, deleted, given a new password or group.

Accounts change in many places the panel does not own (the Django admin,
``createsuperuser``, ``changepassword``, ``manage.py shell``), none through one
function, so these are signal handlers on the user model, its group and
permission relations, and Django's ``Group`` (connected in
``AuditConfig.ready``):

* ``user.created`` / ``user.deleted``: the account's non-secret fields;
* ``user.changed``: before/after of each changed field among ``TRACKED``
  (names, e-mail, the active, staff and superuser flags); a save of
  ``last_login`` alone (every sign-in) is not a change;
* ``user.password_changed``: the stored hash changed (``set_password``,
  ``set_unusable_password``); only whether the new one is usable is kept,
  never the hash.  Django's re-hash of an old-format hash at sign-in (same
  password) is not a change;
* ``user.groups_changed``, ``user.permissions_changed``,
  ``group.permissions_changed``: what was added or removed, by name;
* ``group.created`` / ``group.changed`` / ``group.deleted``.

The actor is the request's user (the admin), or, outside a request, the
command line (``cli``, with the OS user and host: ``writer.command_line_origin``).
The event is written in the caller's transaction when there is one (the
admin's, the panel's); a lone ``save()`` outside any (``changepassword``)
commits first and its event right after.  ``QuerySet.update()`` and raw SQL
send no signal: the panel uses neither on accounts.
"""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import get_hasher, identify_hasher, is_password_usable
from django.contrib.auth.models import Group
from django.db import router, transaction
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete, pre_save

from .context import current
from .writer import record

TRACKED = ("username", "email", "first_name", "last_name", "is_active", "is_staff", "is_superuser")
_WATCHED = {*TRACKED, "password"}


def connect() -> None:
    User = get_user_model()
    pre_save.connect(user_before_save, sender=User, dispatch_uid="audit-user-pre-save")
    post_save.connect(user_saved, sender=User, dispatch_uid="audit-user-saved")
    post_delete.connect(user_deleted, sender=User, dispatch_uid="audit-user-deleted")
    m2m_changed.connect(
        _relation("groups", "user.groups_changed"),
        sender=User.groups.through,
        dispatch_uid="audit-user-groups",
        weak=False,
    )
    m2m_changed.connect(
        _relation("user_permissions", "user.permissions_changed"),
        sender=User.user_permissions.through,
        dispatch_uid="audit-user-permissions",
        weak=False,  # the handler is made here: nothing else holds it
    )
    pre_save.connect(group_before_save, sender=Group, dispatch_uid="audit-group-pre-save")
    post_save.connect(group_saved, sender=Group, dispatch_uid="audit-group-saved")
    pre_delete.connect(group_before_delete, sender=Group, dispatch_uid="audit-group-pre-delete")
    post_delete.connect(group_deleted, sender=Group, dispatch_uid="audit-group-deleted")
    m2m_changed.connect(
        _relation("permissions", "group.permissions_changed"),
        sender=Group.permissions.through,
        dispatch_uid="audit-group-permissions",
        weak=False,
    )


def _actor() -> dict:
    """The request's user; anonymous in a request without one; the command line outside any request."""
    request = current.get().request
    if request is None:
        return {"actor_kind": "cli"}
    user = getattr(request, "user", None)
    if user is not None and user.is_authenticated:
        return {"user": user}
    return {"actor_kind": "anonymous"}


def _record(event: str, obj, details: dict, using: str | None = None) -> None:
    """Inside the caller's transaction if there is one (a failure then undoes the change too), else in its own."""
    using = using or router.db_for_write(type(obj))
    if transaction.get_connection(using).in_atomic_block:
        record(event, obj=obj, details=details, **_actor())
    else:
        with transaction.atomic(using=using):
            record(event, obj=obj, details=details, **_actor())


def _fields(user, names=TRACKED) -> dict:
    return {name: getattr(user, name) for name in names}


# --- users -------------------------------------------------------------------------------


def user_before_save(sender, instance, raw=False, update_fields=None, using=None, **kwargs) -> None:
    """Keep the stored row's watched fields to compare with after the save (none for sign-ins' last_login)."""
    instance._audit_before = None
    if raw or instance._state.adding or instance.pk is None:
        return
    if update_fields is not None and not _WATCHED & set(update_fields):
        return
    instance._audit_before = sender._default_manager.using(using).filter(pk=instance.pk).values(*_WATCHED).first()


def user_saved(sender, instance, created, raw=False, update_fields=None, using=None, **kwargs) -> None:
    if raw:
        return
    if created:
        details = {"after": _fields(instance), "password": "set" if instance.has_usable_password() else "unusable"}
        _record("user.created", instance, details, using)
        return
    before = instance.__dict__.pop("_audit_before", None)
    if before is None:
        return
    saved = TRACKED if update_fields is None else [name for name in TRACKED if name in update_fields]
    changed = [name for name in saved if before[name] != getattr(instance, name)]
    if changed:
        details = {"before": {k: before[k] for k in changed}, "after": _fields(instance, changed)}
        _record("user.changed", instance, details, using)
    password_saved = update_fields is None or "password" in update_fields
    if password_saved and before["password"] != instance.password and not _rehash(before["password"], instance):
        _record("user.password_changed", instance, {"usable": instance.has_usable_password()}, using)


def _rehash(old: str, user) -> bool:
    """Django's upgrade of an old-format hash at sign-in: the same password, so not a change.

    ``check_password()`` calls ``set_password()`` and clears the raw password
    it keeps (``_password``) before saving; a real change keeps it until after.
    """
    if user._password is not None or not (is_password_usable(old) and user.has_usable_password()):
        return False
    try:
        hasher, preferred = identify_hasher(old), get_hasher("default")
    except ValueError:
        return False
    return hasher.algorithm != preferred.algorithm or preferred.must_update(old)


def user_deleted(sender, instance, using=None, **kwargs) -> None:
    _record("user.deleted", instance, {"before": _fields(instance)}, using)


# --- groups ------------------------------------------------------------------------------


def group_before_save(sender, instance, raw=False, using=None, **kwargs) -> None:
    instance._audit_name = None
    if not raw and not instance._state.adding and instance.pk is not None:
        instance._audit_name = (
            sender._default_manager.using(using).filter(pk=instance.pk).values_list("name", flat=True).first()
        )


def group_saved(sender, instance, created, raw=False, using=None, **kwargs) -> None:
    if raw:
        return
    if created:
        _record("group.created", instance, {"name": instance.name}, using)
        return
    before = instance.__dict__.pop("_audit_name", None)
    if before is not None and before != instance.name:
        _record("group.changed", instance, {"before": {"name": before}, "after": {"name": instance.name}}, using)


def group_before_delete(sender, instance, using=None, **kwargs) -> None:
    # Its memberships go with it, without an m2m signal: name them in the deletion's event.
    instance._audit_members = sorted(instance.user_set.using(using).values_list("username", flat=True))


def group_deleted(sender, instance, using=None, **kwargs) -> None:
    details = {"name": instance.name, "members": instance.__dict__.pop("_audit_members", [])}
    _record("group.deleted", instance, details, using)


# --- memberships (m2m) --------------------------------------------------------------------


def _label(obj) -> str:
    """A group by name, a permission as ``app_label.codename`` (what has_perm() takes)."""
    if isinstance(obj, Group):
        return obj.name
    return f"{obj.content_type.app_label}.{obj.codename}"


def _relation(field: str, event: str):
    """An m2m_changed handler for ``owner.<field>`` (a user's groups or permissions, a group's permissions).

    Forward (``user.groups.add(g)``): one event for the owner naming what was
    added or removed.  Reverse (``group.user_set.add(u1, u2)``): one event per
    owner.  ``clear()`` names what was there before.
    """

    def related(objects) -> list[str]:
        if objects.model.__name__ == "Permission":
            objects = objects.select_related("content_type")
        return sorted(_label(obj) for obj in objects)

    def handler(sender, instance, action, reverse, model, pk_set, using=None, **kwargs) -> None:
        if action == "pre_clear":
            if reverse:  # instance is the group or permission; the owners are about to lose it
                instance._audit_cleared = list(model._default_manager.using(using).filter(**{field: instance}))
            else:
                instance._audit_cleared = related(getattr(instance, field).using(using).all())
            return
        if action not in ("post_add", "post_remove", "post_clear"):
            return
        key = "added" if action == "post_add" else "removed"
        if reverse:
            owners = (
                instance.__dict__.pop("_audit_cleared", [])
                if action == "post_clear"
                else list(model._default_manager.using(using).filter(pk__in=pk_set or ()))
            )
            for owner in owners:
                _record(event, owner, {key: [_label(instance)]}, using)
            return
        if action == "post_clear":
            names = instance.__dict__.pop("_audit_cleared", [])
        else:
            names = related(model._default_manager.using(using).filter(pk__in=pk_set or ()))
        if names:
            _record(event, instance, {key: names}, using)

    return handler
