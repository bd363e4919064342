"""The plan (pure, from headers) and the engine that streams it: read, compute, write."""
