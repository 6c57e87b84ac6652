"""statecar agent service: stateless openai-agents turns over gRPC."""
