"""Identities: of the code that took a run's decisions, of a fitted file's content, of a backbone.

* :func:`code_identity`: the tokvis version and the method's ``decisions_version``
  (:class:`tokvis.methods.base.Method`); part of a run's configuration, so a store recorded by other
  code is reported as such and never resumed or completed by this code.
* :func:`content_sha256`: SHA-256 of a safetensors file's canonical content (each tensor's name,
  dtype, shape and bytes in name order, and the metadata as canonical JSON), independent of how
  the file's header happens to order its keys; :func:`canonical_safetensors` writes the header
  with sorted keys, so one content is one file.
* :func:`backbone_identity`: what a fitted learned method depends on in its backbone (name, depth,
  width, patch grid; and the revision of a Hugging Face model).
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Mapping

__all__ = ["code_identity", "content_sha256", "canonical_safetensors", "backbone_identity", "describe_code"]


def code_identity(method: str | type | Any) -> dict[str, Any]:
    """``{"tokvis": version, "decisions": the method's decisions_version}``.

    Parameters
    ----------
    method : str, Method class or Method object
        A registered method name, or the method itself.
    """
    import tokvis

    if isinstance(method, str):
        from tokvis.methods import get_method_class

        method = get_method_class(method)
    return {"tokvis": tokvis.__version__, "decisions": int(getattr(method, "decisions_version", 1))}


def describe_code(code: Any, versions: Mapping[str, Any] | None = None) -> str:
    """A short text naming the code of a stored identity (``None``: a store from before identities)."""
    if not isinstance(code, dict):
        old = (versions or {}).get("tokvis", "unknown")
        return f"tokvis {old}, before runs recorded their code's identity"
    return f"tokvis {code.get('tokvis')}, decisions version {code.get('decisions')}"


def _canonical_meta(meta: Mapping[str, str]) -> str:
    out = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return json.dumps(out, sort_keys=True)


def content_sha256(tensors: Mapping[str, Any], meta: Mapping[str, str]) -> str:
    """SHA-256 (hex) of tensors (name order) and metadata (canonical JSON; JSON strings parsed).

    Parameters
    ----------
    tensors : mapping of str to torch.Tensor
    meta : mapping of str to str
        The file's metadata, without the checksum itself.
    """
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(_canonical_meta(meta).encode())
    return h.hexdigest()


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted (safetensors orders them at random)."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return b"".join([struct.pack("<Q", len(text)), text, memoryview(blob)[8 + n :]])


def backbone_identity(model) -> dict[str, Any]:
    """``{"name", "depth", "width", "grid"}`` of a backbone: what a fitted method's parameters depend on.

    The name is timm's architecture, or for a Hugging Face model loaded by name (:mod:`tokvis.hf_zoo`)
    ``hf:<repo id or folder>``, with the ``revision`` (the commit its files were read at) as a fifth key.

    Parameters
    ----------
    model : nn.Module
        A timm ViT / Eva, or a supported ``transformers`` model.
    """
    from tokvis.backbones import backbone_for
    from tokvis.errors import UnsupportedModelError

    hf = getattr(model, "_tokvis_hf", None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = hf["name"] if hf else cfg.get("architecture") or type(model).__name__
    try:
        info = backbone_for(model).describe(model)
        depth, width, grid = info.depth, info.embed_dim, info.grid_size
    except UnsupportedModelError:  # not a model tokvis patches: what its attributes say
        blocks = getattr(model, "blocks", None)
        depth = len(blocks) if blocks is not None else None
        width = int(getattr(model, "embed_dim", 0) or 0) or None
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    out = {
        "name": str(name),
        "depth": depth,
        "width": int(width) if width else None,
        "grid": [int(v) for v in grid] if grid is not None else None,
    }
    if hf:
        out["revision"] = hf.get("revision")
    return out


def describe_backbone(b: Mapping[str, Any]) -> str:
    """``name (depth D, width W, grid HxW)`` (``name@revision`` for a Hugging Face model)."""
    grid = "x".join(map(str, b.get("grid") or [])) or "?"
    name = f"{b.get('name')}@{b['revision']}" if b.get("revision") else b.get("name")
    return f"{name} (depth {b.get('depth')}, width {b.get('width')}, grid {grid})"
