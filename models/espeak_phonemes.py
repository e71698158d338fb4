"""espeak-ng's phonemizer for piper, bound without the leaks of piper's own binding.

piper 1.8's `espeakbridge` leaks on every piece of text: `get_phonemes` never releases the tuple it
builds for each clause, and `set_voice`, called before every piece, has espeak-ng load the voice
again (~1.3 KB kept each time). Together ~1.6 KB a piece: +12 MB an hour at 8 calls. The same
espeak-ng functions, statically linked into `espeakbridge`'s library, are called here through
ctypes instead, and the voice is set only when it changes.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

# espeak-ng's clause flags (speak_lib.h, translate.h): the intonation and type bits of a terminator.
_CLAUSE_BITS = 0x000FFFFF
_TYPE_SENTENCE = 0x00080000
_TERMINATORS = {
    40 | 0x00000 | _TYPE_SENTENCE: ".",
    40 | 0x02000 | _TYPE_SENTENCE: "?",
    45 | 0x03000 | _TYPE_SENTENCE: "!",
    20 | 0x01000 | 0x40000: ",",
    30 | 0x00000 | 0x40000: ":",
    30 | 0x01000 | 0x40000: ";",
}
_CHARS_AUTO, _PHONEMES_IPA, _EE_OK = 0, 0x02, 0


class EspeakPhonemes:
    """Owns the ctypes binding to the espeak-ng inside piper's `espeakbridge` library, and the name
    of the voice last set there. espeak-ng is initialized by piper, which shares the library."""

    def __init__(self, library: Path) -> None:
        lib = ctypes.CDLL(str(library))  # the library piper has loaded already: the same espeak-ng
        self._to_phonemes = lib.espeak_TextToPhonemesWithTerminator
        self._to_phonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        self._to_phonemes.restype = ctypes.c_char_p
        self._set_voice = lib.espeak_SetVoiceByName
        self._set_voice.argtypes = [ctypes.c_char_p]
        self._set_voice.restype = ctypes.c_int
        self._voice: str | None = None

    def set_voice(self, voice: str) -> None:
        if voice == self._voice:
            return
        if self._set_voice(voice.encode("utf-8")) != _EE_OK:
            raise RuntimeError(f"Failed to set voice: {voice}")
        self._voice = voice

    def get_phonemes(self, text: str) -> list[tuple[str, str, bool]]:
        """(IPA phonemes, terminator, ends a sentence) for each clause of the text, as piper's
        `espeakbridge.get_phonemes` gives them."""
        source = ctypes.create_string_buffer(text.encode("utf-8"))
        position = ctypes.c_void_p(ctypes.addressof(source))  # espeak-ng advances it, to NULL at the end
        clauses = []
        while position.value is not None:
            terminator = ctypes.c_int(0)
            phonemes = self._to_phonemes(ctypes.byref(position), _CHARS_AUTO, _PHONEMES_IPA, ctypes.byref(terminator))
            flags = terminator.value & _CLAUSE_BITS
            clauses.append(((phonemes or b"").decode("utf-8"), _TERMINATORS.get(flags, ""), flags & _TYPE_SENTENCE == _TYPE_SENTENCE))
        return clauses


def install() -> EspeakPhonemes:
    """Put the binding in place of `set_voice` and `get_phonemes` in piper's `espeakbridge`, which
    piper's phonemizer looks up on each call."""
    from piper import espeakbridge

    phonemes = EspeakPhonemes(Path(espeakbridge.__file__))
    espeakbridge.set_voice = phonemes.set_voice
    espeakbridge.get_phonemes = phonemes.get_phonemes
    return phonemes
