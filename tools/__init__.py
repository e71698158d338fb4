"""Functions the agent can call during a reply: the built-in ones, a user's module, and the rule
that routes obvious questions for an LM that cannot call them."""
