"""Router: the client-facing gRPC server, the worker registry with health checks, routing policies, the client."""
