"""HyacinthWatch worker: presence and cover of water hyacinth in observation photos."""
