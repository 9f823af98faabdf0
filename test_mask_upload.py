#!/usr/bin/env python3
"""Smoke test of a running img2img service: one inpainting request, end to end.

    python test_mask_upload.py [--url http://localhost:5004] [--model NAME] [--steps N] [--sync]

The script itself is ``dreamlayer.smoke`` (``--help`` lists every option).
"""
import sys

from dreamlayer.smoke import main

if __name__ == "__main__":
    sys.exit(main())
