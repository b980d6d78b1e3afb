"""distributed layer of nnsight_dist (see DESIGN.md §3)."""
