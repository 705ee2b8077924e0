"""Helpers of the host tier (imported as comfyui.hostutil; pytest's pythonpath includes tests/)."""
from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Comfy:
    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log: Path):
        self.base, self.port, self.proc, self.log = base, port, proc, log
        self.url = f"http://127.0.0.1:{port}"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def loras_dir(self) -> Path:
        return self.base / "models" / "loras"

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, graph: dict) -> str:
        status, body = self.post("/prompt", {"prompt": graph, "client_id": "dopsd-tests"})
        assert status == 200, body
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """History entry of a finished prompt (success or error)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            assert self.proc.poll() is None, f"ComfyUI died:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, graph: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(graph), timeout)


def node_error_text(entry: dict) -> str:
    """The error message the UI shows for a failed prompt."""
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data.get('exception_type')}: {data.get('exception_message')}"
    return ""


def graph(*nodes) -> dict:
    """nodes: (id, class_type, inputs) -> API-format prompt."""
    return {str(i): {"class_type": c, "inputs": inp} for i, c, inp in nodes}


def latest_latent(comfy: Comfy, prefix: str):
    """The tensor of the newest file SaveLatent wrote with filename_prefix latents/<prefix>."""
    from safetensors.torch import load_file
    files = sorted((comfy.output_dir / "latents").glob(f"{prefix}_*.latent"))
    assert files, f"no latent saved for {prefix}"
    return load_file(str(files[-1]))["latent_tensor"]


def fresh_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def api_prompt(workflow: dict, object_info: dict) -> dict:
    """A workflow file (UI format) -> the API prompt the frontend queues for it: links become inputs,
    widgets_values are matched to the node's widget inputs in their declared order (a control_after_generate
    widget carries one extra value; a widget turned into a linked input keeps its slot). Notes and muted
    or bypassed nodes are left out."""
    links = {lk[0]: lk for lk in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if info is None or node.get("mode", 0) in (2, 4):
            continue
        spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info.get("input_order", {})
        names = [*order.get("required", []), *order.get("optional", [])] or list(spec)
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values, inputs = list(node.get("widgets_values") or []), {}
        for name in names:
            kind, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            is_widget = isinstance(kind, list) or kind in WIDGET_TYPES
            if is_widget and values:
                inputs[name] = values.pop(0)
                if opts.get("control_after_generate"):
                    values.pop(0)
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
