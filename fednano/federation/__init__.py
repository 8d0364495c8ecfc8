"""The federation layer on Flower 1.41's Message API: the only package that imports flwr."""
