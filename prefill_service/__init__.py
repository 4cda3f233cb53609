"""Prefill service: a gRPC server in front of a pool of Ray actors that run prompts through the model,
compress their KV caches with SnapKV and push them to the decode worker named in each request."""
