"""Config checks."""
