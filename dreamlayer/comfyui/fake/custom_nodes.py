"""Custom node packs the fake can load on request (off by default, like the capture's
``--disable-all-custom-nodes``): FakeComfyUI(root, custom_nodes=("facerestore_cf",)).

Nothing here was captured from a server: each entry is what 0.3.40's server.py `node_info()` makes
of the pack's INPUT_TYPES / RETURN_TYPES / CATEGORY (python_module "custom_nodes.<folder>",
display_name = class name when the pack has no NODE_DISPLAY_NAME_MAPPINGS, description "").

facerestore_cf: https://github.com/mav-rik/facerestore_cf, __init__.py at commit ff4d7a5c (2025-06-21;
the node code last changed in 589ab5d6). It also registers the folders `facerestore_models` and
`facedetection_models` (appended to folder_names_and_paths, so they end GET /models) and a third
class, CropFace, which the fake leaves out (it needs a face detector to mean anything).
"""
from __future__ import annotations

import copy

FACEDETECTION_MODELS = ["retinaface_resnet50", "retinaface_mobile0.25", "YOLOv5l", "YOLOv5n"]

PACKS = {
    "facerestore_cf": {
        "model_folders": ["facerestore_models", "facedetection_models"],
        "model_inputs": {"facerestore_models": (("FaceRestoreModelLoader", "model_name"),)},
        "object_info": {
            "FaceRestoreCFWithModel": {
                "input": {"required": {
                    "facerestore_model": ["FACERESTORE_MODEL"],
                    "image": ["IMAGE"],
                    "facedetection": [FACEDETECTION_MODELS],
                    "codeformer_fidelity": ["FLOAT", {"default": 0.5, "min": 0.0, "max": 1, "step": 0.05}],
                }},
                "input_order": {"required": ["facerestore_model", "image", "facedetection", "codeformer_fidelity"]},
                "output": ["IMAGE"],
                "output_is_list": [False],
                "output_name": ["IMAGE"],
                "name": "FaceRestoreCFWithModel",
                "display_name": "FaceRestoreCFWithModel",
                "description": "",
                "python_module": "custom_nodes.facerestore_cf",
                "category": "facerestore_cf",
                "output_node": False,
            },
            "FaceRestoreModelLoader": {
                "input": {"required": {"model_name": [[]]}},
                "input_order": {"required": ["model_name"]},
                "output": ["FACERESTORE_MODEL"],
                "output_is_list": [False],
                "output_name": ["FACERESTORE_MODEL"],
                "name": "FaceRestoreModelLoader",
                "display_name": "FaceRestoreModelLoader",
                "description": "",
                "python_module": "custom_nodes.facerestore_cf",
                "category": "facerestore_cf",
                "output_node": False,
            },
        },
    },
}


def pack(name: str) -> dict:
    """A deep copy of one pack's description; ValueError for a pack the fake does not know."""
    if name not in PACKS:
        raise ValueError(f"unknown custom node pack {name!r}; the fake knows {sorted(PACKS)}")
    return copy.deepcopy(PACKS[name])
