"""One img2img request from validated input to served images: the service's core, free of Flask.

The order is deliberate: cheap parameter checks first, then the uploads are decoded (once),
then the values that need ComfyUI (models, samplers) are checked, then files are staged, the
workflow runs and the results are copied to the served folder. Staged inputs are removed in
every case.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image

from dreamlayer.comfyui.client import ComfyClient
from dreamlayer.comfyui.errors import (ComfyBadResponse, ComfyError, ComfyInterrupted, ComfyRejected, ComfyTimeout,
                                       ComfyUnreachable)
from dreamlayer.comfyui.pool import Backend, BackendPool, NoBackendLeft
from dreamlayer.img2img import inpainting, mask_shaping, planning, png_reader
from dreamlayer.img2img.graph import reads_any
from dreamlayer.img2img.advanced_params import resolve_advanced
from dreamlayer.img2img.workflow import WorkflowError, build_img2img_workflow, check_file_inputs, upload_inputs
from dreamlayer.errors import ApiError, InvalidParameter
from dreamlayer.img2img.params import MAX_CONTROLNET_UNITS, parse_params, resolve_choices
from dreamlayer.config.img2img import HTTP_UPLOAD_SUBFOLDER
from dreamlayer.img2img.staging import SAFE_NAME, InputStager, ServedImages, output_file, remove_prefixed
from dreamlayer.img2img.png_writer import comfy_mask_png, png_bytes
from dreamlayer.img2img.temp_uploads import UploadShrinker, shrink_lost_uploads
from dreamlayer.img2img.uploads import decode_base64_image, decode_image, decode_mask

log = logging.getLogger(__name__)


@dataclass
class Img2ImgRequest:
    """What a client sent, before validation: raw file bytes and the parameter object."""

    image: bytes
    mask: bytes | None
    params: dict
    warnings: tuple = ()


def cancel_each(cancel, items, backend_of, prompt_of) -> list:
    """``[cancel(item) for item in items]``: the backends side by side (a hung one holds up no
    other), each backend's pending prompts first. ComfyUI starts the next pending prompt when the
    running one is interrupted, and 0.3.40 clears its interrupt flag as a prompt starts: cancelled
    at the same time, a pending prompt could start between its cancel's two reads of the queue
    and lose the /interrupt sent for it (it then ran to its end). Results in the order of ``items``."""
    items = list(items)
    groups: dict = {}
    for index, item in enumerate(items):
        groups.setdefault(id(backend_of(item)), []).append(index)
    results: list = [None] * len(items)

    def run_group(indexes):
        client = backend_of(items[indexes[0]])
        pending = set()
        if client is not None and len(indexes) > 1:
            try:
                pending = client.pending()
            except ComfyError:
                pass  # each cancel finds out for itself
        for index in sorted(indexes, key=lambda i: prompt_of(items[i]) not in pending):
            results[index] = cancel(items[index])
    if len(groups) <= 1:
        for indexes in groups.values():
            run_group(indexes)
    else:
        with ThreadPoolExecutor(min(len(groups), 16), thread_name_prefix="cancel") as pool:
            list(pool.map(run_group, groups.values()))
    return results


class ActiveRuns:
    """The generations this service is running, so that they can be cancelled (all of them by
    /api/img2img/interrupt, or one by its job's cancel)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._runs: dict = {}  # run_id -> {"prompt_id": str|None, "client": ComfyClient|None, "cancelled": bool}

    def start(self, run_id: str) -> None:
        with self._lock:
            self._runs.setdefault(run_id, {"prompt_id": None, "client": None, "cancelled": False,
                                           "stop_asked": False})

    def finish(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def set_prompt(self, run_id: str, prompt_id: str | None, client=None) -> bool:
        """Record the prompt now running for run_id (and the backend's client that runs it);
        False if the run was cancelled meanwhile."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return False
            run["prompt_id"], run["client"] = prompt_id, client
            return not run["cancelled"]

    def prompt_of(self, prompt_id: str):
        """The client of the backend running ``prompt_id``, or None."""
        with self._lock:
            for run in self._runs.values():
                if run["prompt_id"] == prompt_id:
                    return run["client"]
        return None

    def client_of(self, run_id: str):
        """The client of the backend the run's prompt is on, or None."""
        with self._lock:
            run = self._runs.get(run_id)
            return run["client"] if run else None

    def prompt_id_of(self, run_id: str):
        with self._lock:
            run = self._runs.get(run_id)
            return run["prompt_id"] if run else None

    def cancelled(self, run_id: str) -> bool:
        with self._lock:
            run = self._runs.get(run_id)
            return bool(run and run["cancelled"])

    def cancel(self, run_id: str) -> tuple:
        """Mark one run cancelled (it may not have queued anything yet: then it never will);
        returns (prompt it is running, client of its backend), or (None, None). Unknown
        (finished) runs are left alone."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return None, None
            run["cancelled"] = run["stop_asked"] = True
            return run["prompt_id"], run["client"]

    def stop_asked(self, run_id: str) -> bool:
        """A cancel was asked, even if it could not reach ComfyUI (uncancel): a run whose
        backend is lost then is not started again on another one."""
        with self._lock:
            run = self._runs.get(run_id)
            return bool(run and run["stop_asked"])

    def __contains__(self, run_id: str) -> bool:
        with self._lock:
            return run_id in self._runs

    def uncancelled(self) -> list:
        """The ids of the runs not cancelled (yet)."""
        with self._lock:
            return [run_id for run_id, r in self._runs.items() if not r["cancelled"]]

    def uncancel(self, run_id: str) -> None:
        """Undo cancel(): the cancel could not reach ComfyUI, so it did not happen (a retry
        tries again)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                run["cancelled"] = False

    def cancel_all(self) -> list:
        """Mark every run cancelled; returns (run id, prompt id, client) of those with a prompt
        not cancelled before."""
        with self._lock:
            fresh = [(run_id, r) for run_id, r in self._runs.items() if not r["cancelled"]]
            for _, run in fresh:
                run["cancelled"] = run["stop_asked"] = True
            # runs cancelled before were already taken care of: never cancel a prompt twice, as a
            # second global /interrupt could stop whatever ComfyUI runs next
            return [(run_id, r["prompt_id"], r["client"]) for run_id, r in fresh if r["prompt_id"]]

    def __len__(self):
        with self._lock:
            return len(self._runs)


@dataclass
class Prepared:
    """A validated request, ready to run: decoded images, resolved parameters, the plan."""

    params: object
    image: object          # PIL RGB image, the original (opened lazily from image_png when that is set)
    keep: object           # PIL L keep-mask or None
    control_images: list   # PIL images or None, per ControlNet unit
    plan: object
    warnings: list
    #: ``image`` as a stored PNG (uploads.Decoded.png), when ComfyUI can be given it as it is
    image_png: bytes | None = None

    # The Redis store pickles jobs. With a stored PNG, that file is what travels (no decoding
    # here, none on the worker, whose ComfyUI gets the same file); else the decoded pixels.
    def __getstate__(self):
        return {**self.__dict__, "image": None} if self.image_png is not None else self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.image is None and self.image_png is not None:
            self.image = Image.open(io.BytesIO(self.image_png))


def _finishing(plan, keep) -> dict:
    return planning.finishing(plan, keep)


@dataclass
class InputFiles:
    """The files a run stages on its backend, encoded before it waits for one: no backend stands
    idle while they are encoded, and a retry on another backend stages the same bytes."""

    image: bytes
    mask: bytes | None
    controls: list  # bytes or None, per ControlNet unit


@dataclass
class Batches:
    """What the runs of one request produced, in batch order."""

    outputs: list = field(default_factory=list)     # the served images, as the answer lists them
    workflows: list = field(default_factory=list)   # the workflow of each run
    prompt_ids: list = field(default_factory=list)  # ComfyUI's id of each run


class Listener:
    """Receives a run's progress; the async jobs subclass it. Every method may be called from
    the generating thread."""

    def queued(self, prompt_id: str, index: int) -> None:
        pass

    def progress(self, event) -> None:
        pass

    def retrying(self, reason: str) -> None:
        """Its backend failed mid-run: the run waits again, for another backend."""

    def before_prompt(self, index: int) -> None:
        """A batch's prompt is about to be sent to ComfyUI; raising here stops the run first."""


class Img2ImgService:
    def __init__(self, config, client: ComfyClient, served: ServedImages, pool: BackendPool | None = None):
        self.config = config
        self.pool = pool or BackendPool([Backend(client.base_url, client, config.comfyui_input_dir,
                                                 config.comfyui_output_dir)], slots=config.prompts_per_backend)
        #: The backend whose object_info says which models and nodes exist: the first one, or
        #: with several, the first that answers (all are expected to hold the same models).
        self._catalog = self.pool.primary
        self.served = served
        self.active = ActiveRuns()
        self.shrinker = UploadShrinker()  # a run's HTTP uploads, made small once it has ended
        self._last_refresh = float("-inf")
        self._warned_output_dir = False

    @property
    def client(self) -> ComfyClient:
        """The client of the catalog backend (see _catalog)."""
        return self._catalog.client

    def _check_catalog(self) -> None:
        """With several backends, make sure the catalog comes from one that answers: the first
        in rotation, in the order of COMFY_API_URL. One backend: its error is the answer."""
        if len(self.pool) == 1:
            return
        order = sorted(enumerate(self.pool.backends), key=lambda ib: (not ib[1].reachable, ib[0]))
        error = None
        for _, backend in order:
            try:
                backend.client.object_info()
            except ComfyUnreachable as exc:
                self.pool.mark_down(backend, str(exc))
                error = error or exc
                continue
            self._catalog = backend
            return
        raise error

    # -- choices that depend on the ComfyUI server ------------------------------------------
    #: Names that may have been installed in ComfyUI after we cached its object_info.
    _REFRESHABLE = {"unknown_model", "unknown_sampler", "unknown_scheduler", "unknown_lora", "unknown_controlnet",
                    "unknown_upscaler", "unknown_refiner", "unknown_vae", "unknown_face_model", "custom_node_missing",
                    "node_missing"}
    #: At most one object_info refresh per this many seconds for unknown names.
    REFRESH_INTERVAL_S = 2.0

    def _resolve(self, params):
        """Check the names against ComfyUI's lists; an unknown name re-reads them once (a model
        installed while the service runs), at most every REFRESH_INTERVAL_S."""
        try:
            return self._resolve_once(params)
        except InvalidParameter as exc:
            now = time.monotonic()
            if exc.code not in self._REFRESHABLE or now - self._last_refresh < self.REFRESH_INTERVAL_S:
                raise
            self._last_refresh = now
            self.client.object_info(refresh=True)
            return self._resolve_once(params)

    def _resolve_once(self, params):
        if params.custom_workflow is not None:  # the core loaders were checked as it was parsed;
            try:                                  # custom nodes' file inputs, as ComfyUI marks them
                check_file_inputs(params.custom_workflow, upload_inputs(self.client.object_info()))
            except WorkflowError as exc:
                raise InvalidParameter("custom_workflow", str(exc), code="invalid_custom_workflow") from None
        choices = self._choices(params)
        params = resolve_choices(params, default_model=self.config.default_model, **choices)
        advanced, warnings = resolve_advanced(params.advanced, choices=self._node_choices,
                                              checkpoints=choices["checkpoints"])
        return dataclasses.replace(params, advanced=advanced, warnings=params.warnings + tuple(warnings))

    def _node_choices(self, class_type: str, input_name):
        """An input's options; [] for a node asked for without an input; None: no such node."""
        if class_type not in self.client.object_info():
            return None
        if input_name is None:
            return []
        try:
            return self.client.input_choices(class_type, input_name)
        except KeyError:
            return []

    def _choices(self, params) -> dict:
        def optional(class_type, name):
            try:
                return self.client.input_choices(class_type, name)
            except KeyError:
                return []  # this ComfyUI has no such node: every name is unknown

        try:
            return {
                "checkpoints": self.client.input_choices("CheckpointLoaderSimple", "ckpt_name"),
                "samplers": self.client.input_choices("KSampler", "sampler_name"),
                "schedulers": self.client.input_choices("KSampler", "scheduler"),
                "loras": optional("LoraLoader", "lora_name") if params.loras else None,
                "controlnets": optional("ControlNetLoader", "control_net_name") if params.controlnet_units else None,
            }
        except KeyError as exc:
            raise ComfyBadResponse(f"ComfyUI's object_info lacks a core node input: {exc}") from None

    def generate(self, request: Img2ImgRequest) -> dict:
        """The synchronous path: validate, run, answer."""
        return self.execute(self.prepare(request))

    def prepare(self, request: Img2ImgRequest) -> Prepared:
        """Everything that can reject a request (4xx, or 503 when ComfyUI is down), before any
        file is written or any prompt queued."""
        params = parse_params(request.params, max_outpaint_px=self.config.max_outpaint_px)
        parsed_warnings = params.warnings
        warnings = list(request.warnings) + list(params.warnings)
        image = decode_image(request.image, max_pixels=self.config.max_image_pixels)
        warnings += image.warnings
        keep = None
        if request.mask is not None:
            mask = decode_mask(request.mask, size=image.image.size, max_bytes=self.config.max_mask_bytes,
                               max_pixels=self.config.max_image_pixels, invert=params.mask_invert)
            warnings += mask.warnings
            keep = mask.image
        control_images = [self._control_image(unit) for unit in params.controlnet_units]
        source, keep, control_images, params = self._shape(params, image.image, keep, control_images, warnings)
        self._check_catalog()
        params = self._resolve(params)
        if keep is not None and params.inpaint_mode == "fill" and params.denoising_strength < 1.0:
            warnings.append(f"denoising_strength {params.denoising_strength:g} was raised to 1.0: inpaint_mode "
                            "'fill' (VAEEncodeForInpaint) needs full denoise; use 'original' to keep it")
        if keep is not None and params.inpaint_mode == "fill" and params.advanced.tiling is not None:
            warnings.append("tiling: ComfyUI has no tiled VAEEncodeForInpaint, so inpaint_mode 'fill' encodes "
                            "the input untiled (every decode is tiled); use 'original' for a fully tiled run")
        tiling = params.advanced.tiling
        if tiling is not None and tiling.tile_size < tiling.overlap * 4:
            warnings.append(f"tiling: ComfyUI's tiled VAE decoder uses an overlap of tile_size // 4 = "
                            f"{tiling.tile_size // 4} px when tile_overlap is more than a quarter of tile_size")
        warnings += params.warnings[len(parsed_warnings):]  # what resolving the names added
        source, keep, plan = planning.plan_generation(params, source, keep, comfy_nodes=self.client.object_info(),
                                                      max_output_pixels=self.config.max_output_pixels)
        return Prepared(params, source, keep, control_images, plan, warnings,
                        image.png if source is image.image else None)

    def execute(self, job: Prepared, *, run_id: str | None = None, listener: Listener | None = None) -> dict:
        """Stage the inputs, run every batch on ComfyUI, serve the results; inputs are removed
        whatever happens. ``run_id`` lets a caller cancel the run (``cancel_run``)."""
        params, plan, listener = job.params, job.plan, listener or Listener()
        run_id = run_id or uuid.uuid4().hex
        files = self._input_files(job, *inpainting.prepare(job.image, job.keep, plan))
        self.active.start(run_id)
        tried: list = []
        try:
            while True:
                try:
                    # a retry never goes back to a backend already tried
                    with self.pool.lease(timeout=self.config.comfy_timeout_s, exclude=tried, ahead=bool(tried),
                                         cancelled=lambda: self.active.cancelled(run_id)) as lease:
                        tried.append(lease.backend)
                        batches = self._execute_on(lease, job, run_id, listener, files)
                    break
                except NoBackendLeft:
                    raise ApiError("No ComfyUI backend is left in rotation (none answers): "
                                   + ", ".join(b.url for b in self.pool.backends), code="no_backend_available",
                                   status=503) from None
                except TimeoutError:
                    raise ComfyTimeout(self.config.comfy_timeout_s, f"No ComfyUI backend became free within "
                                       f"{self.config.comfy_timeout_s:g}s (COMFY_TIMEOUT_S)") from None
                except ComfyUnreachable as exc:
                    self.pool.mark_down(tried[-1], str(exc))
                    if len(self.pool) == 1 or len(tried) > 1 or self.active.stop_asked(run_id):
                        raise
                    log.warning("run %s: ComfyUI backend %s is unreachable; retrying once on another "
                                "backend", run_id, tried[-1].url)
                    listener.retrying(f"ComfyUI backend {tried[-1].url} stopped answering")
        finally:
            self.active.finish(run_id)
        if not batches.outputs:
            raise ComfyBadResponse("ComfyUI finished the workflow but reported no images")
        count = len(batches.outputs)
        return {
            "status": "success",
            "message": f"Generated {count} image{'s' if count != 1 else ''}",
            "run_id": run_id,
            "seed": params.seed,
            "seeds": params.seeds(),
            "warnings": job.warnings,
            "comfy_response": {
                "prompt_id": batches.prompt_ids[0],
                "prompt_ids": batches.prompt_ids,
                "generated_images": batches.outputs,
                "all_images": [dict(o) for o in batches.outputs],
            },
            "workflow": batches.workflows[0],
        }

    @staticmethod
    def _input_files(job: Prepared, gen_image, gen_keep) -> InputFiles:
        """The PNG files of the generation's image, its mask and its ControlNet images."""
        plan, mask = job.plan, None
        if gen_keep is not None:
            weight = None
            if _finishing(plan, job.keep).get("paste_back"):  # the workflow's composite reads it
                weight = inpainting.paste_weight(job.keep, plan)
            mask = comfy_mask_png(gen_keep, weight)
        controls = [None if control is None else png_bytes(inpainting.prepare_extra(control, job.image.size, plan))
                    for control in job.control_images]
        image = job.image_png if gen_image is job.image and job.image_png is not None else png_bytes(gen_image)
        return InputFiles(image, mask, controls)

    def _execute_on(self, lease, job: Prepared, run_id, listener, files: InputFiles) -> Batches:
        """Stage the inputs on the leased backend and run every batch there; inputs are removed
        whatever happens."""
        backend = lease.backend
        with InputStager(backend.client, backend.input_dir, self.shrinker) as stager:
            image_ref = stager.put(f"img2img_{run_id}_image.png", files.image)
            mask_ref = None
            if files.mask is not None:
                mask_ref = stager.put(f"img2img_{run_id}_mask.png", files.mask)
            units = []
            for i, (unit, control) in enumerate(zip(job.params.controlnet_units, files.controls)):
                ref = None if control is None else stager.put(f"img2img_{run_id}_control{i}.png", control)
                units.append({**unit, "image": ref})
            return self._run_batches(job, run_id, listener, image_ref, mask_ref, units, lease)

    def _run_batches(self, job: Prepared, run_id, listener, image_ref, mask_ref, units, lease) -> Batches:
        """One ComfyUI run per batch_count (seed + i). On failure the images already served are
        removed: the client gets an error and never learns their URLs. The backend is released
        when the last prompt has ended, before its outputs are served: the next job starts on
        it meanwhile."""
        params, finishing, backend = job.params, _finishing(job.plan, job.keep), lease.backend
        batches = Batches()
        seeds = params.seeds()
        try:
            for index, seed in enumerate(seeds):
                try:
                    workflow = build_img2img_workflow(
                        params, image_name=image_ref, mask_name=mask_ref, seed=seed,
                        filename_prefix=f"img2img_{run_id}_{index}", inpaint_mode=params.inpaint_mode,
                        controlnet_units=units, **finishing)
                except WorkflowError as exc:
                    raise ApiError(f"Could not build the workflow: {exc}", code="workflow_error",
                                   status=400) from None
                batches.workflows.append(workflow)
                result = self._run(run_id, workflow, index, listener, backend.client)
                if index == len(seeds) - 1:
                    lease.release()
                batches.prompt_ids.append(result.prompt_id)
                inputs = {image_ref, mask_ref} - {None}
                for image in result.images:  # one at a time: if one fails, those before it are removed
                    # a custom workflow's output that uses neither the image nor the mask (a
                    # preview of a reference image) is not the request's picture: served as saved
                    side = params.custom_workflow is not None and not reads_any(workflow, image.node_id, inputs)
                    batches.outputs.append(self._serve(run_id, index, image, job, backend, as_saved=side))
        except BaseException:
            for output in batches.outputs:
                self.served.remove(output["filename"])
            raise
        return batches

    def _shape(self, params, image, keep, control_images, warnings) -> tuple:
        """Mask shaping (threshold, grow) and the outpainting canvas, done once here so that
        ComfyUI's mask and the paste-back weights agree. Returns (image, keep, control images,
        params)."""
        if keep is None and (params.mask_grow or params.mask_threshold is not None):
            warnings.append("mask_grow and mask_threshold apply to a mask; none was sent")
        if keep is not None and params.mask_threshold is not None:
            keep = mask_shaping.threshold(keep, params.mask_threshold)
        if keep is not None and params.mask_grow:
            keep = mask_shaping.grow(keep, params.mask_grow)
            if keep.getextrema()[0] == 255:
                raise InvalidParameter("mask_grow", f"mask_grow {params.mask_grow} shrinks the mask to nothing",
                                       code="mask_empty")
        out = params.outpaint
        if out is None:
            if keep is None and params.soft_inpainting:
                warnings.append("soft_inpainting applies to a mask or outpainting; neither was sent")
            return image, keep, control_images, params
        size = out.padded_size(image.size)
        if size[0] * size[1] > self.config.max_output_pixels:
            raise InvalidParameter("outpaint", f"The outpainted image would be {size[0]}x{size[1]} = "
                                   f"{size[0] * size[1]:,} pixels; the limit is {self.config.max_output_pixels:,} "
                                   "(MAX_OUTPUT_PIXELS)", code="output_too_large",
                                   maximum=self.config.max_output_pixels)
        only_masked = params.inpaint_area == "only_masked"  # there width x height is the crop's size
        asked = (params.width or size[0], params.height or size[1])
        if asked != size and not only_masked:
            raise InvalidParameter("width", f"With outpaint the output is the padded size {size[0]}x{size[1]}; "
                                   f"width x height asks for {asked[0]}x{asked[1]}: leave them out or match it",
                                   code="unsupported_combination")
        controls = [None if c is None else mask_shaping.pad_image(
            c if c.size == image.size else c.resize(image.size, Image.LANCZOS), out) for c in control_images]
        keep = mask_shaping.pad_keep(keep, image.size, out)
        image = mask_shaping.pad_image(image, out)
        if only_masked:
            return image, keep, controls, params
        return image, keep, controls, dataclasses.replace(params, width=None, height=None)

    def _control_image(self, unit):
        """A ControlNet unit's own image, decoded and checked like the input image (or None)."""
        if unit["input_image"] is None:
            return None
        data = decode_base64_image(unit["input_image"], unit["where"] + ".input_image")
        image = decode_image(data, max_pixels=self.config.max_image_pixels).image
        # decoded now: a lazy image (uploads._open) must not be loaded by two threads at once, as
        # the Redis store's writer thread (pickling the job) and the request's own could
        image.load()
        return image

    def _run(self, run_id: str, workflow: dict, index: int, listener: Listener, client):
        if self.active.cancelled(run_id):
            raise ComfyInterrupted(message="The generation was interrupted")

        def on_queued(prompt_id):
            if not self.active.set_prompt(run_id, prompt_id, client):
                # cancelled between queueing and now: cancel what we just queued
                client.cancel(prompt_id)
            listener.queued(prompt_id, index)

        listener.before_prompt(index)
        try:
            result = client.run(workflow, timeout=self.config.comfy_timeout_s, on_queued=on_queued,
                                on_progress=listener.progress)
            if self.active.cancelled(run_id):
                # cancelled, and ComfyUI ran it to its end all the same (the cancel came as it
                # ended, or 0.3.40 lost the /interrupt as it started): the run stops as asked
                raise ComfyInterrupted(prompt_id=result.prompt_id, message="The generation was interrupted")
            return result
        except ComfyRejected:
            # Our cached object_info may be stale (a model removed from ComfyUI): refresh it so
            # the next request is checked against what ComfyUI really has.
            try:
                client.object_info(refresh=True)
                if client is not self.client:
                    self.client.object_info(refresh=True)
            except ComfyError:
                pass
            raise
        finally:
            self.active.set_prompt(run_id, None)

    def _serve(self, run_id: str, index: int, image, job: Prepared, backend, *, as_saved: bool = False) -> dict:
        """Download one output, map it back onto the original (see inpainting.py), serve it. An
        output that is final as ComfyUI saved it (or ``as_saved``), in a shared output folder, is
        served as that file (ServedImages: a hard link where possible, no read and no copy)."""
        name = image.filename
        if image.type != "output" or image.subfolder or not SAFE_NAME.match(name) or not name.startswith("img2img_"):
            base = name.rsplit("/", 1)[-1]
            name = f"img2img_{run_id}_{index}_{base if SAFE_NAME.match(base) else 'image.png'}"
        path = self._output_path(image, backend)
        if path is not None and (as_saved or self._final_as_saved(path, job)):
            try:
                self.served.save_file(name, path)
                return self._served(name)
            except OSError as exc:
                log.warning("cannot serve ComfyUI output %s (%s); downloading it instead", path, exc)
                path = None
        data = self._output_bytes(image, backend, path)
        self.served.save(name, data if as_saved else inpainting.finish_png(data, job.image, job.keep, job.plan))
        return self._served(name)

    def _served(self, name: str) -> dict:
        return {"filename": name, "url": f"{self.config.public_base_url}/images/{name}",
                "type": "output", "subfolder": ""}

    @staticmethod
    def _final_as_saved(path, job: Prepared) -> bool:
        """Whether ComfyUI's output file needs no work from us (read from its PNG header only;
        anything else goes the way of finish_png / the download, which report what is wrong)."""
        size = png_reader.file_size(path)
        return size is not None and not inpainting.needs_work(size, job.keep, job.plan)

    def _output_path(self, image, backend):
        """ComfyUI's output file in its output folder when this machine shares it
        (COMFYUI_OUTPUT_DIR / COMFYUI_DIR), else None."""
        folder = backend.output_dir
        if folder is None or image.type != "output":
            return None
        path = output_file(folder, image.subfolder, image.filename)
        if path is None and not self._warned_output_dir:
            self._warned_output_dir = True
            log.warning("ComfyUI output %r is not in %s; downloading outputs instead (is COMFYUI_OUTPUT_DIR "
                        "ComfyUI's output folder?)", image.filename, folder)
        return path

    def _output_bytes(self, image, backend, path) -> bytes:
        """One output file of ComfyUI: read from ``path`` (see _output_path), else downloaded
        with GET /view."""
        if path is not None:
            try:
                return path.read_bytes()
            except OSError as exc:
                log.warning("cannot read ComfyUI output %s (%s); downloading it instead", path, exc)
        return backend.client.view(image)

    def remove_lost_run_files(self, run_id: str) -> int:
        """Remove what a run whose process died (SIGKILL, a lost machine) left on disks this
        service shares: its staged inputs in the backends' input folders (its job may run again
        on another backend, which would not overwrite them) and, with a served-images folder, the
        images it had served. Every file of a run is named after it. Returns how many went."""
        prefix = f"img2img_{run_id}_"
        folders = [b.input_dir for b in self.pool.backends if b.input_dir is not None]
        if isinstance(self.served, ServedImages):
            folders.append(self.served.directory)
        removed = sum(remove_prefixed(folder, prefix) for folder in dict.fromkeys(folders))
        # its uploads to backends that share no disk: in their temp folders, under names staged
        # in this order (_execute_on); no route lists or deletes them, so they are made small
        names = [f"{prefix}image.png", f"{prefix}mask.png"] + [f"{prefix}control{i}.png"
                                                              for i in range(MAX_CONTROLNET_UNITS)]
        for backend in self.pool.backends:
            if backend.input_dir is None:
                try:
                    removed += shrink_lost_uploads(backend.client, names, HTTP_UPLOAD_SUBFOLDER)
                except ComfyError as exc:  # down: it empties its temp folder when it starts again
                    log.warning("run %s: could not make its uploads on %s small: %s", run_id, backend.url, exc)
        if removed:
            log.info("run %s: removed %d file(s) its lost process left behind", run_id, removed)
        return removed

    def cancel_run(self, run_id: str) -> tuple:
        """Cancel one run: (its prompt, "removed" / "interrupted" on ComfyUI), or (None,
        "not_found") when it has no prompt (not queued yet: it will not queue; or finished). A
        ComfyUI that cannot be reached raises, and the run is not cancelled (a retry tries again)."""
        prompt_id, client = self.active.cancel(run_id)
        if not prompt_id:
            self.pool.wake()  # it may wait for a backend: it stops waiting
            return None, "not_found"
        try:
            return prompt_id, client.cancel(prompt_id)
        except BaseException:
            self.active.uncancel(run_id)
            raise

    def interrupt(self) -> dict:
        """Stop every generation of this service (queued or running) — and nobody else's. Runs
        whose ComfyUI cannot be reached stay as they were and the first such error is raised,
        after every other run was cancelled (a retry tries those again)."""
        outcomes, failed = {}, None
        running = self.active.cancel_all()
        self.pool.wake()  # runs waiting for a backend stop waiting

        def cancel(run):
            run_id, prompt_id, client = run
            try:
                return prompt_id, client.cancel(prompt_id), None
            except ComfyError as exc:
                self.active.uncancel(run_id)
                return prompt_id, None, exc
        for prompt_id, outcome, exc in cancel_each(cancel, running, backend_of=lambda run: run[2],
                                                   prompt_of=lambda run: run[1]):
            if exc is None:
                outcomes[prompt_id] = outcome
            failed = failed or exc
        if failed is not None:
            raise failed
        return {"status": "success", "interrupted": [p for p, o in outcomes.items() if o != "not_found"],
                "outcomes": outcomes}
