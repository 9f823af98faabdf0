#!/usr/bin/env python3
"""Starts ComfyUI (or the demo stand-in), dream_layer.py and img2img_server.py and stops them on
Ctrl-C. Run through start_dream_layer.sh / .bat, which prepare the virtualenv first; the
supervisor itself is ``dreamlayer.launcher``."""
import sys

from dreamlayer.launcher import main

if __name__ == "__main__":
    sys.exit(main())
