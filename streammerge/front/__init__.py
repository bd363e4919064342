"""Front ends: the config (YAML, flags, Python), the Python API, the CLI, the demo and inspect."""
