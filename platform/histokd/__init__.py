"""histokd."""
