"""The administration console (clinics, users, routing rules, SLA targets) and the audit
trail search for quality control."""

from worklist.admin.audit_search import (
    AuditFilter,
    audit_events,
    iter_audit_events,
    require_audit_access,
    verify_audit_chain,
)
from worklist.admin.service import (
    create_clinic,
    create_user,
    get_routing_rules,
    get_sla_targets,
    list_clinics,
    list_users,
    put_routing_rules,
    put_sla_targets,
    reset_password,
    save_organization,
    update_clinic,
    update_user,
)

__all__ = [
    "AuditFilter",
    "audit_events",
    "create_clinic",
    "create_user",
    "get_routing_rules",
    "get_sla_targets",
    "iter_audit_events",
    "list_clinics",
    "list_users",
    "put_routing_rules",
    "put_sla_targets",
    "require_audit_access",
    "reset_password",
    "save_organization",
    "update_clinic",
    "update_user",
    "verify_audit_chain",
]
