"""Training of the bundled tiny models (`train` verb)."""
