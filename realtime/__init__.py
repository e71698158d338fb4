"""The transport room: WebRTC and WebSocket sessions, signaling, audio framing and pacing."""
