"""The latency benchmarking harness: a client of the server, over WebRTC or WebSocket."""
