"""Model components: the client's NanoEdge and the server's frozen LLM step."""
