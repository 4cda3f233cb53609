"""Decode worker: receives compressed prompt caches over gRPC, batches decoding across requests, streams tokens."""
