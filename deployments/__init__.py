"""Ray Serve application: OpenAI-compatible ingress, LLMServer replicas, app builder."""
