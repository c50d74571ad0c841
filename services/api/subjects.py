"""A subject's quotas as the API shows them: the groups that count, then the policy's
own evaluation over the rollups."""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from services.policy.config import PolicyConfig
from services.policy.quotas import SubjectQuotas, subject_quotas

from .records import reported_groups
from .tokens import Principal


async def quotas_of(
    pool: asyncpg.Pool,
    config: PolicyConfig,
    subject: str,
    viewer: Principal,
    now: datetime,
    max_skew: timedelta,
) -> SubjectQuotas:
    """Quotas of `subject` with its groups from the quota file, from integrators' reports,
    and from the identity provider when the subject is the one asking (JupyterHub)."""
    groups = set(await reported_groups(pool, subject))
    if viewer.subject == subject:
        groups.update(viewer.groups)
    return await subject_quotas(pool, config, subject, sorted(groups), now=now, max_skew=max_skew)
