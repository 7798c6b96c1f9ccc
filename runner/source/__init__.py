"""The spec source: a git repository, a ref, and a folder in it."""
