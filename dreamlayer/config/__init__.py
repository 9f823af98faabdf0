"""DreamLayer's configuration: every environment variable read in one place, once, at start.

- ``env``          the table of every variable (default, rule, deprecated names), the reader
                   ``Environment`` and ``ConfigError``; docs/configuration.md documents the table
- ``img2img``      ``Config``: what the img2img service (:5004) runs with
- ``backend``      ``DreamLayerConfig``: what dream_layer.py (:5002) runs with (holds a ``Config``)
- ``saved_paths``  the path settings file the frontend posts (not environment configuration)

The launcher's ``Plan`` (dreamlayer/launcher.py) is built from the same ``Environment``.
"""
from dreamlayer.config.env import VARIABLES, ConfigError, Environment
from dreamlayer.config.img2img import Config
from dreamlayer.config.backend import DreamLayerConfig

__all__ = ["Config", "ConfigError", "DreamLayerConfig", "Environment", "VARIABLES"]
