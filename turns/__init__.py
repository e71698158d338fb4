"""Turn detection: when the user's turn starts, pauses and ends, and when sound over the agent
begins. One `TurnTaker` per session, fed frame by frame, with one `TurnPolicy` per detection type."""
