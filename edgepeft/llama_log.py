"""Silence llama.cpp's own logging (both the exporter's quantizer and the runtime use llama.cpp;
our errors carry the message that matters). Takes the llama_cpp module: core never imports it."""

from __future__ import annotations

import ctypes

_callback = None  # kept alive for the process: llama.cpp holds the pointer


def quiet_llama_cpp(llama_cpp) -> None:
    global _callback
    if _callback is None:
        _callback = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
