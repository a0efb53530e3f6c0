"""Generated gRPC stubs for tandem.v1 (`make proto` rebuilds them from proto/tandem/v1)."""
