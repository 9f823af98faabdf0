"""The aiohttp application: ComfyUI 0.3.40's HTTP routes (also under /api/...) and /ws.

Handlers follow server.py of 0.3.40 closely, including its empty-bodied 200/400/404 replies,
the plain-text 500 that aiohttp produces when a handler raises (malformed JSON, bad upload type),
and the Host/Origin check.
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import ipaddress
import json
import logging
import mimetypes
import os
import socket
import sys
import urllib.parse
import uuid
from io import BytesIO

from aiohttp import web
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import catalog

log = logging.getLogger(__name__)

COMFYUI_VERSION = "0.3.40"


def _is_loopback(host) -> bool:
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    loopback = False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            for *_, sockaddr in socket.getaddrinfo(host, None, family, socket.SOCK_STREAM):
                if not ipaddress.ip_address(sockaddr[0]).is_loopback:
                    return loopback
                loopback = True
        except socket.gaierror:
            pass
    return loopback


@web.middleware
async def origin_only_middleware(request: web.Request, handler):
    """403 when a loopback Host and the Origin header disagree (ComfyUI's CSRF guard)."""
    if "Host" in request.headers and "Origin" in request.headers:
        host_domain = request.headers["Host"].lower()
        parsed = urllib.parse.urlparse(request.headers["Origin"])
        origin_domain = parsed.netloc.lower()
        host_parsed = urllib.parse.urlsplit("//" + host_domain)
        loopback = _is_loopback(host_parsed.hostname)
        if parsed.port is None:
            host_domain = host_parsed.hostname
        if host_parsed.port is None:
            origin_domain = parsed.hostname
        if loopback and host_domain and origin_domain and host_domain != origin_domain:
            log.warning("WARNING: request with non matching host and origin %s != %s, returning 403",
                        host_domain, origin_domain)
            return web.Response(status=403)
    if request.method == "OPTIONS":
        return web.Response()
    return await handler(request)


class Routes:
    """Route handlers bound to one FakeComfyUI."""

    def __init__(self, fake):
        self.fake = fake
        self.number = 0

    # helpers ---------------------------------------------------------------------------------
    def queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": self.fake.queue.get_tasks_remaining()}}

    def _dir_by_type(self, dir_type):
        if dir_type is None:
            dir_type = "input"
        type_dir = self.fake.folders.by_type(dir_type)
        if type_dir is None:
            # ComfyUI's get_dir_by_type leaves its variable unbound here -> 500.
            raise UnboundLocalError("cannot access local variable 'type_dir' where it is not associated with a value")
        return type_dir, dir_type

    # prompts ---------------------------------------------------------------------------------
    async def post_prompt(self, request):
        log.info("got prompt")
        raw = await request.read()
        try:
            json_data = await request.json()
        except Exception:
            self.fake.rejected.append(raw.decode("utf-8", "replace"))
            raise
        if "number" in json_data:
            number = float(json_data["number"])
        else:
            number = self.number
            if "front" in json_data and json_data["front"]:
                number = -number
            self.number += 1

        if "prompt" not in json_data:
            self.fake.rejected.append(json_data)
            error = {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided",
                     "extra_info": {}}
            return web.json_response({"error": error, "node_errors": {}}, status=400)

        prompt = json_data["prompt"]
        try:
            valid = self.fake.validator.validate_prompt(prompt)
        except Exception:
            self.fake.rejected.append(json_data)
            raise
        extra_data = json_data.get("extra_data", {}) if "extra_data" in json_data else {}
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        if not valid[0]:
            log.warning("invalid prompt: %s", valid[1])
            self.fake.rejected.append(json_data)
            return web.json_response({"error": valid[1], "node_errors": valid[3]}, status=400)

        prompt_id = str(uuid.uuid4())
        self.fake.prompts.append((prompt_id, copy.deepcopy(prompt), json_data.get("client_id")))
        self.fake.queue.put((number, prompt_id, prompt, extra_data, valid[2]))
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": valid[3]})

    async def get_prompt(self, request):
        return web.json_response(self.queue_info())

    async def get_queue(self, request):
        running, pending = self.fake.queue.get_current_queue_volatile()
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def post_queue(self, request):
        json_data = await request.json()
        if "clear" in json_data and json_data["clear"]:
            self.fake.queue.wipe_queue()
        if "delete" in json_data:
            for id_to_delete in json_data["delete"]:
                self.fake.queue.delete_queue_item(lambda item, i=id_to_delete: item[1] == i)
        return web.Response(status=200)

    async def post_interrupt(self, request):
        self.fake.interrupt_count += 1
        self.fake.executor.interrupt.set()  # global in 0.3.40: whatever runs, whoever queued it
        return web.Response(status=200)

    async def post_free(self, request):
        json_data = await request.json()
        unload_models = json_data.get("unload_models", False)
        free_memory = json_data.get("free_memory", False)
        if unload_models:
            self.fake.queue.set_flag("unload_models", unload_models)
        if free_memory:
            self.fake.queue.set_flag("free_memory", free_memory)
        return web.Response(status=200)

    async def get_history(self, request):
        max_items = request.rel_url.query.get("max_items", None)
        if max_items is not None:
            max_items = int(max_items)
        return web.json_response(self.fake.queue.get_history(max_items=max_items))

    async def get_history_prompt(self, request):
        return web.json_response(self.fake.queue.get_history(prompt_id=request.match_info.get("prompt_id")))

    async def post_history(self, request):
        json_data = await request.json()
        if "clear" in json_data and json_data["clear"]:
            self.fake.queue.wipe_history()
        if "delete" in json_data:
            for id_to_delete in json_data["delete"]:
                self.fake.queue.delete_history_item(id_to_delete)
        return web.Response(status=200)

    # catalog ---------------------------------------------------------------------------------
    async def get_object_info(self, request):
        catalog.refresh_input_lists(self.fake.object_info, self.fake.folders.input)
        return web.json_response(self.fake.object_info)

    async def get_object_info_node(self, request):
        node_class = request.match_info.get("node_class", None)
        catalog.refresh_input_lists(self.fake.object_info, self.fake.folders.input)
        out = {}
        if node_class is not None and node_class in self.fake.object_info:
            out[node_class] = self.fake.object_info[node_class]
        return web.json_response(out)

    async def get_embeddings(self, request):
        return web.json_response([])

    async def get_extensions(self, request):
        return web.json_response([])

    async def list_model_types(self, request):
        return web.json_response(list(self.fake.model_folders))

    async def get_models(self, request):
        folder = request.match_info.get("folder", None)
        if folder not in self.fake.model_folders:
            return web.Response(status=404)
        return web.json_response(catalog.model_files(self.fake.object_info, folder, self.fake.model_files))

    async def view_metadata(self, request):
        """The fake has no safetensors files, so ComfyUI's answer is always an empty 404."""
        return web.Response(status=404)

    async def system_stats(self, request):
        total, free = 8 * 1024 ** 3, 6 * 1024 ** 3
        return web.json_response({
            "system": {"os": os.name, "ram_total": total, "ram_free": free, "comfyui_version": COMFYUI_VERSION,
                       "python_version": sys.version, "pytorch_version": "2.13.0+cpu", "embedded_python": False,
                       "argv": ["main.py", "--cpu", "--listen", self.fake.host, "--port", str(self.fake.port)]},
            "devices": [{"name": "cpu", "type": "cpu", "index": None, "vram_total": total, "vram_free": free,
                         "torch_vram_total": total, "torch_vram_free": free}]})

    # files -----------------------------------------------------------------------------------
    def _image_upload(self, post, save_function=None):
        image = post.get("image")
        overwrite = post.get("overwrite")
        is_duplicate = False
        upload_dir, upload_type = self._dir_by_type(post.get("type"))
        if not (image and image.file):
            return web.Response(status=400)
        filename = image.filename
        if not filename:
            return web.Response(status=400)
        subfolder = post.get("subfolder", "")
        full_folder = os.path.join(upload_dir, os.path.normpath(subfolder))
        filepath = os.path.abspath(os.path.join(full_folder, filename))
        if os.path.commonpath((upload_dir, filepath)) != upload_dir:
            return web.Response(status=400)
        os.makedirs(full_folder, exist_ok=True)
        stem, ext = os.path.splitext(filename)
        if not (overwrite is not None and overwrite in ("true", "1")):
            i = 1
            while os.path.exists(filepath):
                if _same_content(filepath, image.file):  # identical file: reuse its name
                    is_duplicate = True
                    break
                filename = f"{stem} ({i}){ext}"
                filepath = os.path.join(full_folder, filename)
                i += 1
        if not is_duplicate:
            if save_function is not None:
                save_function(image, post, filepath)
            else:
                with open(filepath, "wb") as f:
                    f.write(image.file.read())
        return web.json_response({"name": filename, "subfolder": subfolder, "type": upload_type})

    async def upload_image(self, request):
        post = await request.post()
        return self._image_upload(post)

    async def upload_mask(self, request):
        post = await request.post()
        folders = self.fake.folders

        def save_masked_copy(image, post, filepath):
            """Original's RGB + the uploaded PNG's alpha; nothing written if the original is missing."""
            original_ref = json.loads(post.get("original_ref"))
            filename, output_dir = folders.annotated(original_ref["filename"])
            if not filename or filename[0] == "/" or ".." in filename:
                return
            if output_dir is None:
                output_dir = folders.by_type(original_ref.get("type", "output"))
            if output_dir is None:
                return
            if original_ref.get("subfolder", "") != "":
                full = os.path.join(output_dir, original_ref["subfolder"])
                if os.path.commonpath((os.path.abspath(full), output_dir)) != output_dir:
                    return
                output_dir = full
            file = os.path.join(output_dir, filename)
            if os.path.isfile(file):
                with Image.open(file) as original:
                    meta = PngInfo()
                    for key, value in getattr(original, "text", {}).items():
                        meta.add_text(key, value)
                    original = original.convert("RGBA")
                    mask = Image.open(image.file).convert("RGBA")
                    original.putalpha(mask.getchannel("A"))
                    original.save(filepath, compress_level=4, pnginfo=meta)

        return self._image_upload(post, save_masked_copy)

    async def view_image(self, request):
        if self.fake.view_delay > 0:
            await asyncio.sleep(self.fake.view_delay)
        if not self.fake._views_open.is_set():  # a test holds the views (hold_views)
            await asyncio.get_running_loop().run_in_executor(None, self.fake._view_gate)
        query = request.rel_url.query
        if "filename" not in query:
            return web.Response(status=404)
        filename, output_dir = self.fake.folders.annotated(query["filename"])
        if not filename:
            return web.Response(status=400)
        if filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        if output_dir is None:
            output_dir = self.fake.folders.by_type(query.get("type", "output"))
        if output_dir is None:
            return web.Response(status=400)
        if "subfolder" in query:
            full = os.path.join(output_dir, query["subfolder"])
            if os.path.commonpath((os.path.abspath(full), output_dir)) != output_dir:
                return web.Response(status=403)
            output_dir = full
        filename = os.path.basename(filename)
        file = os.path.join(output_dir, filename)
        if not os.path.isfile(file):
            return web.Response(status=404)
        disposition = {"Content-Disposition": f'filename="{filename}"'}
        if "preview" in query:
            with Image.open(file) as img:
                info = query["preview"].split(";")
                fmt = info[0]
                if fmt not in ("webp", "jpeg") or "a" in query.get("channel", ""):
                    fmt = "webp"
                quality = int(info[-1]) if info[-1].isdigit() else 90
                if fmt == "jpeg" or query.get("channel", "") == "rgb":
                    img = img.convert("RGB")
                buf = BytesIO()
                img.save(buf, format=fmt, quality=quality)
            return web.Response(body=buf.getvalue(), content_type=f"image/{fmt}", headers=disposition)
        channel = query.get("channel", "rgba")
        if channel == "rgb":
            with Image.open(file) as img:
                out = Image.merge("RGB", img.split()[:3]) if img.mode == "RGBA" else img.convert("RGB")
                buf = BytesIO()
                out.save(buf, format="PNG")
            return web.Response(body=buf.getvalue(), content_type="image/png", headers=disposition)
        if channel == "a":
            with Image.open(file) as img:
                alpha = img.split()[-1] if img.mode == "RGBA" else Image.new("L", img.size, 255)
                out = Image.new("RGBA", img.size)
                out.putalpha(alpha)
                buf = BytesIO()
                out.save(buf, format="PNG")
            return web.Response(body=buf.getvalue(), content_type="image/png", headers=disposition)
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        if content_type in {"text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript",
                            "text/css"}:
            content_type = "application/octet-stream"
        return web.FileResponse(file, headers={**disposition, "Content-Type": content_type})


def _same_content(filepath: str, upload_file) -> bool:
    """compare_image_hash: sha256 of the stored file vs the upload (then rewind the upload)."""
    with open(filepath, "rb") as f:
        a = hashlib.sha256(f.read()).hexdigest()
    b = hashlib.sha256(upload_file.read()).hexdigest()
    upload_file.seek(0)
    return a == b


def build_app(fake) -> web.Application:
    """All routes, each also under /api (ComfyUI registers both)."""
    routes = Routes(fake)
    fake._routes = routes
    app = web.Application(client_max_size=100 * 1024 * 1024, middlewares=[origin_only_middleware])
    table = [
        ("GET", "/ws", fake.hub.websocket_handler),
        ("POST", "/prompt", routes.post_prompt),
        ("GET", "/prompt", routes.get_prompt),
        ("GET", "/queue", routes.get_queue),
        ("POST", "/queue", routes.post_queue),
        ("POST", "/interrupt", routes.post_interrupt),
        ("POST", "/free", routes.post_free),
        ("GET", "/history", routes.get_history),
        ("GET", "/history/{prompt_id}", routes.get_history_prompt),
        ("POST", "/history", routes.post_history),
        ("GET", "/object_info", routes.get_object_info),
        ("GET", "/object_info/{node_class}", routes.get_object_info_node),
        ("GET", "/embeddings", routes.get_embeddings),
        ("GET", "/extensions", routes.get_extensions),
        ("GET", "/models", routes.list_model_types),
        ("GET", "/models/{folder}", routes.get_models),
        ("GET", "/system_stats", routes.system_stats),
        ("POST", "/upload/image", routes.upload_image),
        ("POST", "/upload/mask", routes.upload_mask),
        ("GET", "/view", routes.view_image),
        ("GET", "/view_metadata/{folder_name}", routes.view_metadata),
    ]
    # ComfyUI registers its routes with a RouteTableDef, whose GET routes answer HEAD too
    for prefix in ("/api", ""):
        for method, path, handler in table:
            if method == "GET":
                app.router.add_get(prefix + path, handler)
            else:
                app.router.add_route(method, prefix + path, handler)
    return app
