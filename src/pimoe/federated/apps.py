"""Module-level Flower apps for a real deployment (``flwr run`` against a SuperLink).

Point a Flower app's pyproject.toml at them (see docs/federated.md)::

    [tool.flwr.app.components]
    serverapp = "pimoe.federated.apps:server_app"
    clientapp = "pimoe.federated.apps:client_app"

Both read their settings from the run config (``[tool.flwr.app.config]``, the dashed field
names of :class:`~pimoe.federated.config.FederatedConfig`); each SuperNode reads its shard from
``--node-config "partition-id=K num-partitions=N"``.
"""

from pimoe.federated.client import make_client_app
from pimoe.federated.server import make_server_app

client_app = make_client_app()
server_app = make_server_app()
