"""How latents become pixels and back, and what is done to the decoded image: a VAE override,
tiled VAE encode / decode, and face restoration. Pure workflow edits (dict in, new dict out)."""
from __future__ import annotations


from dreamlayer.img2img.graph import add_node, consumers, copy_workflow, is_link, nodes_of, relink

#: ComfyUI's defaults for the video-only inputs of the tiled VAE nodes (ignored by image VAEs).
TEMPORAL = {"temporal_size": 64, "temporal_overlap": 8}
#: facerestore_cf's face detector (its default).
FACE_DETECTOR = "retinaface_resnet50"


def apply_vae_override(workflow: dict, vae_name: str) -> dict:
    """One VAELoader feeding every encode and decode that used a checkpoint's own VAE."""
    wf = copy_workflow(workflow)
    loader = add_node(wf, "VAELoader", {"vae_name": vae_name})
    for ckpt in nodes_of(wf, "CheckpointLoaderSimple"):
        relink(wf, [ckpt, 2], [loader, 0])
    return wf


def apply_tiled_vae(workflow: dict, *, tile_size: int, overlap: int) -> tuple:
    """VAEEncode / VAEDecode become VAEEncodeTiled / VAEDecodeTiled (same links, same ids).

    Returns (workflow, untiled): ComfyUI has no tiled VAEEncodeForInpaint, so inpainting's "fill"
    encode stays as it is; ``untiled`` lists those node ids so the caller can say so."""
    wf = copy_workflow(workflow)
    for nid in nodes_of(wf, "VAEEncode"):
        wf[nid] = {"class_type": "VAEEncodeTiled",
                   "inputs": {**wf[nid]["inputs"], "tile_size": tile_size, "overlap": overlap, **TEMPORAL}}
    for nid in nodes_of(wf, "VAEDecode"):
        wf[nid] = {"class_type": "VAEDecodeTiled",
                   "inputs": {**wf[nid]["inputs"], "tile_size": tile_size, "overlap": overlap, **TEMPORAL}}
    return wf, nodes_of(wf, "VAEEncodeForInpaint")


def apply_face_restore(workflow: dict, *, model_name: str, fidelity: float, blend: float | None = None) -> dict:
    """Restore faces in every decoded image before anything else uses it (facerestore_cf's
    FaceRestoreModelLoader + FaceRestoreCFWithModel). ``blend`` (GFPGAN's visibility in A1111)
    mixes the restored image over the decoded one with ImageBlend; None = the restored image."""
    wf = copy_workflow(workflow)
    loader = None
    for did in nodes_of(wf, "VAEDecode", "VAEDecodeTiled"):
        users = consumers(wf, did, 0)
        if not users or not any(_reaches_output(wf, nid) for nid, _ in users):
            continue
        if loader is None:
            loader = add_node(wf, "FaceRestoreModelLoader", {"model_name": model_name})
        restored = [add_node(wf, "FaceRestoreCFWithModel", {
            "facerestore_model": [loader, 0], "image": [did, 0], "facedetection": FACE_DETECTOR,
            "codeformer_fidelity": fidelity}), 0]
        if blend is not None:
            restored = [add_node(wf, "ImageBlend", {"image1": [did, 0], "image2": restored,
                                                    "blend_factor": blend, "blend_mode": "normal"}), 0]
        for nid, name in users:
            wf[nid]["inputs"][name] = list(restored)
    return wf


def _reaches_output(wf: dict, node_id: str, seen=None) -> bool:
    """Whether a node's pixels end in a SaveImage unchanged in kind (the hires fix's first
    decode is encoded again: it does not)."""
    seen = set() if seen is None else seen
    if node_id in seen:
        return False
    seen.add(node_id)
    if wf[node_id]["class_type"] in ("SaveImage", "PreviewImage"):
        return True
    if wf[node_id]["class_type"].startswith("VAEEncode"):
        return False  # pixels going back into a latent (the hires fix) are not a result
    return any(_reaches_output(wf, nid, seen)
               for nid, node in wf.items() for value in node["inputs"].values()
               if is_link(value) and value[0] == node_id)
