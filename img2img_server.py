#!/usr/bin/env python3
"""The img2img + inpainting service on port 5004 — entry point.

    python img2img_server.py          (configuration: environment variables, docs/configuration.md)

The app lives in ``dreamlayer.img2img.app`` (``create_app(config)`` for tests and WSGI servers).
"""
import sys

from dreamlayer.img2img.app import create_app, main

__all__ = ["create_app", "main"]

if __name__ == "__main__":
    sys.exit(main())
