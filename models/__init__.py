"""The models room: LM backends (streaming text) and speech decoders (streaming PCM)."""
