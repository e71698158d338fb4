"""The controller room: per-session agents that drive turn-taking and own the model tasks."""
