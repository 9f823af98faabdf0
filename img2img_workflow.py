"""Workflow building for img2img and inpainting — the design card's entry point.

Pure functions (a workflow dict and parameters in, a new workflow dict out), implemented in
``dreamlayer.img2img.workflow`` and re-exported here so ``from img2img_workflow import
build_img2img_workflow`` keeps working. Templates: ``workflows/img2img/``.
"""
from dreamlayer.img2img.graph import (  # noqa: F401 - the public API, re-exported
    add_node, consumers, is_link, linked, new_node_id, nodes_of, relink)
from dreamlayer.img2img.workflow import (  # noqa: F401
    CORE_TEMPLATE, PASTE_BACK_CHANNEL, SAMPLER_CLASSES, TEMPLATE_DIR, UNION_TYPES, WorkflowError,
    apply_advanced, apply_clip_skip, apply_controlnets, apply_differential_diffusion,
    apply_inpaint_conditioning, apply_loras, build_img2img_workflow, finish_outputs,
    inject_mask_into_workflow, input_image_loaders, load_template, normalise_custom_workflow,
    set_batch_size, text_encoder_for, transform_to_img2img_workflow)

__all__ = [
    "CORE_TEMPLATE", "PASTE_BACK_CHANNEL", "SAMPLER_CLASSES", "TEMPLATE_DIR", "UNION_TYPES",
    "WorkflowError", "add_node", "apply_advanced", "apply_clip_skip", "apply_controlnets",
    "apply_differential_diffusion", "apply_inpaint_conditioning", "apply_loras",
    "build_img2img_workflow", "consumers", "finish_outputs", "inject_mask_into_workflow",
    "input_image_loaders", "is_link", "linked", "load_template", "new_node_id", "nodes_of",
    "normalise_custom_workflow", "relink", "set_batch_size", "text_encoder_for",
    "transform_to_img2img_workflow",
]
