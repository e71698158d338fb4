"""The VAD room: per-frame speech probability and the endpointer that turns it into turn events."""
