#!/usr/bin/env python3
"""DreamLayer's main backend on port 5002 (model lists, path settings, images; optionally starts
ComfyUI) — entry point.

    python dream_layer.py [--start-comfyui | --comfyui-only]

The app lives in ``dreamlayer.backend.app`` (``create_app(config)`` for tests and WSGI servers).
"""
import sys

from dreamlayer.backend.app import create_app, main

__all__ = ["create_app", "main"]

if __name__ == "__main__":
    sys.exit(main())
