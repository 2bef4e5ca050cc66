"""Launch and probe vLLM servers from profiles; build the tiny test model. See server/README.md."""
