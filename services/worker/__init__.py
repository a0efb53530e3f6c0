"""The worker process: one engine behind a gRPC servicer, a KV data plane and a Redis record."""
