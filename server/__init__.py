"""cpm2 HTTP server: generation, runtime soft prompts and metrics over one engine protocol."""
