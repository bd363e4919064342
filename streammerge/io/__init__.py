"""Sources and sinks: local/Hub/LoRA checkpoints in, vocabularies re-indexed, shards out, verify."""
