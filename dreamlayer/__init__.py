"""DreamLayer's img2img + inpainting service and its backend, as one importable package.

Sub-packages by responsibility (docs/architecture.md has one line per module):

- ``dreamlayer.config``   every setting, read once from the environment; the saved path settings
- ``dreamlayer.comfyui``  the ComfyUI client, the ComfyUI process launcher, and the fake ComfyUI
- ``dreamlayer.img2img``  request -> params -> plan -> workflow -> run -> serve, and the :5004 app
- ``dreamlayer.jobs``     async jobs: worker pool, status, Server-Sent Events
- ``dreamlayer.backend``  dream_layer.py's :5002 app (model lists, settings, images)

The top-level scripts (img2img_server.py, dream_layer.py, start_dream_layer.py, ...) are thin entry
points into this package.
"""
from pathlib import Path

#: The project folder: workflows/, docs/ and the default data/, logs/ and served_images/ live here.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
