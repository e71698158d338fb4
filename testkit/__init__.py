"""What the tests and the benchmark harness share: clients of the server (a WebRTC peer as a browser
would be, a `/ws` peer, headless Chromium), speech to send them, a lossy network between them, a
server started for a run, and tiny Step-Audio models in the real layout."""
