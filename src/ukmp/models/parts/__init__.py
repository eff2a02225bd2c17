"""Prunable stacks (parts) that whole-model adapters compose: each is a table of module paths and unit shapes."""
