"""The `cpm2` command line: one entry point for the engine, server and training commands."""
