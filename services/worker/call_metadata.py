"""gRPC metadata keys of the router ↔ worker protocol, shared by both ends."""

RESERVED_KEY = "tandem-reserved"    # Decode's initial metadata once it reserved: the block count
OUTPUTS_KEY = "tandem-outputs"      # call metadata: the id of the caller's open Outputs stream (output_sinks.py)
