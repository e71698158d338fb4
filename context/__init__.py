"""The context room: the dialog history as text, what was heard, the token budget, persistence."""
