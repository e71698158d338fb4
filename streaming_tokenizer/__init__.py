"""The streaming tokenizer room: the user's audio becomes LM input while the user speaks."""
