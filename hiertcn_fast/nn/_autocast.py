"""torch.autocast for the modules whose ops take one dtype: what autocast would do to their arguments."""

import torch


def autocast_dtype(device_type: str):
    """torch.autocast's lower-precision dtype inside an autocast region for ``device_type``, else None."""
    # cpu and cuda always have autocast; asking torch.amp.is_autocast_available for them would stop torch.compile
    # (fullgraph) on torch 2.11, whose dynamo cannot trace it.
    if ((device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type))
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast(t, dtype):
    """What torch.autocast does to an argument of a lower-precision op: floating tensors other than
    float64 go to ``dtype`` (differentiably, so gradients reach float32 parameters); the rest stays."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def rnn_autocast_dtype(x: torch.Tensor, hx, weight: torch.Tensor):
    """The dtype torch.autocast runs the GRU modules in, as it does torch.nn's, or None to leave them as they are.
    CUDA's autocast runs RNNs in its lower-precision dtype. CPU's runs torch's GRU and GRUCell in hx's dtype (the
    input's without hx) where that is the autocast dtype, else in float32 (float64 stays float64): a module in a
    half type given float32 then runs in float32, its weights cast."""
    if x.device.type == "cpu":
        if not torch.is_autocast_enabled("cpu"):
            return None
        dtype = (x if hx is None else hx).dtype
        if dtype == torch.get_autocast_dtype("cpu"):
            return dtype
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return None
        if x.dtype == torch.float32 and (hx is None or hx.dtype == torch.float32) and weight.dtype == torch.float32:
            return None  # float32 throughout: nothing to cast
        return torch.float32
    return autocast_dtype(x.device.type)
