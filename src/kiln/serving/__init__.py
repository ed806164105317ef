"""Models: the model server that runs inside replicas, the model router, protocol adapters."""
