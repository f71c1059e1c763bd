"""The block layer: nodes, the graph of named nodes, and the drivers (see docs/block.md)."""
