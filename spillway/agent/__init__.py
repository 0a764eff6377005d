"""The node agent: GPU inventory, the lease pool, its persistence and its gRPC service."""
