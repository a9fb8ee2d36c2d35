"""pimoe.federated: federated training of any nn.Module (PiMoE models included) on Flower.

Import the pieces from their modules (``pimoe.federated.simulation.run_federated``,
``pimoe.federated.client.make_client_app``, ``pimoe.federated.server.make_server_app``, ...);
this package file imports nothing so that ``import pimoe`` stays free of Flower and Ray.
"""
