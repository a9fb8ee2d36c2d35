"""A data owner's DP budget, kept on disk: the accountant history survives restarts.

Opacus's accountant lives in memory, so a process that restarts (a federated client, a resumed
training job) would start again at ε = 0 and could spend its budget twice. A
:class:`PrivacyBudget` stores the history ``[(noise multiplier, sampling rate, steps), ...]`` of
every DP-SGD step its owner has taken in one JSON file, and refuses steps that would take ε past
the budget. Steps are *reserved* (written) before they are trained, so a crash during training
can only over-count, never forget.

The file (written atomically) is::

    {"format": "pimoe-dp-budget", "version": 1, "owner": "client-3", "accountant": "rdp",
     "history": [[1.07, 0.5, 40], ...], "sha256": "<hash of the fields above>"}

A file that is not JSON, lacks a field, fails its hash (corrupted or edited by hand), names
another owner or another accountant raises :class:`~pimoe.privacy.crypto.IntegrityError` (a
ValueError): it is never silently reset. The hash catches accidents; someone who can write the
file can also delete it, which no local check can tell from a new owner. One process per owner
at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from pimoe.io import atomic_write_text
from pimoe.privacy.crypto import IntegrityError
from pimoe.privacy.dp import Accountant, BudgetExhausted, Step, epsilon_spent

FORMAT = "pimoe-dp-budget"
VERSION = 1
_EPS_SLACK = 1e-9  # relative: float noise in the accountant's sums


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class PrivacyBudget:
    """The ε budget of one data owner and the DP-SGD steps it has spent, optionally persisted.

    Args:
        epsilon, delta: the budget ``(ε, δ)``.
        path: the owner's JSON file (read if it exists, written on every :meth:`reserve`);
            ``None`` keeps the history in memory only.
        owner: a name stored in the file and checked on load (e.g. ``"client-3"``), so one
            owner's file is not taken for another's.
        accountant: ``"rdp"`` or ``"prv"`` (Opacus); stored and checked on load.
        history: steps already spent, for a budget kept elsewhere (only without ``path``).
    """

    def __init__(
        self,
        epsilon: float,
        delta: float,
        path: str | os.PathLike[str] | None = None,
        *,
        owner: str = "",
        accountant: Accountant = "rdp",
        history: Sequence[Step] = (),
    ) -> None:
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if accountant not in ("rdp", "prv"):
            raise ValueError(f"unknown accountant {accountant!r}; expected 'prv' or 'rdp'")
        self.epsilon, self.delta, self.owner, self.accountant = (
            float(epsilon),
            float(delta),
            owner,
            accountant,
        )
        if path is not None and history:
            raise ValueError("give a budget file or an in-memory history, not both")
        self.path = Path(path) if path is not None else None
        self._history = [(float(n), float(q), int(k)) for n, q, k in history]
        if self.path is not None and self.path.exists():
            self._history = self._load()

    @property
    def history(self) -> list[Step]:
        """``[(noise multiplier, sampling rate, steps), ...]`` of every reserved step, oldest first."""
        return list(self._history)

    def spent(self, extra: Sequence[Step] = ()) -> float:
        """ε at ``delta`` of the history (plus ``extra`` steps not yet reserved)."""
        return epsilon_spent([*self._history, *extra], self.delta, self.accountant)

    def reserve(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Record ``steps`` DP-SGD steps before they are taken (persisted first); return the new ε.

        Raises:
            BudgetExhausted: they would take ε past the budget (nothing is recorded).
            ValueError: a non-positive noise, a rate outside (0, 1] or a step count below 1.
        """
        if not noise_multiplier > 0 or not 0 < sample_rate <= 1 or int(steps) != steps or steps < 1:
            raise ValueError(
                f"need noise > 0, rate in (0, 1], steps >= 1; got {noise_multiplier}, {sample_rate}, {steps}"
            )
        step = (float(noise_multiplier), float(sample_rate), int(steps))
        after = self.spent([step])
        if after > self.epsilon * (1 + _EPS_SLACK):
            raise BudgetExhausted(
                f"{self.owner or 'this owner'} has spent epsilon {self.spent():.3f} of "
                f"{self.epsilon}; {steps} more steps would reach {after:.3f}, which exceeds the budget"
            )
        history = [*self._history]
        if (
            history and history[-1][:2] == step[:2]
        ):  # same noise and rate: one entry, as Opacus keeps it
            history[-1] = (step[0], step[1], history[-1][2] + step[2])
        else:
            history.append(step)
        if self.path is not None:
            body = {
                "format": FORMAT,
                "version": VERSION,
                "owner": self.owner,
                "accountant": self.accountant,
                "history": [list(h) for h in history],
            }
            atomic_write_text(
                self.path, json.dumps({**body, "sha256": _digest(body)}, sort_keys=True) + "\n"
            )
        self._history = history
        return after

    def _load(self) -> list[Step]:
        assert self.path is not None
        where = f"DP budget file {self.path}"
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            stored = data.pop("sha256")
            fields = (
                data["format"],
                data["version"],
                data["owner"],
                data["accountant"],
                data["history"],
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise IntegrityError(
                f"{where}: not a DP budget file (corrupted or truncated); "
                "refusing to reset the budget: restore it or remove it deliberately"
            ) from None
        if fields[:2] != (FORMAT, VERSION):
            raise IntegrityError(f"{where}: unknown format {fields[:2]}")
        if stored != _digest(data):
            raise IntegrityError(
                f"{where}: hash mismatch (edited or corrupted); refusing to reset the budget"
            )
        if fields[2] != self.owner:
            raise IntegrityError(f"{where}: belongs to owner {fields[2]!r}, not {self.owner!r}")
        if fields[3] != self.accountant:
            raise IntegrityError(
                f"{where}: kept with accountant {fields[3]!r}, not {self.accountant!r}"
            )
        try:
            return [(float(n), float(q), int(k)) for n, q, k in fields[4]]
        except (TypeError, ValueError):
            raise IntegrityError(f"{where}: history entries must be [noise, rate, steps]") from None
