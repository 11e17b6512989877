"""Command-line entry points: smallgpt-tokenize, smallgpt-train, smallgpt-sample."""
