"""Mandarin speech synthesis through the espeak-ng library shipped by the
``espeakng-loader`` wheel.

We drive ``libespeak-ng`` with ctypes because no maintained Python binding
exposes both synthesis to memory and ``espeak_TextToPhonemes`` without an
apt-installed espeak-ng; the wheel carries the library and its voice data, so
the embedded corpus needs nothing beyond pip.

The library keeps one global state, so :class:`Espeak` is a process-wide
singleton and is not thread-safe.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import numpy as np

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_PARAM = {"rate": 1, "volume": 2, "pitch": 3, "range": 4}
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: an espeak voice variant and prosody settings.

    ``rate`` is words per minute; ``pitch`` and ``range`` are 0..100.
    """

    name: str
    rate: int
    pitch: int
    range: int


class Espeak:
    """The espeak-ng library, initialised once per process."""

    _instance: "Espeak | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self._lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        data = espeakng_loader.get_data_path().encode()
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise from {data.decode()}")
        self.sample_rate: int = rate
        self._chunks: list[np.ndarray] = []
        # Keep a reference: ctypes callbacks are freed when garbage-collected.
        self._callback = _CALLBACK(self._collect)
        self._lib.espeak_SetSynthCallback(self._callback)
        self._voice: Voice | None = None

    @classmethod
    def get(cls) -> "Espeak":
        with cls._lock:
            if cls._instance is None:
                cls._instance = Espeak()
            return cls._instance

    def _collect(self, samples, num_samples, events) -> int:  # noqa: ARG002 - ctypes signature
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(num_samples,)).copy())
        return 0

    def set_voice(self, voice: Voice) -> None:
        if voice == self._voice:
            return
        if self._lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice.name!r}")
        for key in ("rate", "pitch", "range"):
            self._lib.espeak_SetParameter(_PARAM[key], int(getattr(voice, key)), 0)
        self._voice = voice

    def synth(self, text: str, voice: Voice) -> np.ndarray:
        """Speak ``text``; returns int16 samples at :attr:`sample_rate`."""
        with self._lock:
            self.set_voice(voice)
            self._chunks = []
            data = text.encode("utf-8") + b"\0"
            self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
            self._lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        if not chunks:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(chunks).astype(np.int16)

    def phonemes(self, text: str, voice_name: str = "cmn") -> str:
        """espeak-ng's phoneme string (IPA) for ``text`` in ``voice_name``."""
        with self._lock:
            self._voice = None
            self._lib.espeak_SetVoiceByName(voice_name.encode())
            buf = ctypes.create_string_buffer(text.encode("utf-8") + b"\0")
            ptr = ctypes.c_void_p(ctypes.addressof(buf))
            out: list[str] = []
            while ptr.value:
                res = self._lib.espeak_TextToPhonemes(ctypes.byref(ptr), _ESPEAK_CHARS_UTF8, 0x02)
                if res:
                    out.append(res.decode("utf-8", "replace"))
                else:
                    break
        return " ".join(out).strip()
