"""Step-Audio's audio token layout, shared by the tokenizer that makes the codes and the models that
read or write them: two codebooks interleaved 2:3, one group per 120 ms."""

from __future__ import annotations

VQ02_SIZE = 1024  # linguistic codebook, 16.7 Hz
VQ06_SIZE = 4096  # semantic codebook, 25 Hz
# Text form `<audio_N>`: vq02 -> N = code, vq06 -> N = VQ02_SIZE + code. Token IDs: AUDIO_ID_BASE + N.
AUDIO_ID_BASE = 65536
AUDIO_IDS = range(AUDIO_ID_BASE, AUDIO_ID_BASE + VQ02_SIZE + VQ06_SIZE)
TOKENS_PER_SECOND = 1000 / 24  # 41.7: two vq02 and three vq06 codes per 120 ms
