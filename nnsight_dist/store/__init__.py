"""The activation store: collect a sharded model's activations to disk, read them back."""
