"""One settings object for a federated run, shared by the ServerApp, the ClientApp and the runner.

In a simulation the apps get it directly; under a real Flower deployment (``flwr run``) both apps
rebuild it from the run config (``[tool.flwr.app.config]`` in the app's pyproject.toml, keys with
dashes, e.g. ``local-epochs = 5``) with :meth:`FederatedConfig.from_run_config`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from pimoe.federated.selection import POLICIES

STRATEGIES = ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg")
ROBUST = ("fedmedian", "fedtrimmedavg")  # coordinate-wise: they need every update in the clear
PARTITIONS = ("iid", "dirichlet")
ATTACKS = ("scale", "scale1e4", "signflip", "nan", "shape")
DIGITS_MODELS = ("mlp", "moe")  # the built-in digits task's models
SERVER_KEYS = ("result-path", "he-public-context-file")  # run-config keys only the ServerApp reads


@dataclass(frozen=True)
class FederatedConfig:
    """Everything that defines a run (defaults: the 100-client non-IID digits setting)."""

    clients: int = 100
    rounds: int = 30
    partition: str = "dirichlet"
    alpha: float = 0.5
    dropout: float = 0.0  # probability that a sampled client fails in a round
    strategy: str = "fedavg"
    proximal_mu: float = 0.01  # FedProx only
    fraction: float = 0.2  # clients sampled per round
    min_clients: int = 2
    selection: str = "uniform"  # or "size" / "loss" (see selection.py)
    fraction_evaluate: float = 0.0  # client-side evaluation (the server always evaluates centrally)
    local_epochs: int = 5
    lr: float = 0.1
    batch_size: int = 8
    task: str = "digits"  # the built-in task, or "module:attr" naming a FederatedTask (see task.py)
    model: str = "mlp"  # the digits task's model: "mlp" or "moe"
    personal_layers: str = (
        ""  # comma-separated parameter-name prefixes kept on clients, e.g. "moe.experts"
    )
    norm_factor: float = (
        10.0  # reject updates whose change norm > factor x the round's median (0 = off)
    )
    clip_norm: float = (
        0.0  # > 0: every client's change is clipped to this L2 norm (see bounding.py)
    )
    trim_beta: float = 0.2  # fedtrimmedavg: fraction cut from each tail of every coordinate
    malicious: str = (
        ""  # comma-separated client ids that send poisoned updates (tests / benchmarks)
    )
    attack: str = "scale"  # scale (x100), scale1e4, signflip, nan, shape (see client.poison)
    dp_epsilon: float = 0.0  # > 0: DP-SGD on every client with this target epsilon
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    secure_agg: bool = False
    he: bool = False
    audit_log: str = ""  # JSON-lines audit file ("" = none)
    seed: int = 0

    def __post_init__(self) -> None:
        per_round = self.clients_per_round if 0 < self.fraction <= 1 else 0  # NaN: no int
        checks = [
            (self.clients >= 2, f"clients must be >= 2, got {self.clients}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (
                self.task == "digits"
                or (
                    ":" in self.task
                    and not self.task.startswith(":")
                    and not self.task.endswith(":")
                ),
                f"task must be 'digits' or 'module:attr', got {self.task!r}",
            ),
            (
                self.model in DIGITS_MODELS,
                f"unknown model {self.model!r}; expected one of {DIGITS_MODELS}",
            ),
            (
                self.partition in PARTITIONS,
                f"unknown partition {self.partition!r}; expected one of {PARTITIONS}",
            ),
            (self.alpha > 0, f"alpha must be > 0, got {self.alpha}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (
                self.strategy in STRATEGIES,
                f"unknown strategy {self.strategy!r}; expected one of {STRATEGIES}",
            ),
            (self.proximal_mu >= 0, f"proximal_mu must be >= 0, got {self.proximal_mu}"),
            (0 < self.fraction <= 1, f"fraction must be in (0, 1], got {self.fraction}"),
            (
                self.selection in POLICIES,
                f"unknown selection {self.selection!r}; expected one of {POLICIES}",
            ),
            (
                0 <= self.fraction_evaluate <= 1,
                f"fraction_evaluate must be in [0, 1], got {self.fraction_evaluate}",
            ),
            (
                self.local_epochs >= 1 and self.batch_size >= 1 and 0 < self.lr < math.inf,
                "local_epochs, batch_size and lr must be positive (lr finite), got "
                f"{self.local_epochs}, {self.batch_size}, {self.lr}",
            ),
            (self.attack in ATTACKS, f"unknown attack {self.attack!r}; expected one of {ATTACKS}"),
            (
                self.norm_factor == 0 or self.norm_factor > 1,
                f"norm_factor must be > 1 (or 0: off), got {self.norm_factor}",
            ),
            (self.clip_norm >= 0, f"clip_norm must be >= 0 (0 = off), got {self.clip_norm}"),
            (0 <= self.trim_beta < 0.5, f"trim_beta must be in [0, 0.5), got {self.trim_beta}"),
            (
                not ((self.secure_agg or self.he) and self.strategy in ROBUST),
                f"{self.strategy} needs every update in the clear: it cannot run under secure or HE aggregation "
                "(use clip_norm there)",
            ),
            (
                0 <= self.dp_epsilon < math.inf,
                f"dp_epsilon must be a finite number >= 0 (0 = off), got {self.dp_epsilon}",
            ),
            (not (self.secure_agg and self.he), "choose one of secure_agg and he, not both"),
            (
                not self.secure_agg or per_round >= 3,
                f"secure aggregation needs at least 3 clients per round, got {per_round} "
                f"(max(min_clients, fraction x clients) = max({self.min_clients}, {self.fraction} x "
                f"{self.clients})): raise fraction or min_clients",
            ),
            (
                not (self.dp_epsilon > 0 and self.strategy == "fedprox"),
                "DP-SGD uses per-example gradients only, so FedProx's proximal term would be ignored: use fedavg with DP",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def clients_per_round(self) -> int:
        """Clients sampled per round: ``min(clients, max(min_clients, int(fraction * clients)))``."""
        return min(self.clients, max(self.min_clients, int(self.fraction * self.clients)))

    @property
    def personal(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.personal_layers.split(",") if p.strip())

    def is_personal(self, name: str) -> bool:
        """Whether parameter ``name`` belongs to a layer kept on the clients (``personal_layers``)."""
        return any(name == p or name.startswith(p + ".") for p in self.personal)

    @property
    def malicious_ids(self) -> frozenset[int]:
        return frozenset(int(p) for p in self.malicious.split(",") if p.strip())

    def to_run_config(self) -> dict[str, bool | float | int | str]:
        """Flower run-config form (dashed keys), the inverse of :meth:`from_run_config`."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_run_config(cls, run_config: dict) -> FederatedConfig:
        """Build from a Flower ``context.run_config``; unknown keys are an error, missing keys default.

        The ServerApp-only keys (``SERVER_KEYS``) are skipped: every app of a run sees the same config.
        """
        names = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in run_config.items():
            if key in SERVER_KEYS:
                continue
            name = key.replace("-", "_")
            if name not in names:
                raise ValueError(f"unknown run-config key {key!r}")
            values[name] = value
        return cls(**values)
