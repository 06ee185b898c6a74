"""Local weights files into an encoder: torchvision `.pth`, timm `.safetensors` or `.pth`.

Nothing is downloaded: a value that names no local file (a URL, "imagenet", a hub name) is refused
with the way to get one. The file's classifier is never loaded (the encoders of `model.backbones`
have none; its tensors come back as unexpected keys), so the ICCL classifier starts fresh.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_pretrained", "read_weights"]

# Names under which torchvision and timm models keep their classifier: a weights file's own head is
# expected to be left out; any other tensor the encoder lacks means another architecture.
HEAD_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.", "pre_logits.")
_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema")  # training checkpoints nest the weights


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file, keyed as the model that saved them names them.

    `.safetensors` files are read with `safetensors.torch.load_file`; anything else with
    `torch.load(weights_only=True)` (no code from the file runs). A checkpoint that nests its
    weights under "state_dict" / "model" is unwrapped, and a DistributedDataParallel "module."
    prefix is removed.

    Raises:
        ValueError: the value is not a local file (nothing is downloaded), or the file holds no
            tensors this function can read.
    """
    text = os.path.expanduser(os.fspath(path))  # `--set pretrained=~/w.pth`: no shell expands that `~`
    if "://" in text or text.startswith("hf-hub:") or not Path(text).is_file():
        raise ValueError(
            f"pretrained={text}: not a local file. Nothing is downloaded at run time: download the "
            f"weights once (e.g. a torchvision .pth, or a timm model's model.safetensors) and pass "
            f"--set pretrained=/path/to/that/file.")
    try:
        if text.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(text, device="cpu")
        else:
            state = torch.load(text, map_location="cpu", weights_only=True)
    except Exception as e:  # any reader failure means the file is not a weights file it can read
        first = (str(e).strip().splitlines() or [""])[0]  # torch's own advice below it is not ours
        raise ValueError(f"pretrained={text}: not a readable weights file ({type(e).__name__}: {first}). "
                         f"Pass a .pth state dict or a .safetensors file.") from None
    while isinstance(state, Mapping):
        nested = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), Mapping)), None)
        if nested is None:
            break
        state = nested
    if not isinstance(state, Mapping) or not any(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"pretrained={text}: holds no tensors (a {type(state).__name__}). Pass a "
                         f"state dict saved with torch.save(model.state_dict(), ...) or safetensors.")
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def load_pretrained(encoder: nn.Module, path: str | os.PathLike) -> dict:
    """Copy the tensors of a local weights file into `encoder`, by name.

    Every encoder entry whose name is in the file with the same shape is loaded; BatchNorm
    `num_batches_tracked` counters absent from older files are left as they are.

    Returns:
        {"path": str, "loaded": int, "missing": [encoder keys not in the file],
         "unexpected": [file keys the encoder lacks, e.g. the file's classifier "fc.weight"]}.

    Raises:
        ValueError: as `read_weights`; or a tensor whose shape differs from the encoder's (names
            them); or no tensor of the file fits, or the file has tensors that are neither the
            encoder's nor a classifier head's (`HEAD_PREFIXES`): a file for another architecture.
    """
    state = read_weights(path)
    own = encoder.state_dict()
    mismatched = [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"pretrained={os.fspath(path)}: {len(mismatched)} tensors have other shapes "
                         f"than the encoder's ({'; '.join(mismatched[:3])}). Is the file for this "
                         f"architecture?")
    fits = {k: state[k] for k in own if k in state}
    extra = [k for k in state if k not in own and not k.startswith(HEAD_PREFIXES)]
    if fits and extra:
        raise ValueError(f"pretrained={os.fspath(path)}: {len(extra)} of its tensors are not in this "
                         f"encoder nor a classifier head (e.g. {', '.join(extra[:3])}): the file is for "
                         f"another architecture (such as resnet34 weights for arch=resnet18). Pass weights "
                         f"of this architecture.")
    if not fits:
        raise ValueError(f"pretrained={os.fspath(path)}: none of its {len(state)} tensors names an "
                         f"encoder tensor (the file has e.g. {', '.join(list(state)[:3])}; the encoder "
                         f"e.g. {', '.join(list(own)[:3])}). Pass weights of this architecture.")
    encoder.load_state_dict(fits, strict=False)
    return {"path": os.fspath(Path(path).absolute()), "loaded": len(fits),
            "missing": [k for k in own if k not in state and not k.endswith("num_batches_tracked")],
            "unexpected": [k for k in state if k not in own]}
